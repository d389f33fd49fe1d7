//! `[threads]`: the async runtime's threads, sized for a small board.
//!
//! Guests run on the runtime's worker threads (each call on a fiber stack of the engine's
//! pool, not on the worker's own stack), SQLite's writer has a thread of its own, and blocking
//! work (file reads, compiles) goes to a small pool that grows on demand and shrinks when idle.
//! Every thread costs its touched stack pages and, with glibc, a malloc arena of its own: a
//! 512 MB board wants few of them.

use serde::{Deserialize, Serialize};

use super::check::ConfigError;

/// `[threads]`; every key is optional.
///
/// ```toml
/// [threads]
/// workers = 2              # async worker threads, 1..64 (0: one per core, at most 2)
/// worker-stack = "2MiB"    # stack of each runtime thread, 256KiB..16MiB (address space;
///                          # only the pages touched are memory)
/// max-blocking = 64        # threads for blocking work (file I/O, compiles), 1..512
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ThreadsSection {
    /// Async worker threads (1 to [`ThreadsSection::MAX_WORKERS`]; 0: one per core, at most
    /// [`ThreadsSection::DEFAULT_MAX_WORKERS`]).
    pub workers: usize,
    /// Stack of each runtime thread ([`ThreadsSection::MIN_STACK`] to
    /// [`ThreadsSection::MAX_STACK`]).
    pub worker_stack: String,
    /// Most threads for blocking work (1 to [`ThreadsSection::MAX_BLOCKING`]); idle ones end
    /// after ten seconds.
    pub max_blocking: usize,
}

impl ThreadsSection {
    /// Most async worker threads.
    pub const MAX_WORKERS: usize = 64;
    /// Workers when `workers = 0` on a machine with more cores.
    pub const DEFAULT_MAX_WORKERS: usize = 2;
    /// Smallest stack: deep enough for the agent's own code, compiles included (guests run
    /// on fiber stacks of the engine's pool).
    pub const MIN_STACK: u64 = 256 << 10;
    /// Largest stack.
    pub const MAX_STACK: u64 = 16 << 20;
    /// Most blocking threads.
    pub const MAX_BLOCKING: usize = 512;

    /// Checks every key against its bound.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.workers > Self::MAX_WORKERS {
            return Err(ConfigError {
                key: "threads.workers".into(),
                message: format!(
                    "{} is out of bounds: expected 0 (one per core) to {}",
                    self.workers,
                    Self::MAX_WORKERS
                ),
            });
        }
        if !(1..=Self::MAX_BLOCKING).contains(&self.max_blocking) {
            return Err(ConfigError {
                key: "threads.max-blocking".into(),
                message: format!(
                    "{} is out of bounds: expected 1 to {}",
                    self.max_blocking,
                    Self::MAX_BLOCKING
                ),
            });
        }
        super::check::size(
            "threads.worker-stack",
            &self.worker_stack,
            Self::MIN_STACK,
            Self::MAX_STACK,
        )?;
        Ok(())
    }

    /// The worker count `workers` stands for on this machine.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(Self::DEFAULT_MAX_WORKERS)
    }

    /// Builds the multi-threaded async runtime these settings describe (call after
    /// [`super::AgentConfig::load`], which checked them).
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        let stack = super::parse_size(&self.worker_stack)?;
        let stack = usize::try_from(stack)?;
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.worker_count())
            .max_blocking_threads(self.max_blocking)
            .thread_stack_size(stack)
            .enable_all()
            .build()?)
    }
}

impl Default for ThreadsSection {
    fn default() -> Self {
        Self {
            workers: 0,
            worker_stack: "2MiB".into(),
            max_blocking: 64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_has_the_configured_workers() {
        let threads = ThreadsSection {
            workers: 3,
            ..ThreadsSection::default()
        };
        threads.check().expect("in bounds");
        let runtime = threads.runtime().expect("builds");
        assert_eq!(runtime.metrics().num_workers(), 3);
    }

    #[test]
    fn zero_workers_is_one_per_core_at_most_two() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let count = ThreadsSection::default().worker_count();
        assert_eq!(count, cores.min(ThreadsSection::DEFAULT_MAX_WORKERS));
        let runtime = ThreadsSection::default().runtime().expect("builds");
        assert_eq!(runtime.metrics().num_workers(), count);
    }
}
