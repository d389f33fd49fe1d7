//! WIT host calls with arbitrary arguments: the host implementations of `lichen:device/gpio`,
//! `spi`, `i2c`, `wasi:keyvalue`, `wasi:logging`, `wasi:config` and `lichen:device/telemetry`
//! called directly, as a guest's calls reach them, on the simulated board, in any order, with
//! any names, handles (live, dropped, of another type, made up), buffers, lengths, addresses
//! and delays, under small limits so every limit is reached.
//!
//! Properties beyond "no panic", checked against a model after every call:
//! - a name outside the grants is refused (never opened); a granted one opens once at a time;
//! - an output's level on the board is what the guest set; an input reads what the world
//!   drives; once the instance is gone every output is back at its safe level and released;
//! - an SPI or I2C transaction returns one buffer per read of exactly the length asked, and
//!   an I2C address outside the grant is refused;
//! - key-value reads see the guest's own writes, lists see every key once, limits refuse what
//!   exceeds them and nothing else, a discarded call leaves the committed data as it was;
//! - telemetry and log lines respect their size and count limits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use arbitrary::Unstructured;
use lichen_devices::sim::SimBoard;
use lichen_devices::{InputConfig, Level, OutputConfig, SpiConfig};
use lichen_host_apis::device_types::{
    GpioError, GpioHost, HostDigitalInPin, HostDigitalOutPin, HostI2cBus, HostSpiDevice, I2cError,
    I2cHost, I2cOperation, Level as WitLevel, SpiError, SpiHost, SpiOperation,
};
use lichen_host_apis::host_types::{
    AtomicsHost, ConfigHost, HostBucket, KeyValueHost, LoggingHost, TelemetryError, TelemetryHost,
    WitLogLevel,
};
use lichen_host_apis::{
    Bucket, DeviceGrants, DeviceState, DigitalInPin, DigitalOutPin, GrantedI2c, GrantedInput,
    GrantedOutput, GrantedSpi, HostLimits, I2cBus, LogLevel, LogSink, SpiDevice,
};
use wasmtime::component::Resource;

use crate::input::{self, int, one_in, pick};

mod keyvalue;
use keyvalue::keyvalue;

const LIMITS: HostLimits = HostLimits {
    max_key_bytes: 16,
    max_value_bytes: 64,
    max_keys: 8,
    max_telemetry_bytes: 64,
    max_records_per_call: 4,
};

/// Most calls one input makes.
const MAX_CALLS: usize = 200;

/// The log lines a guest wrote, as the sink got them.
#[derive(Default)]
struct Lines(Mutex<Vec<(String, String)>>);

impl LogSink for Lines {
    fn log(&self, _workload: &str, _level: LogLevel, context: &str, message: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((context.to_owned(), message.to_owned()));
    }
}

/// What a live handle in the guest's table is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handle {
    Out,
    In,
    Spi,
    I2c,
    Bucket(String),
}

/// The model the host's answers are checked against.
#[derive(Default)]
struct Model {
    handles: BTreeMap<u32, Handle>,
    open: BTreeSet<&'static str>,
    led: Option<Level>,
    button: Level,
    committed: BTreeMap<(String, String), Vec<u8>>,
    visible: BTreeMap<(String, String), Vec<u8>>,
    records: usize,
}

/// The `host_calls` target.
pub fn host_calls(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let board = SimBoard::default_board().expect("the simulated board");
    let led = board
        .output("GPIO17", "fuzz", &OutputConfig::default())
        .expect("GPIO17 on the sim board");
    let button = board
        .input("GPIO27", "fuzz", &InputConfig::default())
        .expect("GPIO27 on the sim board");
    let spi = board
        .spi("spi0.0", SpiConfig::default())
        .expect("spi0.0 on the sim board");
    let i2c = board.i2c("i2c-1").expect("i2c-1 on the sim board");
    let mut grants = DeviceGrants::new();
    grants.add_output(
        "led",
        Arc::new(GrantedOutput::new("GPIO17", Level::Low, Box::new(led))),
    );
    grants.add_input(
        "button",
        Arc::new(GrantedInput::new("GPIO27", Box::new(button))),
    );
    grants.add_spi("adc", Arc::new(GrantedSpi::new("spi0.0", Box::new(spi))));
    grants.add_i2c(
        "env",
        Arc::new(GrantedI2c::new("i2c-1", vec![0x48, 0x76], Box::new(i2c))),
    );
    let config: BTreeMap<String, String> = [("step", "2"), ("name", "fuzz"), ("", "empty")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let lines = Arc::new(Lines::default());
    let mut host = DeviceState::new(
        Arc::from("w"),
        Arc::new(config.clone()),
        Arc::default(),
        lines.clone(),
        LIMITS,
    )
    .with_devices(Arc::new(grants));
    let mut model = Model::default();
    board.chip().drive("GPIO27", Level::Low).expect("drive");

    for _ in 0..MAX_CALLS {
        if u.is_empty() {
            break;
        }
        call(&mut u, &mut host, &mut model, &board, &config);
    }
    for (context, message) in lines.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        assert!(
            context.len() <= 128 + 3,
            "log context of {} bytes",
            context.len()
        );
        assert!(
            message.len() <= 4096 + 3,
            "log message of {} bytes",
            message.len()
        );
    }

    drop(host);
    assert_eq!(
        board.chip().level("GPIO17").expect("GPIO17"),
        Level::Low,
        "the output is not back at its safe level once the instance is gone"
    );
    assert_eq!(
        board.chip().consumer("GPIO17").expect("GPIO17"),
        None,
        "the output is still held once the instance is gone"
    );
}

/// A handle to pass: a live one of the model, or a made-up one.
fn handle<T: 'static>(u: &mut Unstructured<'_>, model: &Model) -> Resource<T> {
    let reps: Vec<u32> = model.handles.keys().copied().collect();
    let rep = if reps.is_empty() || one_in(u, 8) {
        pick(u, &[0, 1, 2, 7, 100, u32::MAX])
    } else {
        pick(u, &reps)
    };
    Resource::new_borrow(rep)
}

fn wants(model: &Model, rep: u32, kind: &Handle) -> bool {
    model.handles.get(&rep) == Some(kind)
}

fn call(
    u: &mut Unstructured<'_>,
    host: &mut DeviceState,
    model: &mut Model,
    board: &SimBoard,
    config: &BTreeMap<String, String>,
) {
    match int(u, 0..=24) {
        0 => {
            let name = pick(u, &["led", "button", "adc", "nope", ""]).to_owned();
            let result = GpioHost::get_output(host, name.clone());
            let expect_ok = name == "led" && !model.open.contains("gpio:led");
            assert_eq!(
                result.is_ok(),
                expect_ok,
                "get-output({name:?}): {result:?}"
            );
            match result {
                Ok(pin) => {
                    model.open.insert("gpio:led");
                    model.handles.insert(pin.rep(), Handle::Out);
                }
                Err(GpioError::PinNotAllowed(_)) => assert_ne!(name, "led"),
                Err(GpioError::AlreadyInUse(_)) => assert_eq!(name, "led"),
                Err(other) => panic!("get-output({name:?}): unexpected {other:?}"),
            }
        }
        1 => {
            let name = pick(u, &["button", "led", "nope"]).to_owned();
            let result = GpioHost::get_input(host, name.clone());
            let expect_ok = name == "button" && !model.open.contains("gpio:button");
            assert_eq!(result.is_ok(), expect_ok, "get-input({name:?}): {result:?}");
            if let Ok(pin) = result {
                model.open.insert("gpio:button");
                model.handles.insert(pin.rep(), Handle::In);
            }
        }
        2 | 3 => {
            let pin: Resource<DigitalOutPin> = handle(u, model);
            let rep = pin.rep();
            let level = if one_in(u, 2) {
                WitLevel::High
            } else {
                WitLevel::Low
            };
            let toggle = one_in(u, 3);
            let result = if toggle {
                HostDigitalOutPin::toggle(host, pin)
            } else {
                HostDigitalOutPin::set_level(host, pin, level)
            };
            assert_eq!(
                result.is_ok(),
                wants(model, rep, &Handle::Out),
                "{result:?}"
            );
            if result.is_ok() {
                let now = board.chip().level("GPIO17").expect("GPIO17");
                let expected = if toggle {
                    match model.led.unwrap_or(Level::Low) {
                        Level::Low => Level::High,
                        Level::High => Level::Low,
                    }
                } else {
                    match level {
                        WitLevel::High => Level::High,
                        WitLevel::Low => Level::Low,
                    }
                };
                assert_eq!(
                    now, expected,
                    "the output is not at the level the guest set"
                );
                model.led = Some(now);
            }
        }
        4 => {
            let pin: Resource<DigitalOutPin> = handle(u, model);
            let rep = pin.rep();
            let result = HostDigitalOutPin::is_set_high(host, pin);
            assert_eq!(
                result.is_ok(),
                wants(model, rep, &Handle::Out),
                "{result:?}"
            );
            if let Ok(high) = result {
                assert_eq!(high, model.led == Some(Level::High));
            }
        }
        5 => {
            let level = if one_in(u, 2) {
                Level::High
            } else {
                Level::Low
            };
            board.chip().drive("GPIO27", level).expect("drive");
            model.button = level;
        }
        6 => {
            let pin: Resource<DigitalInPin> = handle(u, model);
            let rep = pin.rep();
            let result = HostDigitalInPin::read_level(host, pin);
            assert_eq!(result.is_ok(), wants(model, rep, &Handle::In), "{result:?}");
            if let Ok(level) = result {
                let read = match level {
                    WitLevel::High => Level::High,
                    WitLevel::Low => Level::Low,
                };
                assert_eq!(read, model.button, "the input does not read what is driven");
            }
        }
        7 => drop_handle(u, host, model),
        8 => {
            let name = pick(u, &["adc", "led", "flash"]).to_owned();
            let result = SpiHost::open(host, name.clone());
            let expect_ok = name == "adc" && !model.open.contains("spi:adc");
            assert_eq!(result.is_ok(), expect_ok, "spi open({name:?}): {result:?}");
            if let Ok(device) = result {
                model.open.insert("spi:adc");
                model.handles.insert(device.rep(), Handle::Spi);
            }
        }
        9 | 10 => {
            let device: Resource<SpiDevice> = handle(u, model);
            let rep = device.rep();
            let ops: Vec<SpiOperation> = (0..int(u, 0..=5))
                .map(|_| match int(u, 0..=3) {
                    0 => SpiOperation::Read(length(u)),
                    1 => SpiOperation::Write(buffer(u)),
                    2 => SpiOperation::Transfer(buffer(u)),
                    _ => SpiOperation::DelayNs(pick(u, &[0, 1, 1000, 999_999])),
                })
                .collect();
            let wanted: Vec<u64> = ops
                .iter()
                .filter_map(|op| match op {
                    SpiOperation::Read(n) => Some(u64::from(*n)),
                    SpiOperation::Transfer(bytes) => Some(bytes.len() as u64),
                    _ => None,
                })
                .collect();
            let result = HostSpiDevice::transaction(host, device, ops);
            if !wants(model, rep, &Handle::Spi) {
                assert!(
                    result.is_err(),
                    "an SPI transaction on a bad handle succeeded"
                );
            }
            if let Ok(reads) = result {
                let got: Vec<u64> = reads.iter().map(|r| r.len() as u64).collect();
                assert_eq!(got, wanted, "SPI read buffers of the wrong lengths");
            } else if let Err(e) = result {
                assert!(matches!(e, SpiError::Bus(_)), "{e:?}");
            }
        }
        11 => {
            let name = pick(u, &["env", "adc", "eeprom"]).to_owned();
            let result = I2cHost::open(host, name.clone());
            let expect_ok = name == "env" && !model.open.contains("i2c:env");
            assert_eq!(result.is_ok(), expect_ok, "i2c open({name:?}): {result:?}");
            if let Ok(bus) = result {
                model.open.insert("i2c:env");
                model.handles.insert(bus.rep(), Handle::I2c);
            }
        }
        12 | 13 => {
            let bus: Resource<I2cBus> = handle(u, model);
            let rep = bus.rep();
            let address = pick(u, &[0x48u16, 0x76, 0x49, 0, 0x7f, 0x80, 0x148, u16::MAX]);
            let ops: Vec<I2cOperation> = (0..int(u, 0..=4))
                .map(|_| {
                    if one_in(u, 2) {
                        I2cOperation::Read(length(u))
                    } else {
                        I2cOperation::Write(buffer(u))
                    }
                })
                .collect();
            let wanted: Vec<u64> = ops
                .iter()
                .filter_map(|op| match op {
                    I2cOperation::Read(n) => Some(u64::from(*n)),
                    I2cOperation::Write(_) => None,
                })
                .collect();
            let result = HostI2cBus::transaction(host, bus, address, ops);
            let valid = wants(model, rep, &Handle::I2c);
            if valid && ![0x48, 0x76].contains(&address) {
                assert!(
                    matches!(result, Err(I2cError::AddressNotAllowed(a)) if a == address),
                    "address {address:#x} outside the grant: {result:?}"
                );
            }
            if !valid {
                assert!(
                    result.is_err(),
                    "an I2C transaction on a bad handle succeeded"
                );
            }
            if let Ok(reads) = result {
                let got: Vec<u64> = reads.iter().map(|r| r.len() as u64).collect();
                assert_eq!(got, wanted, "I2C read buffers of the wrong lengths");
            }
        }
        14 => {
            let identifier = match int(u, 0..=3) {
                0 => String::new(),
                1 => "a".repeat(pick(u, &[64usize, 65])),
                _ => pick(u, &["default", "b", "other"]).to_owned(),
            };
            let result = KeyValueHost::open(host, identifier.clone());
            assert_eq!(
                result.is_ok(),
                identifier.len() <= 64,
                "open({identifier:?})"
            );
            if let Ok(bucket) = result {
                let name = if identifier.is_empty() {
                    "default".to_owned()
                } else {
                    identifier
                };
                model.handles.insert(bucket.rep(), Handle::Bucket(name));
            }
        }
        15..=19 => keyvalue(u, host, model),
        20 => {
            let level = pick(
                u,
                &[
                    WitLogLevel::Trace,
                    WitLogLevel::Info,
                    WitLogLevel::Error,
                    WitLogLevel::Critical,
                ],
            );
            let context = text(u, &[0, 5, 127, 128, 129, 200]);
            let message = text(u, &[0, 10, 4095, 4096, 4097, 10_000]);
            LoggingHost::log(host, level, context, message);
        }
        21 => {
            let key = pick(u, &["step", "name", "", "missing"]).to_owned();
            let value = ConfigHost::get(host, key.clone()).expect("config get");
            assert_eq!(value.as_ref(), config.get(&key));
            let all = ConfigHost::get_all(host).expect("config get-all");
            assert_eq!(all.len(), config.len());
        }
        22 => {
            let stream = match int(u, 0..=2) {
                0 => pick(u, &["count", "env.temp_1-a", "a/b", "", "é"]).to_owned(),
                1 => "s".repeat(pick(u, &[64usize, 65])),
                _ => input::name(u),
            };
            let payload = vec![0u8; pick(u, &[0usize, 1, 64, 65, 100_000])];
            let stream_ok = !stream.is_empty()
                && stream.len() <= 64
                && stream
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            let expect_ok = stream_ok
                && payload.len() <= LIMITS.max_telemetry_bytes
                && model.records < LIMITS.max_records_per_call;
            let result = TelemetryHost::publish(host, stream.clone(), payload);
            assert_eq!(result.is_ok(), expect_ok, "publish({stream:?}): {result:?}");
            if let Err(TelemetryError::InvalidStream(_)) = result {
                assert!(!stream_ok);
            }
            if result.is_ok() {
                model.records += 1;
            }
        }
        23 => {
            let pending = host.take_pending();
            assert!(pending.telemetry.len() <= LIMITS.max_records_per_call);
            host.apply_committed(&pending);
            model.committed = model.visible.clone();
            model.records = 0;
        }
        _ => {
            host.discard_pending();
            model.visible = model.committed.clone();
            model.records = 0;
        }
    }
}

fn drop_handle(u: &mut Unstructured<'_>, host: &mut DeviceState, model: &mut Model) {
    // A guest drops a handle through its own type's destructor (the component model checks
    // that), so a live handle is dropped as what it is; a handle that is not live (dropped
    // already, never made) is tried through any of them and must be refused.
    let rep = handle::<()>(u, model).rep();
    let kind = model.handles.get(&rep).cloned();
    let kind_index = match &kind {
        Some(Handle::Out) => 0,
        Some(Handle::In) => 1,
        Some(Handle::Spi) => 2,
        Some(Handle::I2c) => 3,
        Some(Handle::Bucket(_)) => 4,
        None => int(u, 0..=4),
    };
    let result = match kind_index {
        0 => HostDigitalOutPin::drop(host, Resource::<DigitalOutPin>::new_own(rep)),
        1 => HostDigitalInPin::drop(host, Resource::<DigitalInPin>::new_own(rep)),
        2 => HostSpiDevice::drop(host, Resource::<SpiDevice>::new_own(rep)),
        3 => HostI2cBus::drop(host, Resource::<I2cBus>::new_own(rep)),
        _ => HostBucket::drop(host, Resource::<Bucket>::new_own(rep)),
    };
    assert_eq!(
        result.is_ok(),
        kind.is_some(),
        "drop of {kind:?} (rep {rep}): {result:?}"
    );
    if result.is_ok() {
        model.handles.remove(&rep);
        let key = match kind {
            Some(Handle::Out) => Some("gpio:led"),
            Some(Handle::In) => Some("gpio:button"),
            Some(Handle::Spi) => Some("spi:adc"),
            Some(Handle::I2c) => Some("i2c:env"),
            _ => None,
        };
        if let Some(key) = key {
            model.open.remove(key);
        }
    }
}

fn length(u: &mut Unstructured<'_>) -> u32 {
    pick(u, &[0, 1, 3, 64, 65_536, 65_537, u32::MAX])
}

fn buffer(u: &mut Unstructured<'_>) -> Vec<u8> {
    match int(u, 0..=3) {
        0 => vec![0x5a; pick(u, &[0usize, 32_768, 65_536, 65_537])],
        _ => {
            let len = int::<usize>(u, 0..=16);
            u.bytes(len).unwrap_or_default().to_vec()
        }
    }
}

fn text(u: &mut Unstructured<'_>, lengths: &[usize]) -> String {
    let len = pick(u, lengths);
    let unit = pick(u, &["a", "é", "🦀", "\n", "\u{202e}"]);
    unit.repeat(len.div_ceil(unit.len().max(1)))
}
