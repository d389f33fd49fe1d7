//! # thermostat
//!
//! A simulated room with a heater and a thermostat that switches it with hysteresis.
//!
//! Every interval `tick` the room warms by 0.3 °C while the heater is on and cools by 0.1 °C
//! while it is off. The heater turns on when the room falls to `target - hysteresis` and off
//! when it reaches `target + hysteresis`; each switch is logged. After each tick the function
//! publishes `{"temp":T,"target":T,"heater":"on"|"off"}` on the telemetry stream `climate`.
//!
//! State lives in the default key-value bucket, so it survives restarts and hot reloads:
//! `temp` (starts at 18.0), `heater` (`on`/`off`) and `target` (set only by a command; when
//! absent the configured target applies).
//!
//! - Config: `target` in °C (default 21.0) and `hysteresis` in °C (default 0.5).
//! - Commands: `set-target` with payload `22.5` or `{"target": 22.5}` stores the new target
//!   and replies with it; `status` replies with the same JSON as the telemetry record.
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p thermostat` in `examples/`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::lichen::device::telemetry;
use crate::lichen::device::types::{Command, Tick};
use crate::wasi::keyvalue::store;
use crate::wasi::logging::logging::{Level, log};

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

/// Log context of every record this function writes.
const CONTEXT: &str = "thermostat";
/// Room temperature before the first tick, in °C.
const START_TEMP: f64 = 18.0;
/// How much the room warms per tick with the heater on, in °C.
const WARMING: f64 = 0.3;
/// How much the room cools per tick with the heater off, in °C.
const COOLING: f64 = 0.1;

/// Target from config, as `f64` bits (set by `init`).
static CONFIG_TARGET: AtomicU64 = AtomicU64::new(0);
/// Hysteresis from config, as `f64` bits (set by `init`).
static HYSTERESIS: AtomicU64 = AtomicU64::new(0);

struct Thermostat;

impl Guest for Thermostat {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let setting = |key: &str, default: f64| -> Result<f64, String> {
            match config.iter().find(|(k, _)| k == key) {
                None => Ok(default),
                Some((_, value)) => parse_number(value.trim())
                    .ok_or_else(|| format!("config {key:?} must be a number, got {value:?}")),
            }
        };
        let target = setting("target", 21.0)?;
        let hysteresis = setting("hysteresis", 0.5)?;
        if hysteresis < 0.0 {
            return Err(format!(
                "config \"hysteresis\" must not be negative, got {hysteresis}"
            ));
        }
        CONFIG_TARGET.store(target.to_bits(), Ordering::Relaxed);
        HYSTERESIS.store(hysteresis.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        match event {
            Event::Tick(tick) => on_tick(&tick).map(|()| None),
            Event::Command(command) => on_command(&command).map(Some),
            Event::GpioEdge(_) | Event::Stop => Ok(None),
        }
    }
}

/// The room as stored in the key-value bucket.
struct Room {
    bucket: store::Bucket,
    temp: f64,
    target: f64,
    heater: bool,
}

impl Room {
    fn load() -> Result<Room, String> {
        let bucket =
            store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))?;
        let temp = read(&bucket, "temp")?
            .map(|text| parse_number(&text).ok_or_else(|| corrupt("temp", &text)))
            .transpose()?
            .unwrap_or(START_TEMP);
        let target = read(&bucket, "target")?
            .map(|text| parse_number(&text).ok_or_else(|| corrupt("target", &text)))
            .transpose()?
            .unwrap_or_else(|| f64::from_bits(CONFIG_TARGET.load(Ordering::Relaxed)));
        let heater = read(&bucket, "heater")?.as_deref() == Some("on");
        Ok(Room {
            bucket,
            temp,
            target,
            heater,
        })
    }

    fn json(&self) -> String {
        format!(
            "{{\"temp\":{},\"target\":{},\"heater\":\"{}\"}}",
            number(self.temp),
            number(self.target),
            on_off(self.heater)
        )
    }
}

fn on_tick(tick: &Tick) -> Result<(), String> {
    let mut room = Room::load()?;
    let hysteresis = f64::from_bits(HYSTERESIS.load(Ordering::Relaxed));
    let change = if room.heater { WARMING } else { -COOLING };
    room.temp = round2(room.temp + change);
    let heater = if room.heater {
        room.temp < room.target + hysteresis
    } else {
        room.temp <= room.target - hysteresis
    };
    if heater != room.heater {
        room.heater = heater;
        log(
            Level::Info,
            CONTEXT,
            &format!(
                "tick {}: heater {} at {} °C (target {} °C)",
                tick.sequence,
                on_off(heater),
                number(room.temp),
                number(room.target)
            ),
        );
    }
    write(&room.bucket, "temp", &number(room.temp))?;
    write(&room.bucket, "heater", on_off(room.heater))?;
    telemetry::publish("climate", room.json().as_bytes())
        .map_err(|e| format!("cannot publish on stream \"climate\": {e:?}"))
}

fn on_command(command: &Command) -> Result<Vec<u8>, String> {
    match command.name.as_str() {
        "set-target" => {
            let target = parse_target(&command.payload)?;
            let room = Room::load()?;
            write(&room.bucket, "target", &number(target))?;
            log(
                Level::Info,
                CONTEXT,
                &format!("target set to {} °C", number(target)),
            );
            Ok(number(target).into_bytes())
        }
        "status" => Ok(Room::load()?.json().into_bytes()),
        other => Err(format!(
            "unknown command {other:?} (known: \"set-target\", \"status\")"
        )),
    }
}

/// Reads the payload of `set-target`: a number, or a JSON object `{"target": N}`.
fn parse_target(payload: &[u8]) -> Result<f64, String> {
    let bad = || {
        format!(
            "set-target needs a number or {{\"target\": N}}, got {:?}",
            String::from_utf8_lossy(payload)
        )
    };
    let text = std::str::from_utf8(payload).map_err(|_| bad())?.trim();
    if let Some(value) = parse_number(text) {
        return Ok(value);
    }
    let fields = text
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .ok_or_else(bad)?;
    let (key, value) = fields.split_once(':').ok_or_else(bad)?;
    if key.trim() != "\"target\"" {
        return Err(bad());
    }
    parse_number(value.trim()).ok_or_else(bad)
}

/// Parses a finite decimal number.
fn parse_number(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|value| value.is_finite())
}

/// Formats a temperature as a JSON number with at least one decimal (`21.0`, `18.3`).
fn number(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// Rounds to hundredths, so that repeated small steps do not drift (`18.299999`).
fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn on_off(heater: bool) -> &'static str {
    if heater { "on" } else { "off" }
}

fn corrupt(key: &str, text: &str) -> String {
    format!("stored {key:?} is not a number: {text:?}")
}

fn read(bucket: &store::Bucket, key: &str) -> Result<Option<String>, String> {
    let value = bucket
        .get(key)
        .map_err(|e| format!("cannot read {key:?}: {e:?}"))?;
    value
        .map(|bytes| String::from_utf8(bytes).map_err(|_| format!("stored {key:?} is not UTF-8")))
        .transpose()
}

fn write(bucket: &store::Bucket, key: &str, value: &str) -> Result<(), String> {
    bucket
        .set(key, value.as_bytes())
        .map_err(|e| format!("cannot write {key:?}: {e:?}"))
}

export!(Thermostat);
