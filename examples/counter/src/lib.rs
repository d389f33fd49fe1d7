//! # counter
//!
//! The smallest useful Lichen device function: it counts ticks.
//!
//! On every interval `tick` it atomically adds `step` to the key `count` of its default
//! key-value bucket and publishes `{"count":N,"tick":SEQ}` on the telemetry stream `count`.
//!
//! - Config: `step`, a positive integer (default 1).
//! - Commands: `get` replies with the count as decimal text; `reset` sets it to 0 and
//!   replies `0`; `mark` adds 1 to the key `mark/<command id>` and to `marks` and replies with
//!   `marks` (one side effect per command: a command that ran twice leaves a 2). Any other
//!   command is an error.
//! - `stop` logs a line at info level.
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p counter` in `examples/`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::lichen::device::telemetry;
use crate::lichen::device::types::{Command, Tick};
use crate::wasi::keyvalue::{atomics, store};
use crate::wasi::logging::logging::{Level, log};

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

/// Log context of every record this function writes.
const CONTEXT: &str = "counter";
/// Key that holds the count, as decimal text (the format `atomics.increment` uses).
const COUNT_KEY: &str = "count";

/// How much each tick adds, set by `init` from config `step`.
static STEP: AtomicU64 = AtomicU64::new(1);

struct Counter;

impl Guest for Counter {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let step = match config.iter().find(|(key, _)| key == "step") {
            None => 1,
            Some((_, value)) => parse_step(value)?,
        };
        STEP.store(step, Ordering::Relaxed);
        log(Level::Info, CONTEXT, &format!("counting by {step}"));
        Ok(())
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        match event {
            Event::Tick(tick) => on_tick(&tick).map(|()| None),
            Event::Command(command) => on_command(&command).map(Some),
            Event::GpioEdge(_) => Ok(None),
            Event::Stop => {
                log(Level::Info, CONTEXT, "stopping");
                Ok(None)
            }
        }
    }
}

/// Parses config `step`: a positive integer.
fn parse_step(value: &str) -> Result<u64, String> {
    match value.trim().parse::<u64>() {
        Ok(step) if step > 0 => Ok(step),
        _ => Err(format!(
            "config \"step\" must be a positive integer, got {value:?}"
        )),
    }
}

fn bucket() -> Result<store::Bucket, String> {
    store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))
}

fn on_tick(tick: &Tick) -> Result<(), String> {
    let bucket = bucket()?;
    let step = STEP.load(Ordering::Relaxed);
    let count = atomics::increment(&bucket, COUNT_KEY, step)
        .map_err(|e| format!("cannot increment {COUNT_KEY:?}: {e:?}"))?;
    let record = format!("{{\"count\":{count},\"tick\":{}}}", tick.sequence);
    telemetry::publish("count", record.as_bytes())
        .map_err(|e| format!("cannot publish on stream \"count\": {e:?}"))?;
    log(
        Level::Debug,
        CONTEXT,
        &format!("tick {}: count is {count}", tick.sequence),
    );
    Ok(())
}

fn on_command(command: &Command) -> Result<Vec<u8>, String> {
    let bucket = bucket()?;
    match command.name.as_str() {
        "get" => {
            let stored = bucket
                .get(COUNT_KEY)
                .map_err(|e| format!("cannot read {COUNT_KEY:?}: {e:?}"))?;
            let count = match stored {
                None => 0,
                Some(bytes) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    .ok_or_else(|| format!("stored {COUNT_KEY:?} is not a number"))?,
            };
            Ok(count.to_string().into_bytes())
        }
        "reset" => {
            bucket
                .set(COUNT_KEY, b"0")
                .map_err(|e| format!("cannot reset {COUNT_KEY:?}: {e:?}"))?;
            log(Level::Info, CONTEXT, "count reset to 0");
            Ok(b"0".to_vec())
        }
        "mark" => {
            let key = format!("mark/{}", command.id);
            atomics::increment(&bucket, &key, 1)
                .map_err(|e| format!("cannot increment {key:?}: {e:?}"))?;
            let marks = atomics::increment(&bucket, "marks", 1)
                .map_err(|e| format!("cannot increment \"marks\": {e:?}"))?;
            Ok(marks.to_string().into_bytes())
        }
        other => Err(format!(
            "unknown command {other:?} (known: \"get\", \"reset\", \"mark\")"
        )),
    }
}

export!(Counter);
