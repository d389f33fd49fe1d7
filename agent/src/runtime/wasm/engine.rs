//! The one Wasmtime engine: pooling allocator sized from config, explicit memory reservations,
//! epoch interruption, and the linkers for components and WASI preview-1 commands.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::IntoAnyhow;
use super::command::{CliData, CommandData};
use super::instance::InstanceData;

/// How often the engine's epoch advances; time slices are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizing of the engine, from the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Most live instances at once (each workload uses one, two during a hot reload).
    pub max_instances: u32,
    /// Largest linear memory any instance may have, in bytes. Every memory slot reserves
    /// this much virtual address space, so `max_instances * 2 * max_memory_bytes` must fit in
    /// the board's address space (512 GiB on 39-bit Raspberry Pi kernels).
    pub max_memory_bytes: u64,
    /// Guard region after each memory, in bytes. Small guards make Cranelift emit explicit
    /// bounds checks instead of relying on 4 GiB of unmapped space.
    pub memory_guard_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_instances: 1024,
            max_memory_bytes: 32 << 20,
            memory_guard_bytes: 64 << 10,
        }
    }
}

impl EngineOptions {
    /// Virtual address space the pool reserves for linear memories, in bytes.
    pub fn reserved_memory_bytes(&self) -> u64 {
        u64::from(self.max_instances)
            * MEMORIES_PER_INSTANCE
            * (self.max_memory_bytes + self.memory_guard_bytes)
    }
}

/// Memory slots per instance slot: a Rust component has one memory; the second is headroom
/// for components made of several modules.
const MEMORIES_PER_INSTANCE: u64 = 2;

/// The engine plus what every instance needs from it.
pub struct WasmEngine {
    engine: Engine,
    linker: Linker<InstanceData>,
    command_linker: wasmtime::Linker<CommandData>,
    cli_linker: Linker<CliData>,
    fingerprint: String,
    options: EngineOptions,
    ticker_stop: Arc<AtomicBool>,
}

impl WasmEngine {
    /// Builds the engine and starts its epoch ticker thread.
    pub fn new(options: EngineOptions) -> Result<Self> {
        let engine = Engine::new(&engine_config(&options)?)
            .anyhow()
            .context("cannot create the Wasmtime engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .anyhow()
            .context("cannot link WASI 0.2 for components")?;
        lichen_host_apis::add_to_linker(&mut linker, |d: &mut InstanceData| &mut d.device)
            .anyhow()
            .context("cannot link Lichen's host APIs")?;

        let mut command_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut command_linker, |d: &mut CommandData| {
            &mut d.wasi
        })
        .anyhow()
        .context("cannot link WASI preview 1 for command modules")?;

        let mut cli_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut cli_linker)
            .anyhow()
            .context("cannot link WASI 0.2 for wasi:cli/run components")?;

        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let fingerprint = format!("{:016x}", hasher.finish());

        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone())?;

        Ok(Self {
            engine,
            linker,
            command_linker,
            cli_linker,
            fingerprint,
            options,
            ticker_stop,
        })
    }

    /// The Wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Linker with WASI 0.2 and Lichen's host APIs, for device-function components.
    pub fn linker(&self) -> &Linker<InstanceData> {
        &self.linker
    }

    /// Linker with WASI preview 1, for command modules.
    pub fn command_linker(&self) -> &wasmtime::Linker<CommandData> {
        &self.command_linker
    }

    /// Linker with WASI 0.2 only, for `wasi:cli/run` command components.
    pub fn cli_linker(&self) -> &Linker<CliData> {
        &self.cli_linker
    }

    /// Identifies the engine's code generation settings; precompiled artifacts are cached
    /// under it, since they load only into an engine built the same way.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The sizing the engine was built with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(options: &EngineOptions) -> Result<Config> {
    anyhow::ensure!(
        options.max_memory_bytes >= 64 << 10,
        "max memory per instance must be at least one 64 KiB page, got {} bytes",
        options.max_memory_bytes
    );
    anyhow::ensure!(
        options.max_instances > 0,
        "max instances must be at least 1"
    );
    let instances = options.max_instances;
    let max_memory =
        usize::try_from(options.max_memory_bytes).context("max memory does not fit in usize")?;

    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(MEMORIES_PER_INSTANCE as u32))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_memory_size(max_memory)
        .max_core_instances_per_component(16)
        .max_memories_per_component(MEMORIES_PER_INSTANCE as u32)
        .max_tables_per_component(8)
        .table_elements(10_000);

    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_reservation(options.max_memory_bytes)
        .memory_guard_size(options.memory_guard_bytes)
        .memory_reservation_for_growth(0)
        .epoch_interruption(true)
        .concurrency_support(false)
        .wasm_component_model(true);
    Ok(config)
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) -> Result<()> {
    std::thread::Builder::new()
        .name("lichen-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .context("cannot start the epoch ticker thread")?;
    Ok(())
}
