//! The one Wasmtime engine: pooling allocator sized from config, explicit memory reservations,
//! epoch interruption (ticking only while a guest runs), and the linkers for components and WASI preview-1 commands.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::IntoAnyhow;
use super::address_space::{AddressSpace, PoolFit};
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
    /// Elements of the largest table one instance may have (componentize-py guests have
    /// about 13 000 functions in their table).
    pub table_elements: u32,
    /// Core instances one component may create (a componentize-py guest creates about 20).
    pub core_instances_per_component: u32,
    /// Tables one component may have.
    pub tables_per_component: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_instances: 1024,
            max_memory_bytes: 32 << 20,
            memory_guard_bytes: 64 << 10,
            table_elements: 20_000,
            core_instances_per_component: 32,
            tables_per_component: 8,
        }
    }
}

impl EngineOptions {
    /// Virtual address space the pool reserves for linear memories, in bytes; `u64::MAX` when
    /// the sizes are too large to count (no machine has that much).
    pub fn reserved_memory_bytes(&self) -> u64 {
        u64::from(self.max_instances)
            .saturating_mul(u64::from(MEMORIES_PER_INSTANCE))
            .saturating_mul(
                self.max_memory_bytes
                    .saturating_add(self.memory_guard_bytes),
            )
    }
}

/// The Wasmtime release the agent is built with; compiled code loads only into the same
/// release. Kept equal to the lock file's by a unit test.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// The target triple this agent was built for (`aarch64-unknown-linux-musl`, ...): what the
/// node reports and what the hub compiles for.
pub fn host_target() -> String {
    target_lexicon::Triple::host().to_string()
}

/// What compiled code depends on: Wasmtime's release, the target, and the engine settings
/// that change the code Cranelift emits. Two engines with the same fingerprint load each
/// other's precompiled artifacts; the hub computes it for a node from the node's reported
/// target and memory settings, with the same [`engine_config`] the node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeSettings {
    /// Target triple the code is for.
    pub target: String,
    /// Linear memory reservation per memory (bounds checks are elided within it).
    pub memory_reservation: u64,
    /// Guard region after each memory.
    pub memory_guard_bytes: u64,
}

impl CodeSettings {
    /// The settings of an engine sized by `options`, compiling for `target`.
    pub fn new(target: &str, options: &EngineOptions) -> Self {
        Self {
            target: target.to_owned(),
            memory_reservation: options.max_memory_bytes,
            memory_guard_bytes: options.memory_guard_bytes,
        }
    }

    /// The engine fingerprint: the first 16 bytes of the SHA-256 of a canonical text of these
    /// settings and the fixed ones of [`engine_config`] (epoch interruption, component model,
    /// no growth reservation, baseline CPU features of the target), 32 hex digits. Stable
    /// across hosts and Rust releases, unlike a `std::hash::Hasher`, and computed the same
    /// by a node without a compiler.
    pub fn fingerprint(&self) -> String {
        let text = format!(
            "lichen-engine-v1\nwasmtime {WASMTIME_VERSION}\ntarget {}\nmemory-reservation {}\nmemory-guard {}\nreservation-for-growth 0\nepoch-interruption 1\ncomponent-model 1\nconcurrency-support 0\ncpu-features baseline\n",
            self.target, self.memory_reservation, self.memory_guard_bytes
        );
        hex::encode(&Sha256::digest(text.as_bytes())[..16])
    }
}

/// Memory slots per instance slot: a Rust component has one memory; the second is headroom
/// for components made of several modules.
const MEMORIES_PER_INSTANCE: u32 = 2;

/// The engine plus what every instance needs from it.
pub struct WasmEngine {
    engine: Engine,
    linker: Linker<InstanceData>,
    command_linker: wasmtime::Linker<CommandData>,
    cli_linker: Linker<CliData>,
    fingerprint: String,
    target: String,
    options: EngineOptions,
    fit: PoolFit,
    space: AddressSpace,
    ticker_stop: Arc<AtomicBool>,
    /// The ticker thread; it holds a clone of the engine, so dropping waits for it (at most
    /// one tick) and the pool's reservation is gone when the drop returns.
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl WasmEngine {
    /// Builds the engine and starts its epoch ticker thread.
    pub fn new(options: EngineOptions) -> Result<Self> {
        let space = AddressSpace::probe();
        let (fitted, mut fit) = options.fit_to(&space);
        let target = host_target();
        let (engine, options) = build_engine(fitted, &target)?;
        fit.fitted = options.max_instances;
        if fit.lowered() {
            tracing::warn!("{}", fit.describe(&space));
        } else {
            tracing::info!("{}", fit.describe(&space));
        }

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

        let fingerprint = CodeSettings::new(&target, &options).fingerprint();

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = spawn_epoch_ticker(engine.clone(), ticker_stop.clone())?;

        Ok(Self {
            engine,
            linker,
            command_linker,
            cli_linker,
            fingerprint,
            target,
            options,
            fit,
            space,
            ticker_stop,
            ticker: Some(ticker),
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

    /// Identifies the engine's code generation settings ([`CodeSettings::fingerprint`]);
    /// precompiled artifacts are cached under it, since they load only into an engine built
    /// the same way.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The target triple the engine compiles for (this agent's own).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The sizing the engine was built with (`max_instances` as fitted to the address
    /// space, which may be below the configured count).
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// How the pool was sized to the address space, and what was measured.
    pub fn pool_fit(&self) -> (PoolFit, AddressSpace) {
        (self.fit, self.space)
    }
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            ticker.thread().unpark();
            let _ = ticker.join();
        }
    }
}

/// Builds the engine; when the pool cannot be reserved (the estimate of the address space
/// was too generous), tries again with a quarter fewer instances, down to one.
fn build_engine(mut options: EngineOptions, target: &str) -> Result<(Engine, EngineOptions)> {
    let mut first_error = None;
    loop {
        match Engine::new(&engine_config(&options, target)?).anyhow() {
            Ok(engine) => return Ok((engine, options)),
            Err(err) if options.max_instances > 1 => {
                tracing::debug!(
                    "a pool of {} instances could not be made: {err:#}",
                    options.max_instances
                );
                first_error.get_or_insert(err);
                options.max_instances -= (options.max_instances / 4).max(1);
            }
            Err(err) => {
                return Err(first_error.unwrap_or(err))
                    .context("cannot create the Wasmtime engine");
            }
        }
    }
}

/// The engine configuration for `options`, compiling for `target`. The node and the hub (which
/// precompiles for a node) both build their engines with it, so code compiled on one loads on
/// the other. The target is always named, even the host's own: Wasmtime then uses the
/// target's baseline CPU features instead of probing this CPU's, so the code does not depend
/// on which board of a family compiled it.
pub fn engine_config(options: &EngineOptions, target: &str) -> Result<Config> {
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
        .total_core_instances(
            instances.saturating_mul(options.core_instances_per_component.clamp(8, 32)),
        )
        .total_memories(instances.saturating_mul(MEMORIES_PER_INSTANCE))
        .total_tables(instances.saturating_mul(options.tables_per_component.clamp(4, 8)))
        .total_stacks(instances)
        .max_memory_size(max_memory)
        .max_core_instances_per_component(options.core_instances_per_component)
        .max_memories_per_component(MEMORIES_PER_INSTANCE)
        .max_tables_per_component(options.tables_per_component)
        .table_elements(options.table_elements as usize);

    let mut config = Config::new();
    config
        .target(target)
        .anyhow()
        .with_context(|| format!("target {target:?} is not a target triple Wasmtime knows"))?
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_reservation(options.max_memory_bytes)
        .memory_guard_size(options.memory_guard_bytes)
        .memory_reservation_for_growth(0)
        .epoch_interruption(true)
        .concurrency_support(false)
        .wasm_component_model(true);
    Ok(config)
}

/// Guest calls running now in this process. The epoch tickers sleep while there are none:
/// an idle agent has no thread waking up every [`EPOCH_TICK`].
static RUNNING_CALLS: AtomicUsize = AtomicUsize::new(0);
/// The epoch ticker threads, woken when the first call starts.
static TICKERS: Mutex<Vec<std::thread::Thread>> = Mutex::new(Vec::new());

fn tickers() -> std::sync::MutexGuard<'static, Vec<std::thread::Thread>> {
    TICKERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held while guest code may run (instantiation, a call, a command's run): the engines'
/// epochs advance only then, so time slices are counted while the agent sleeps for free
/// otherwise. Every entry into a guest must hold one, or a guest that loops is never
/// preempted.
#[must_use = "the epoch advances only while this is held"]
pub struct GuestRunning(());

/// Marks a guest call as running until the returned guard is dropped.
pub fn guest_running() -> GuestRunning {
    if RUNNING_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
        for ticker in tickers().iter() {
            ticker.unpark();
        }
    }
    GuestRunning(())
}

impl Drop for GuestRunning {
    fn drop(&mut self) {
        RUNNING_CALLS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn spawn_epoch_ticker(
    engine: Engine,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let handle = std::thread::Builder::new()
        .name("lichen-epoch".into())
        .spawn(move || {
            // Registered before the first look at the count: a call starting after this
            // unparks the thread, one started before is seen by the look.
            tickers().push(std::thread::current());
            while !stop.load(Ordering::Relaxed) {
                if RUNNING_CALLS.load(Ordering::SeqCst) == 0 {
                    // An unpark between the look and the park makes the park return at once.
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
            let me = std::thread::current().id();
            tickers().retain(|t| t.id() != me);
        })
        .context("cannot start the epoch ticker thread")?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_memory_saturates_instead_of_overflowing() {
        // Found by the agent_config fuzz target: `max-memory` near u64::MAX made this overflow
        // (a panic in debug builds, a wrapped and wrong figure for `lichen doctor` in release).
        let huge = EngineOptions {
            max_instances: 3,
            max_memory_bytes: u64::MAX - 10,
            memory_guard_bytes: 64 << 10,
            ..EngineOptions::default()
        };
        assert_eq!(huge.reserved_memory_bytes(), u64::MAX);
        assert_eq!(
            EngineOptions::default().reserved_memory_bytes(),
            1024 * 2 * ((32 << 20) + (64 << 10))
        );
    }

    #[test]
    fn the_wasmtime_version_in_the_fingerprint_is_the_one_built_in() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
            .expect("the workspace lock file");
        let wanted = format!("name = \"wasmtime\"\nversion = \"{WASMTIME_VERSION}\"");
        assert!(
            lock.contains(&wanted),
            "WASMTIME_VERSION is {WASMTIME_VERSION}, not the locked wasmtime release"
        );
    }

    #[test]
    fn the_fingerprint_changes_with_each_setting_that_changes_code() {
        let options = EngineOptions::default();
        let base = CodeSettings::new("aarch64-unknown-linux-musl", &options);
        let fp = base.fingerprint();
        assert_eq!(fp.len(), 32);
        assert_eq!(fp, base.clone().fingerprint(), "stable");
        let other_target = CodeSettings::new("riscv64gc-unknown-linux-gnu", &options);
        let more_memory = CodeSettings::new(
            "aarch64-unknown-linux-musl",
            &EngineOptions {
                max_memory_bytes: 64 << 20,
                ..options
            },
        );
        let fewer_instances = CodeSettings::new(
            "aarch64-unknown-linux-musl",
            &EngineOptions {
                max_instances: 3,
                ..options
            },
        );
        assert_ne!(other_target.fingerprint(), fp);
        assert_ne!(more_memory.fingerprint(), fp);
        assert_eq!(
            fewer_instances.fingerprint(),
            fp,
            "the pool size is not in code"
        );
    }
}
