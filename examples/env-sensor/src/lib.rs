//! # env-sensor
//!
//! Reads a TMP102 temperature sensor (or a BME280, with `sensor = "bme280"`) over the I2C bus
//! its deployment names `env` on every interval `tick`, publishes `{"celsius":T}` on the
//! telemetry stream `temperature` (a BME280 adds `"pascal"` and `"humidity"`) and keeps the
//! last reading in its key-value bucket (`celsius`).
//!
//! ```toml
//! [[workloads]]
//! name = "env-sensor"
//! module = "env-sensor.wasm"
//! triggers = [{ interval = "1s" }]
//! i2c = [{ name = "env", bus = "i2c-1", addresses = [0x48] }]
//! ```
//!
//! - Config: `sensor`, `tmp102` (default) or `bme280`; `address`, the sensor's 7-bit address
//!   in decimal or `0x` hex (default 0x48 for a TMP102, 0x76 for a BME280).
//! - Commands: `read` replies with a fresh reading; `read-at` with an address as payload
//!   reads from that address and replies with the reading or the host's error
//!   (`address-not-allowed(N)` outside the grant), without failing.
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p env-sensor` in `examples/`.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

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
/// The sensor is a BME280 rather than a TMP102 (set by `init`).
static BME280: AtomicBool = AtomicBool::new(false);

struct EnvSensor;

impl Guest for EnvSensor {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        match config
            .iter()
            .find(|(k, _)| k == "sensor")
            .map(|(_, v)| v.trim())
        {
            None | Some("tmp102") => {}
            Some("bme280") => {
                BME280.store(true, Ordering::Relaxed);
                ADDRESS.store(0x76, Ordering::Relaxed);
            }
            Some(other) => {
                return Err(format!(
                    "config \"sensor\" must be tmp102 or bme280, got {other:?}"
                ));
            }
        }
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

/// One reading in °C from the configured sensor at `address`.
fn read_celsius(address: u16) -> Result<f32, i2c::Error> {
    if BME280.load(Ordering::Relaxed) {
        return bme280::measure(address).map(|m| m.celsius);
    }
    read_tmp102(address)
}

/// Points at the temperature register and reads it: 12 bits, 1/16 °C per step, left-aligned
/// (13 bits when bit 0 says extended mode).
fn read_tmp102(address: u16) -> Result<f32, i2c::Error> {
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
    let address = ADDRESS.load(Ordering::Relaxed);
    let (celsius, record) = if BME280.load(Ordering::Relaxed) {
        let m = bme280::measure(address).map_err(|e| describe(&e))?;
        (
            m.celsius,
            format!(
                "{{\"celsius\":{},\"pascal\":{},\"humidity\":{}}}",
                m.celsius, m.pascal, m.humidity
            ),
        )
    } else {
        let celsius = read_tmp102(address).map_err(|e| describe(&e))?;
        (celsius, format!("{{\"celsius\":{celsius}}}"))
    };
    telemetry::publish("temperature", record.as_bytes())
        .map_err(|e| format!("cannot publish on stream \"temperature\": {e:?}"))?;
    let bucket =
        store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))?;
    bucket
        .set("celsius", celsius.to_string().as_bytes())
        .map_err(|e| format!("cannot store the reading: {e:?}"))?;
    Ok(celsius)
}

export!(EnvSensor);

/// The BME280, as its datasheet (BST-BME280-DS002) says to read it: calibration from
/// 0x88..=0xA1 and 0xE1..=0xE7, a forced measurement at oversampling x1, the burst read of
/// 0xF7..=0xFE, and the integer compensation of section 4.2.3.
mod bme280 {
    use super::i2c;

    /// One compensated measurement.
    pub struct Measurement {
        pub celsius: f32,
        pub pascal: f32,
        pub humidity: f32,
    }

    fn read(
        bus: &i2c::I2cBus,
        address: u16,
        register: u8,
        len: u32,
    ) -> Result<Vec<u8>, i2c::Error> {
        let mut reads = bus.transaction(
            address,
            &[
                i2c::Operation::Write(vec![register]),
                i2c::Operation::Read(len),
            ],
        )?;
        match reads.pop() {
            Some(bytes) if bytes.len() == len as usize => Ok(bytes),
            _ => Err(i2c::Error::Bus("the host returned no read data".into())),
        }
    }

    pub fn measure(address: u16) -> Result<Measurement, i2c::Error> {
        let bus = i2c::open("env")?;
        let id = read(&bus, address, 0xD0, 1)?;
        if id[0] != 0x60 {
            return Err(i2c::Error::Bus(format!(
                "chip id {:#04x} at {address:#04x} is not a BME280 (0x60)",
                id[0]
            )));
        }
        let a = read(&bus, address, 0x88, 26)?;
        let b = read(&bus, address, 0xE1, 7)?;
        let u = |i: usize| i32::from(u16::from_le_bytes([a[i], a[i + 1]]));
        let s = |i: usize| i32::from(i16::from_le_bytes([a[i], a[i + 1]]));
        // ctrl_hum x1, then ctrl_meas: temperature and pressure x1, forced mode.
        bus.transaction(
            address,
            &[i2c::Operation::Write(vec![0xF2, 0x01, 0xF4, 0x25])],
        )?;
        while read(&bus, address, 0xF3, 1)?[0] & 0x08 != 0 {}
        let d = read(&bus, address, 0xF7, 8)?;
        let twenty =
            |i: usize| i32::from(d[i]) << 12 | i32::from(d[i + 1]) << 4 | i32::from(d[i + 2]) >> 4;
        let (adc_p, adc_t) = (twenty(0), twenty(3));
        let adc_h = i32::from(u16::from_be_bytes([d[6], d[7]]));

        let (t1, t2, t3) = (u(0), s(2), s(4));
        let var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11;
        let var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14;
        let t_fine = var1 + var2;
        let centi = (t_fine * 5 + 128) >> 8;

        let p1 = i64::from(u(6));
        let [p2, p3, p4, p5, p6, p7, p8, p9] =
            [8, 10, 12, 14, 16, 18, 20, 22].map(|i| i64::from(s(i)));
        let mut var1 = i64::from(t_fine) - 128_000;
        let mut var2 = var1 * var1 * p6;
        var2 += (var1 * p5) << 17;
        var2 += p4 << 35;
        var1 = ((var1 * var1 * p3) >> 8) + ((var1 * p2) << 12);
        var1 = (((1i64 << 47) + var1) * p1) >> 33;
        let q8 = if var1 == 0 {
            0
        } else {
            let mut p = 1_048_576 - i64::from(adc_p);
            p = (((p << 31) - var2) * 3125) / var1;
            let var1 = (p9 * (p >> 13) * (p >> 13)) >> 25;
            let var2 = (p8 * p) >> 19;
            ((p + var1 + var2) >> 8) + (p7 << 4)
        };

        let h1 = i32::from(a[25]);
        let h2 = i32::from(i16::from_le_bytes([b[0], b[1]]));
        let h3 = i32::from(b[2]);
        let h4 = (i32::from(b[3] as i8) << 4) | i32::from(b[4] & 0x0f);
        let h5 = (i32::from(b[5] as i8) << 4) | i32::from(b[4] >> 4);
        let h6 = i32::from(b[6] as i8);
        let mut v = t_fine - 76_800;
        v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16_384) >> 15)
            * (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32_768)) >> 10) + 2_097_152) * h2
                + 8192)
                >> 14);
        v -= ((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4;
        let v = v.clamp(0, 419_430_400);

        Ok(Measurement {
            celsius: centi as f32 / 100.0,
            pascal: q8 as f32 / 256.0,
            humidity: (v >> 12) as f32 / 1024.0,
        })
    }
}
