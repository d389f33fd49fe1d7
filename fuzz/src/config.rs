//! The agent config file and board profiles, read as `lichen run` reads them, then used as the
//! daemon uses them: engine sizing (a real Wasmtime engine is built), the log rate limiter,
//! the hub section (session settings, trusted keys, outbox quota, the MQTT session itself).
//!
//! The first byte picks the mode: 0 the config's text as it is, 1 a generated config, 2 a board
//! profile's text as it is, 3 a generated board profile.
//!
//! Properties beyond "no panic":
//! - an accepted config builds an engine or says why not, and its log rate and burst are finite
//!   and not negative (a rate limiter fed NaN lets everything through);
//! - an accepted board profile prints as TOML that parses back to it, and can be simulated.

use std::sync::Arc;

use arbitrary::Unstructured;
use lichen_agent::config::{AgentConfig, parse_size};
use lichen_agent::grants::DeviceHub;
use lichen_agent::hub;
use lichen_agent::logs::LogHub;
use lichen_agent::runtime::wasm::WasmEngine;
use lichen_devices::board::{Backend, BoardProfile};
use lichen_host_apis::{LogLevel, LogSink};
use lichen_sync::{Quota, SyncSession, Topics, testing::FakeOutbox};

use crate::input::{self, Doc, int, one_in, pick};

/// The `agent_config` target.
pub fn agent_config(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    match mode % 4 {
        0 => config(&input::text(rest), &dir),
        1 => {
            let mut u = Unstructured::new(rest);
            let text = config_document(&mut u, &dir).to_toml();
            config(&text, &dir)
        }
        2 => board(&input::text(rest)),
        _ => board(&board_document(&mut Unstructured::new(rest)).to_toml()),
    }
}

/// The raw-mode form of a generated input (first byte 0 or 2, then the text), which does not
/// depend on the generator. Generated TLS file paths point into a directory that is gone.
pub fn as_raw(data: &[u8]) -> Option<Vec<u8>> {
    let (mode, rest) = data.split_first()?;
    let mut u = Unstructured::new(rest);
    let (raw_mode, text) = match mode % 4 {
        1 => {
            let dir = tempfile::tempdir().ok()?;
            (0u8, config_document(&mut u, &dir).to_toml())
        }
        3 => (2, board_document(&mut u).to_toml()),
        _ => return None,
    };
    Some([&[raw_mode][..], text.as_bytes()].concat())
}

fn config(text: &str, dir: &tempfile::TempDir) {
    let path = dir.path().join("lichen.toml");
    std::fs::write(&path, text).expect("writing the config file");
    let Ok(config) = AgentConfig::load(Some(&path)) else {
        return;
    };
    if let Ok(options) = config.engine_options() {
        let _ = options.reserved_memory_bytes();
        // What `lichen run` does next; a refusal is fine, a panic is not.
        drop(WasmEngine::new(options));
    }
    if let Ok(options) = config.log_options() {
        assert!(
            options.lines_per_second.is_finite() && options.lines_per_second >= 0.0,
            "logs.lines-per-second = {} accepted",
            options.lines_per_second
        );
        assert!(
            options.burst.is_finite() && options.burst >= 0.0,
            "logs.burst = {} accepted",
            options.burst
        );
        let logs = LogHub::new(options);
        for i in 0..64 {
            logs.log("w", LogLevel::Warn, "fuzz", &format!("line {i}"));
        }
        let _ = logs.recent("w", usize::MAX);
        let _ = logs.take_unpersisted();
    }
    if let Some(section) = &config.hub {
        for key in &section.trusted_keys {
            let _ = hub::parse_public_key(key);
        }
        if let Ok(bytes) = parse_size(&section.outbox_quota) {
            let _ = Quota::new(bytes);
        }
        let _ = Topics::new(&section.node_id);
        if let Ok(settings) = hub::section_session_config(section) {
            let _ = SyncSession::new(settings, Arc::new(FakeOutbox::new()));
        }
    }
}

fn board(text: &str) {
    let Ok(profile) = BoardProfile::from_toml("board.toml", text) else {
        return;
    };
    let written = toml::to_string(&profile)
        .unwrap_or_else(|e| panic!("an accepted board profile does not serialise: {e}"));
    let back = BoardProfile::from_toml("again.toml", &written).unwrap_or_else(|e| {
        panic!("an accepted board profile does not parse back: {e}\n{written}")
    });
    assert_eq!(
        back, profile,
        "a board profile does not round-trip: {written}"
    );
    if profile.backend == Backend::Sim {
        let name = profile.name.clone();
        if let Err(e) = DeviceHub::from_profile(profile) {
            panic!("an accepted sim board profile {name:?} cannot be simulated: {e:#}");
        }
    }
}

/// A generated agent config; TLS file paths point at files in `dir` holding generated PEM.
fn config_document(u: &mut Unstructured<'_>, dir: &tempfile::TempDir) -> Doc {
    let mut top = Vec::new();
    if one_in(u, 4) {
        top.push(("state-dir".into(), Doc::Str(input::path(u))));
    }
    if one_in(u, 3) {
        top.push((
            "board".into(),
            Doc::s(pick(u, &["sim", "rpi5", "rpi4b", "nope", ""])),
        ));
    }
    if one_in(u, 2) {
        let mut wasm = Vec::new();
        if !one_in(u, 6) {
            wasm.push(("max-instances".into(), Doc::Int(input::number(u))));
        }
        if !one_in(u, 6) {
            wasm.push(("max-memory".into(), Doc::Str(input::size(u))));
        }
        if !one_in(u, 6) {
            wasm.push(("memory-guard".into(), Doc::Str(input::size(u))));
        }
        top.push(("wasm".into(), Doc::Table(wasm)));
    }
    if one_in(u, 2) {
        let mut logs = Vec::new();
        let rate = |u: &mut Unstructured<'_>| {
            if one_in(u, 3) {
                Doc::Int(input::number(u))
            } else {
                Doc::Float(pick(
                    u,
                    &[50.0, 0.0, -1.0, 0.5, 1e9, f64::NAN, f64::INFINITY, 1e308],
                ))
            }
        };
        for key in ["ring-lines", "persisted-lines"] {
            if !one_in(u, 6) {
                logs.push((key.into(), Doc::Int(input::number(u))));
            }
        }
        for key in ["lines-per-second", "burst"] {
            if !one_in(u, 6) {
                logs.push((key.into(), rate(u)));
            }
        }
        if !one_in(u, 6) {
            logs.push((
                "level".into(),
                Doc::s(pick(
                    u,
                    &[
                        "info", "trace", "debug", "warn", "error", "critical", "INFO",
                    ],
                )),
            ));
        }
        top.push(("logs".into(), Doc::Table(logs)));
    }
    if one_in(u, 2) {
        top.push(("hub".into(), hub_section(u, dir)));
    }
    if one_in(u, 10) {
        top.push((input::name(u), input::any_value(u, 0)));
    }
    Doc::Table(top)
}

fn hub_section(u: &mut Unstructured<'_>, dir: &tempfile::TempDir) -> Doc {
    let mut hub = vec![
        (
            "url".into(),
            Doc::s(pick(
                u,
                &[
                    "mqtt://127.0.0.1:1883",
                    "mqtts://hub.example:8883",
                    "mqtts://hub.example",
                    "mqtt://[::1]:1883",
                    "mqtt://h:0",
                    "mqtt://h:65536",
                    "mqtt://h:-1",
                    "mqtt://",
                    "mqtt://:1883",
                    "http://h",
                    "mqtt://user@h:1883/path",
                    "",
                ],
            )),
        ),
        ("node-id".into(), Doc::Str(input::name(u))),
    ];
    let pem = |u: &mut Unstructured<'_>, file: &str| -> Doc {
        let body: Vec<u8> = u.arbitrary().unwrap_or_default();
        let text = match int(u, 0..=2) {
            0 => format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                hub::base64_encode(&body)
            ),
            1 => format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                hub::base64_encode(&body)
            ),
            _ => String::from_utf8_lossy(&body).into_owned(),
        };
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("writing a PEM file");
        Doc::Str(path.display().to_string())
    };
    if one_in(u, 2) {
        hub.push(("ca-file".into(), pem(u, "ca.pem")));
    }
    if one_in(u, 3) {
        hub.push(("client-cert".into(), pem(u, "node.pem")));
        if !one_in(u, 4) {
            hub.push(("client-key".into(), pem(u, "node.key")));
        }
    }
    if one_in(u, 3) {
        hub.push(("username".into(), Doc::Str(input::name(u))));
    }
    if one_in(u, 3) {
        hub.push(("password".into(), Doc::Str(input::name(u))));
    }
    if one_in(u, 2) {
        let n = int(u, 0..=3);
        let keys = (0..n)
            .map(|_| {
                let bytes: Vec<u8> = (0..int::<u8>(u, 0..=40)).collect();
                Doc::Str(match int(u, 0..=3) {
                    0 => hex::encode(crate::keys::trusted().public),
                    1 => hub::base64_encode(&bytes),
                    2 => hex::encode(&bytes),
                    _ => input::name(u),
                })
            })
            .collect();
        hub.push(("trusted-keys".into(), Doc::Arr(keys)));
    }
    if one_in(u, 2) {
        hub.push(("outbox-quota".into(), Doc::Str(input::size(u))));
    }
    if one_in(u, 4) {
        hub.push((
            "insecure-dev".into(),
            Doc::Bool(u.arbitrary().unwrap_or(false)),
        ));
    }
    Doc::Table(hub)
}

/// A generated board profile: the schema's keys, names and numbers at their edges.
fn board_document(u: &mut Unstructured<'_>) -> Doc {
    let n_pins = int(u, 0..=5);
    let pins = (0..n_pins)
        .map(|i| {
            let mut pin = vec![
                ("name".into(), Doc::Str(input::pin(u))),
                ("line".into(), Doc::Str(input::pin(u))),
            ];
            if one_in(u, 2) {
                pin.push(("physical".into(), Doc::Int(input::number(u))));
            }
            if one_in(u, 4) {
                pin.push(("note".into(), Doc::Str(format!("pin {i}"))));
            }
            Doc::Table(pin)
        })
        .collect();
    let n_spi = int(u, 0..=2);
    let spi = (0..n_spi)
        .map(|_| {
            let mut bus = vec![
                ("name".into(), Doc::Str(input::bus(u))),
                ("device".into(), Doc::Str(input::path(u))),
            ];
            if one_in(u, 2) {
                bus.push(("max_hz".into(), Doc::Int(input::number(u))));
            }
            if one_in(u, 2) {
                bus.push(("sim".into(), Doc::s(pick(u, &["mcp3008", "nope"]))));
            }
            Doc::Table(bus)
        })
        .collect();
    let n_i2c = int(u, 0..=2);
    let i2c = (0..n_i2c)
        .map(|_| {
            let mut bus = vec![
                ("name".into(), Doc::Str(input::bus(u))),
                ("device".into(), Doc::Str(input::path(u))),
            ];
            if one_in(u, 2) {
                let n = int(u, 0..=2);
                let sims = (0..n)
                    .map(|_| {
                        Doc::Table(vec![
                            (
                                "model".into(),
                                Doc::s(pick(u, &["tmp102", "bme280", "nope"])),
                            ),
                            (
                                "address".into(),
                                Doc::Int(pick(u, &[0x48, 0x76, 0, 0x7f, 0x80, 0x3ff, -1])),
                            ),
                        ])
                    })
                    .collect();
                bus.push(("sim".into(), Doc::Arr(sims)));
            }
            Doc::Table(bus)
        })
        .collect();
    let isolation = (0..int(u, 0..=3))
        .map(|_| Doc::s(pick(u, &["wasm", "container", "microvm", "vm"])))
        .collect();
    Doc::Table(vec![
        ("name".into(), Doc::Str(input::name(u))),
        ("description".into(), Doc::Str(input::name(u))),
        ("backend".into(), Doc::s(pick(u, &["sim", "linux", "x"]))),
        (
            "arch".into(),
            Doc::s(pick(u, &["host", "aarch64", "riscv64", "x86_64", "mips"])),
        ),
        ("isolation".into(), Doc::Arr(isolation)),
        ("pins".into(), Doc::Arr(pins)),
        ("spi".into(), Doc::Arr(spi)),
        ("i2c".into(), Doc::Arr(i2c)),
    ])
}
