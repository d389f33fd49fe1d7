//! # blinky
//!
//! Toggles the output pin its deployment names `led` on every interval `tick`, and keeps the
//! number of toggles and the level last driven in its key-value bucket (`toggles`, `level`).
//!
//! ```toml
//! [[workloads]]
//! name = "blinky"
//! module = "blinky.wasm"
//! triggers = [{ interval = "500ms" }]
//! gpio = [{ name = "led", pin = "GPIO17", mode = "output", initial = "low" }]
//! ```
//!
//! - Commands: `level` replies `high` or `low`, as the pin reports it; `toggle` toggles once
//!   and replies the new level; `toggle-n` with a count N as payload toggles N times within
//!   the one event, through the host API and nothing else (no key-value writes), and replies
//!   the final level (what `lichen bench devices` uses to measure a host call); `open` with a
//!   logical name as payload tries to open that output pin and replies `ok` or the error the
//!   host gave (`pin-not-allowed: ...` for a pin the deployment does not grant), without
//!   failing; `crash` traps on purpose (to see the output return to its safe state).
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p blinky` in `examples/`.

use crate::lichen::device::gpio;
use crate::lichen::device::types::Command;
use crate::wasi::keyvalue::{atomics, store};
use crate::wasi::logging::logging::{Level, log};

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

/// Log context of every record this function writes.
const CONTEXT: &str = "blinky";
/// Logical name of the pin in the deployment.
const LED: &str = "led";

struct Blinky;

impl Guest for Blinky {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        // Fail early, with the host's reason, if the deployment grants no `led` output.
        led()?;
        Ok(())
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        match event {
            Event::Tick(_) => toggle().map(|()| None),
            Event::Command(command) => on_command(&command).map(Some),
            Event::GpioEdge(_) | Event::Stop => Ok(None),
        }
    }
}

fn describe(error: &gpio::Error) -> String {
    match error {
        gpio::Error::PinNotAllowed(why) => format!("pin-not-allowed: {why}"),
        gpio::Error::AlreadyInUse(why) => format!("already-in-use: {why}"),
        gpio::Error::Hardware(why) => format!("hardware: {why}"),
    }
}

fn led() -> Result<gpio::DigitalOutPin, String> {
    gpio::get_output(LED).map_err(|e| describe(&e))
}

fn level_text(high: bool) -> &'static str {
    if high { "high" } else { "low" }
}

fn toggle() -> Result<(), String> {
    let pin = led()?;
    pin.toggle().map_err(|e| describe(&e))?;
    let high = pin.is_set_high().map_err(|e| describe(&e))?;
    let bucket =
        store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))?;
    atomics::increment(&bucket, "toggles", 1)
        .map_err(|e| format!("cannot count toggles: {e:?}"))?;
    bucket
        .set("level", level_text(high).as_bytes())
        .map_err(|e| format!("cannot store the level: {e:?}"))?;
    log(Level::Debug, CONTEXT, &format!("led {}", level_text(high)));
    Ok(())
}

fn on_command(command: &Command) -> Result<Vec<u8>, String> {
    match command.name.as_str() {
        "level" => {
            let high = led()?.is_set_high().map_err(|e| describe(&e))?;
            Ok(level_text(high).as_bytes().to_vec())
        }
        "toggle" => {
            toggle()?;
            let high = led()?.is_set_high().map_err(|e| describe(&e))?;
            Ok(level_text(high).as_bytes().to_vec())
        }
        "toggle-n" => {
            let text = String::from_utf8_lossy(&command.payload);
            let count: u32 = text
                .trim()
                .parse()
                .map_err(|_| format!("toggle-n wants a count as payload, got {text:?}"))?;
            let pin = led()?;
            for _ in 0..count {
                pin.toggle().map_err(|e| describe(&e))?;
            }
            let high = pin.is_set_high().map_err(|e| describe(&e))?;
            Ok(level_text(high).as_bytes().to_vec())
        }
        "crash" => panic!("crash requested by command {}", command.id),
        "open" => {
            let name = String::from_utf8_lossy(&command.payload).trim().to_string();
            Ok(match gpio::get_output(&name) {
                Ok(_) => b"ok".to_vec(),
                Err(e) => describe(&e).into_bytes(),
            })
        }
        other => Err(format!(
            "unknown command {other:?}: expected level, toggle, toggle-n, open or crash"
        )),
    }
}

export!(Blinky);
