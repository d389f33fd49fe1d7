//! Per-instance memory limit that remembers what it refused, so a trap after a refused
//! `memory.grow` is reported as "memory limit reached" rather than a bare `unreachable`.

use wasmtime::ResourceLimiter;

/// Limits one store's linear memories and tables and tracks their size.
#[derive(Debug, Clone)]
pub struct MemoryLimiter {
    limit_bytes: usize,
    used_bytes: usize,
    refused: Option<usize>,
}

impl MemoryLimiter {
    /// A limiter allowing `limit_bytes` of linear memory in total.
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            limit_bytes,
            used_bytes: 0,
            refused: None,
        }
    }

    /// Linear memory currently in use, in bytes.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// The limit, in bytes.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Takes the size of the last refused growth, if any since the last call.
    pub fn take_refused(&mut self) -> Option<usize> {
        self.refused.take()
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grown = self.used_bytes - current.min(self.used_bytes) + desired;
        if grown > self.limit_bytes {
            self.refused = Some(grown);
            return Ok(false);
        }
        self.used_bytes = grown;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
