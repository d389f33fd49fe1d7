//! WASI command programs: preview-1 modules (exporting `_start`) and `wasi:cli/run`
//! components (what `cargo build --target wasm32-wasip2` makes of a `fn main`). Each run
//! instantiates the program afresh and runs it once; its exit code is the run's outcome (a
//! component's is 0 or 1: WASI 0.2's `wasi:cli/exit` carries only ok or err). They get WASI
//! only: no device APIs, no key-value state, no files, no network.
//!
//! Two modes. A deployed command ([`run_command`]) runs within its time slice and what it
//! printed (at most [`OUTPUT_CAPACITY`] per stream) becomes the workload's log once it ends.
//! A workload with a [`CommandOutput`] registered under its name in [`CommandOutputs`] (a
//! containerd pod) runs **streaming and unsliced** ([`stream_command`]): its stdout and stderr
//! are the sink's streams, written through as the program writes, and it runs until it
//! returns, traps or its workload is stopped (the engine still preempts it every epoch tick,
//! so other workloads get the CPU).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lichen_host_apis::{LogLevel, LogSink};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::engine::EPOCH_TICK;
use super::instance::first_lines;
use super::limiter::MemoryLimiter;

/// Store data of a preview-1 command module run.
pub struct CommandData {
    pub(crate) wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    ticks: u64,
}

/// Store data of a `wasi:cli/run` component run.
pub struct CliData {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    ticks: u64,
}

impl WasiView for CliData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled command program, ready to instantiate.
#[derive(Clone)]
pub enum CommandProgram {
    /// A core module exporting `_start` (WASI preview 1).
    Module(wasmtime::InstancePre<CommandData>),
    /// A component exporting `wasi:cli/run` (WASI 0.2).
    Component(CommandPre<CliData>),
}

impl CommandProgram {
    /// The name `ps` shows for the artifact's kind.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Module(_) => "wasi-command",
            Self::Component(_) => "wasi-cli",
        }
    }
}

/// Most output kept from one run, per stream.
pub const OUTPUT_CAPACITY: usize = 256 << 10;

/// What every store of a command run keeps: its memory limiter and its time-slice counter.
trait RunData: 'static {
    fn limiter(&mut self) -> &mut MemoryLimiter;
    fn ticks(&mut self) -> &mut u64;
}

impl RunData for CommandData {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
    fn ticks(&mut self) -> &mut u64 {
        &mut self.ticks
    }
}

impl RunData for CliData {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
    fn ticks(&mut self) -> &mut u64 {
        &mut self.ticks
    }
}

/// A store with the memory limit and the time slice applied.
fn store_for<T: RunData + Send>(
    engine: &wasmtime::Engine,
    data: T,
    time_slice: Duration,
) -> Store<T> {
    let mut store = Store::new(engine, data);
    store.limiter(|d| d.limiter());
    let slice_ticks =
        u64::try_from((time_slice.as_millis() / EPOCH_TICK.as_millis()).max(1)).unwrap_or(u64::MAX);
    store.epoch_deadline_callback(move |mut ctx: StoreContextMut<'_, T>| {
        let ticks = ctx.data_mut().ticks();
        *ticks += 1;
        if *ticks >= slice_ticks {
            return Err(wasmtime::format_err!(
                "preempted: the command ran longer than its time slice of {time_slice:?}"
            ));
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);
    store
}

/// What a command program is given besides its workload name (its `argv[0]`).
#[derive(Debug, Clone, Copy)]
pub struct CommandInput<'a> {
    /// The workload's `config`, as `LICHEN_<KEY>` environment variables.
    pub config: &'a BTreeMap<String, String>,
    /// Arguments after the program name.
    pub args: &'a [String],
    /// More environment variables.
    pub env: &'a BTreeMap<String, String>,
}

/// Where a streaming command's stdout and stderr go (see [`stream_command`]).
pub trait CommandOutput: Send + Sync {
    /// Gives one run's WASI context its stdout and stderr. The run drops them with its store
    /// when the program ends, which is how the reading side learns the output is complete;
    /// an implementation hands its streams to one run only.
    fn attach(&self, builder: &mut WasiCtxBuilder);
}

/// The output sinks of streaming commands, by workload name: the supervisor's command
/// runner streams a workload's output to the sink registered under its name, with no time
/// slice. At most [`CommandOutputs::MAX`] are held.
#[derive(Default)]
pub struct CommandOutputs {
    sinks: Mutex<HashMap<String, Arc<dyn CommandOutput>>>,
}

/// [`CommandOutputs::MAX`] sinks are held already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} streaming commands are registered already", CommandOutputs::MAX)]
pub struct TooManySinks;

impl CommandOutputs {
    /// Most sinks held at once (one per containerd task the agent can hold, with room).
    pub const MAX: usize = 4096;

    fn sinks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn CommandOutput>>> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `sink` for the workload `name`, replacing any earlier one. Refused when
    /// [`CommandOutputs::MAX`] sinks are held.
    pub fn register(&self, name: &str, sink: Arc<dyn CommandOutput>) -> Result<(), TooManySinks> {
        let mut sinks = self.sinks();
        if sinks.len() >= Self::MAX && !sinks.contains_key(name) {
            return Err(TooManySinks);
        }
        sinks.insert(name.to_string(), sink);
        Ok(())
    }

    /// Forgets the sink of `name`, returning it.
    pub fn unregister(&self, name: &str) -> Option<Arc<dyn CommandOutput>> {
        self.sinks().remove(name)
    }

    /// The sink of `name`, if it streams.
    pub fn get(&self, name: &str) -> Option<Arc<dyn CommandOutput>> {
        self.sinks().get(name).cloned()
    }
}

/// The WASI context of a command run: argv `[workload, args...]`, the workload's `config` as
/// `LICHEN_<KEY>` variables, then `env`.
fn context_for(workload: &str, input: CommandInput<'_>) -> WasiCtxBuilder {
    let mut env: Vec<(String, String)> = input
        .config
        .iter()
        .map(|(k, v)| {
            (
                format!("LICHEN_{}", k.to_uppercase().replace('-', "_")),
                v.clone(),
            )
        })
        .collect();
    env.extend(input.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut args: Vec<&str> = Vec::with_capacity(input.args.len() + 1);
    args.push(workload);
    args.extend(input.args.iter().map(String::as_str));
    let mut builder = WasiCtxBuilder::new();
    builder.envs(&env).args(&args);
    builder
}

/// Runs a command once within `time_slice`, its output kept and logged when it ends.
/// Returns `Ok(exit code)` or `Err(trap description)`.
// The trap stays words (the first lines of Wasmtime's chain): it is the workload's `last_error`.
pub async fn run_command(
    engine: &wasmtime::Engine,
    program: CommandProgram,
    workload: &str,
    input: CommandInput<'_>,
    log: &dyn LogSink,
    memory_limit: usize,
    time_slice: Duration,
) -> Result<i32, String> {
    let stdout = MemoryOutputPipe::new(OUTPUT_CAPACITY);
    let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
    let mut builder = context_for(workload, input);
    builder.stdout(stdout.clone()).stderr(stderr.clone());
    let outcome = run_program(engine, program, builder, memory_limit, time_slice).await;
    forward_lines(workload, log, LogLevel::Info, "stdout", &stdout.contents());
    forward_lines(workload, log, LogLevel::Warn, "stderr", &stderr.contents());
    outcome
}

/// Runs a command once with no time slice, its stdout and stderr the streams `output`
/// attaches (written through as the program writes; nothing is kept here). Returns
/// `Ok(exit code)` or `Err(trap description)`; dropping the future ends the run.
pub async fn stream_command(
    engine: &wasmtime::Engine,
    program: CommandProgram,
    workload: &str,
    input: CommandInput<'_>,
    output: &dyn CommandOutput,
    memory_limit: usize,
) -> Result<i32, String> {
    let mut builder = context_for(workload, input);
    output.attach(&mut builder);
    run_program(engine, program, builder, memory_limit, Duration::MAX).await
}

/// Runs a command once with the WASI context `builder` describes (arguments, environment,
/// stdout and stderr; no network is added here whatever it says). Returns `Ok(exit code)` or
/// `Err(trap description)`. The store, and so every output stream the program held, is
/// dropped before this returns.
pub async fn run_program(
    engine: &wasmtime::Engine,
    program: CommandProgram,
    mut builder: WasiCtxBuilder,
    memory_limit: usize,
    time_slice: Duration,
) -> Result<i32, String> {
    // The epoch (the time slice's clock, and the yields that keep a looping program from
    // holding its thread) advances only while a guest runs: every path into guest code holds
    // this, pods' runs included.
    let _running = super::engine::guest_running();
    builder
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    let outcome: wasmtime::Result<i32> = match program {
        CommandProgram::Module(pre) => {
            let data = CommandData {
                wasi: builder.build_p1(),
                limiter: MemoryLimiter::new(memory_limit),
                ticks: 0,
            };
            let mut store = store_for(engine, data, time_slice);
            async {
                let instance = pre.instantiate_async(&mut store).await?;
                let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                start.call_async(&mut store, ()).await?;
                Ok(0)
            }
            .await
        }
        CommandProgram::Component(pre) => {
            let data = CliData {
                wasi: builder.build(),
                table: ResourceTable::new(),
                limiter: MemoryLimiter::new(memory_limit),
                ticks: 0,
            };
            let mut store = store_for(engine, data, time_slice);
            async {
                let command = pre.instantiate_async(&mut store).await?;
                // `run` returning `err` is a failed program without a code: exit code 1, as
                // `wasmtime run` reports it.
                match command.wasi_cli_run().call_run(&mut store).await? {
                    Ok(()) => Ok(0),
                    Err(()) => Ok(1),
                }
            }
            .await
        }
    };
    match outcome {
        Ok(code) => Ok(code),
        Err(err) => match err.downcast_ref::<I32Exit>() {
            Some(exit) => Ok(exit.0),
            None => Err(first_lines(&format!("{err:#}"))),
        },
    }
}

fn forward_lines(workload: &str, log: &dyn LogSink, level: LogLevel, context: &str, bytes: &[u8]) {
    for line in String::from_utf8_lossy(bytes).lines() {
        log.log(workload, level, context, line);
    }
}
