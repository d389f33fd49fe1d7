//! WASI preview-1 command modules: each run instantiates the module afresh and calls
//! `_start`; what it prints becomes the workload's log. They get WASI only: no device APIs,
//! no key-value state, no files, no network.

use std::collections::BTreeMap;
use std::time::Duration;

use lichen_host_apis::{LogLevel, LogSink};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::engine::EPOCH_TICK;
use super::instance::first_lines;
use super::limiter::MemoryLimiter;

/// Store data of a command module run.
pub struct CommandData {
    pub(crate) wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    ticks: u64,
}

/// Most output kept from one run, per stream.
const OUTPUT_CAPACITY: usize = 256 << 10;

/// Runs a command once. Returns `Ok(exit code)` or `Err(trap description)`.
pub async fn run_command(
    engine: &wasmtime::Engine,
    pre: wasmtime::InstancePre<CommandData>,
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
    let wasi = wasmtime_wasi::WasiCtx::builder()
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .envs(&env)
        .args(&[workload])
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build_p1();
    let data = CommandData {
        wasi,
        limiter: MemoryLimiter::new(memory_limit),
        ticks: 0,
    };
    let mut store = Store::new(engine, data);
    store.limiter(|d| &mut d.limiter);
    let slice_ticks =
        u64::try_from((time_slice.as_millis() / EPOCH_TICK.as_millis()).max(1)).unwrap_or(u64::MAX);
    store.epoch_deadline_callback(move |mut ctx| {
        let data = ctx.data_mut();
        data.ticks += 1;
        if data.ticks >= slice_ticks {
            return Err(wasmtime::format_err!(
                "preempted: the command ran longer than its time slice of {time_slice:?}"
            ));
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);

    let outcome = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    }
    .await;

    forward_lines(workload, log, LogLevel::Info, "stdout", &stdout.contents());
    forward_lines(workload, log, LogLevel::Warn, "stderr", &stderr.contents());
    match outcome {
        Ok(()) => Ok(0),
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
