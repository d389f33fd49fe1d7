//! # adc-sampler
//!
//! Reads channel 0 of an MCP3008 10-bit ADC over the SPI device its deployment names `adc`
//! on every interval `tick`, publishes `{"channel":0,"code":N,"volts":V}` on the telemetry
//! stream `adc` and keeps the last code in its key-value bucket (`code`).
//!
//! ```toml
//! [[workloads]]
//! name = "adc-sampler"
//! module = "adc-sampler.wasm"
//! triggers = [{ interval = "1s" }]
//! spi = [{ name = "adc", bus = "spi0.0", max-hz = 1000000 }]
//! ```
//!
//! - Config: `channel` (0 to 7, default 0) and `vref` in volts (default 3.3).
//! - Commands: `read` replies with a fresh code; `read-n` with a count N as payload makes N
//!   conversions within the one event and replies the last code (what `lichen bench devices`
//!   uses to measure SPI transactions from Wasm).
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p adc-sampler` in `examples/`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::lichen::device::spi;
use crate::lichen::device::telemetry;
use crate::wasi::keyvalue::store;

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

/// Channel to sample (set by `init`).
static CHANNEL: AtomicU64 = AtomicU64::new(0);
/// Reference voltage, as `f64` bits (set by `init`).
static VREF: AtomicU64 = AtomicU64::new(0);

struct AdcSampler;

impl Guest for AdcSampler {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let get = |key: &str| config.iter().find(|(k, _)| k == key).map(|(_, v)| v.trim());
        let channel = match get("channel") {
            None => 0,
            Some(text) => match text.parse::<u64>() {
                Ok(c) if c < 8 => c,
                _ => return Err(format!("config \"channel\" must be 0 to 7, got {text:?}")),
            },
        };
        let vref = match get("vref") {
            None => 3.3,
            Some(text) => text
                .parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0)
                .ok_or_else(|| {
                    format!("config \"vref\" must be a positive number, got {text:?}")
                })?,
        };
        CHANNEL.store(channel, Ordering::Relaxed);
        VREF.store(vref.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        match event {
            Event::Tick(_) => sample().map(|_| None),
            Event::Command(command) => match command.name.as_str() {
                "read" => read_code().map(|code| Some(code.to_string().into_bytes())),
                "read-n" => {
                    let text = String::from_utf8_lossy(&command.payload);
                    let count: u32 = text
                        .trim()
                        .parse()
                        .map_err(|_| format!("read-n wants a count as payload, got {text:?}"))?;
                    let mut code = 0;
                    for _ in 0..count {
                        code = read_code()?;
                    }
                    Ok(Some(code.to_string().into_bytes()))
                }
                other => Err(format!(
                    "unknown command {other:?}: expected read or read-n"
                )),
            },
            Event::GpioEdge(_) | Event::Stop => Ok(None),
        }
    }
}

/// One single-ended conversion: start bit, SGL/DIFF=1 and the channel, then 10 bits back.
fn read_code() -> Result<u16, String> {
    let channel = CHANNEL.load(Ordering::Relaxed) as u8;
    let adc = spi::open("adc").map_err(|e| format!("cannot open SPI device \"adc\": {e:?}"))?;
    let reads = adc
        .transaction(&[spi::Operation::Transfer(vec![
            0x01,
            0x80 | (channel << 4),
            0x00,
        ])])
        .map_err(|e| format!("SPI transaction failed: {e:?}"))?;
    let rx = reads
        .first()
        .filter(|rx| rx.len() == 3)
        .ok_or("the host returned no transfer data")?;
    Ok((u16::from(rx[1] & 0x03) << 8) | u16::from(rx[2]))
}

fn sample() -> Result<u16, String> {
    let code = read_code()?;
    let vref = f64::from_bits(VREF.load(Ordering::Relaxed));
    let volts = f64::from(code) * vref / 1024.0;
    let channel = CHANNEL.load(Ordering::Relaxed);
    let record = format!("{{\"channel\":{channel},\"code\":{code},\"volts\":{volts:.3}}}");
    telemetry::publish("adc", record.as_bytes())
        .map_err(|e| format!("cannot publish on stream \"adc\": {e:?}"))?;
    let bucket =
        store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))?;
    bucket
        .set("code", code.to_string().as_bytes())
        .map_err(|e| format!("cannot store the code: {e:?}"))?;
    Ok(code)
}

export!(AdcSampler);
