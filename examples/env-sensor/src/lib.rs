//! # env-sensor
//!
//! Reads a TMP102 temperature sensor over the I2C bus its deployment names `env` on every
//! interval `tick`, publishes `{"celsius":T}` on the telemetry stream `temperature` and keeps
//! the last reading in its key-value bucket (`celsius`).
//!
//! ```toml
//! [[workloads]]
//! name = "env-sensor"
//! module = "env-sensor.wasm"
//! triggers = [{ interval = "1s" }]
//! i2c = [{ name = "env", bus = "i2c-1", addresses = [0x48] }]
//! ```
//!
//! - Config: `address`, the sensor's 7-bit address in decimal or `0x` hex (default 0x48).
//! - Commands: `read` replies with a fresh reading; `read-at` with an address as payload
//!   reads from that address and replies with the reading or the host's error
//!   (`address-not-allowed(N)` outside the grant), without failing.
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p env-sensor` in `examples/`.

use std::sync::atomic::{AtomicU16, Ordering};

use crate::lichen::device::i2c;
use crate::lichen::device::telemetry;
use crate::wasi::keyvalue::store;

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

/// The sensor's address (set by `init`).
static ADDRESS: AtomicU16 = AtomicU16::new(0x48);

struct EnvSensor;

impl Guest for EnvSensor {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        if let Some((_, text)) = config.iter().find(|(k, _)| k == "address") {
            let address = parse_address(text)
                .ok_or_else(|| format!("config \"address\" must be 0 to 0x7f, got {text:?}"))?;
            ADDRESS.store(address, Ordering::Relaxed);
        }
        Ok(())
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        match event {
            Event::Tick(_) => sample().map(|_| None),
            Event::Command(command) => match command.name.as_str() {
                "read" => read_celsius(ADDRESS.load(Ordering::Relaxed))
                    .map_err(|e| format!("{e:?}"))
                    .map(|c| Some(format!("{c}").into_bytes())),
                "read-at" => {
                    let text = String::from_utf8_lossy(&command.payload);
                    let address =
                        parse_address(&text).ok_or_else(|| format!("not an address: {text:?}"))?;
                    Ok(Some(
                        match read_celsius(address) {
                            Ok(celsius) => format!("{celsius}"),
                            Err(e) => describe(&e),
                        }
                        .into_bytes(),
                    ))
                }
                other => Err(format!(
                    "unknown command {other:?}: expected read or read-at"
                )),
            },
            Event::GpioEdge(_) | Event::Stop => Ok(None),
        }
    }
}

fn parse_address(text: &str) -> Option<u16> {
    let text = text.trim();
    let value = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok()?,
        None => text.parse::<u16>().ok()?,
    };
    (value <= 0x7f).then_some(value)
}

fn describe(error: &i2c::Error) -> String {
    match error {
        i2c::Error::BusNotAllowed(why) => format!("bus-not-allowed: {why}"),
        i2c::Error::AddressNotAllowed(a) => format!("address-not-allowed({a})"),
        i2c::Error::NoAcknowledge(a) => format!("no-acknowledge({a})"),
        i2c::Error::Bus(why) => format!("bus: {why}"),
    }
}

/// Points at the temperature register and reads it: 12 bits, 1/16 °C per step, left-aligned
/// (13 bits when bit 0 says extended mode).
fn read_celsius(address: u16) -> Result<f32, i2c::Error> {
    let bus = i2c::open("env")?;
    let reads = bus.transaction(
        address,
        &[i2c::Operation::Write(vec![0x00]), i2c::Operation::Read(2)],
    )?;
    let bytes = reads
        .first()
        .filter(|b| b.len() == 2)
        .ok_or_else(|| i2c::Error::Bus("the host returned no read data".into()))?;
    let raw = i16::from_be_bytes([bytes[0], bytes[1]]);
    let steps = if bytes[1] & 0x01 == 1 {
        raw >> 3
    } else {
        raw >> 4
    };
    Ok(f32::from(steps) / 16.0)
}

fn sample() -> Result<f32, String> {
    let celsius = read_celsius(ADDRESS.load(Ordering::Relaxed)).map_err(|e| describe(&e))?;
    telemetry::publish(
        "temperature",
        format!("{{\"celsius\":{celsius}}}").as_bytes(),
    )
    .map_err(|e| format!("cannot publish on stream \"temperature\": {e:?}"))?;
    let bucket =
        store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))?;
    bucket
        .set("celsius", celsius.to_string().as_bytes())
        .map_err(|e| format!("cannot store the reading: {e:?}"))?;
    Ok(celsius)
}

export!(EnvSensor);
