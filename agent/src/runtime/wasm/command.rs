//! WASI command programs: preview-1 modules (exporting `_start`) and `wasi:cli/run`
//! components (what `cargo build --target wasm32-wasip2` makes of a `fn main`). Each run
//! instantiates the program afresh and runs it once; what it prints becomes the workload's
//! log, and its exit code the run's outcome (a component's is 0 or 1: WASI 0.2's
//! `wasi:cli/exit` carries only ok or err). They get WASI only: no device APIs, no key-value
//! state, no files, no network.

use std::collections::BTreeMap;
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
const OUTPUT_CAPACITY: usize = 256 << 10;

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

/// Runs a command once. Returns `Ok(exit code)` or `Err(trap description)`.
pub async fn run_command(
    engine: &wasmtime::Engine,
    program: CommandProgram,
    workload: &str,
    config: &BTreeMap<String, String>,
    log: &dyn LogSink,
    memory_limit: usize,
    time_slice: Duration,
) -> Result<i32, String> {
    let stdout = MemoryOutputPipe::new(OUTPUT_CAPACITY);
    let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
    let env: Vec<(String, String)> = config
        .iter()
        .map(|(k, v)| {
            (
                format!("LICHEN_{}", k.to_uppercase().replace('-', "_")),
                v.clone(),
            )
        })
        .collect();
    let mut builder = WasiCtxBuilder::new();
    builder
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .envs(&env)
        .args(&[workload])
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

    forward_lines(workload, log, LogLevel::Info, "stdout", &stdout.contents());
    forward_lines(workload, log, LogLevel::Warn, "stderr", &stderr.contents());
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
