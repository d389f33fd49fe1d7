//! `kubeedge`: the KubeEdge device mapper in the real agent (real Wasmtime, real SQLite state
//! store, the simulated board), against a STAND-IN for EdgeCore's `DeviceManagerService`
//! (`kubeedge/tests/support/standin.rs`, the tests' own, written from KubeEdge's DMI
//! definitions; EdgeCore cannot be installed here). Everything runs in this process.
//!
//! - twin round trip: a desired value set on the stand-in (`UpdateDevice`) -> the `button-led`
//!   function's `set-led` command drives GPIO22 -> its reply -> `ReportDeviceStatus` back at
//!   the stand-in, p50/p99, at the shortest report cycle (100 ms), which bounds it;
//! - N Devices (default 1000, `--count`) registered over DMI, each its own live `counter`
//!   function ticking every second: time until all run, the process RSS growth per device;
//! - then, for 10 s, twin reports per second reaching the stand-in and the CPU of the whole
//!   process (agent, mapper and stand-in together).

#[path = "../../kubeedge/tests/support/objects.rs"]
mod objects;
#[path = "../../kubeedge/tests/support/standin.rs"]
mod standin;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lichen_agent::api::types::WorkloadState;
use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::proto::{ConfigValue, customized_value};
use lichen_kubeedge::workload::workload_name;
use standin::{EdgeCoreState, Record, StandInEdgeCore};

use super::devices::add_guest;
use super::idle::usage;
use super::{Samples, Table, fmt_count, fmt_duration, fmt_rate, open_agent};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::config::KubeEdgeSection;
use lichen_agent::kubeedge::KubeEdge;
use lichen_agent::util::{human_bytes, process_rss_bytes};

/// The shortest report cycle the mapper allows.
const CYCLE_MS: i64 = 100;
/// How long to wait for any one step before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(300);
/// How long reports and CPU are counted.
const WINDOW: Duration = Duration::from_secs(10);

/// Waits (on the stand-in's calls, not by polling) until `done` holds, up to [`DEADLINE`].
async fn wait(state: &EdgeCoreState, what: &str, done: impl FnMut(&Record) -> bool) -> Result<()> {
    tokio::time::timeout(DEADLINE, state.wait_for(what, DEADLINE * 2, done))
        .await
        .with_context(|| format!("stand-in EdgeCore: {what} did not happen within {DEADLINE:?}"))
}

/// The model of the counter Devices: `count`, read-only, from the function's telemetry.
fn counter_model() -> pb::DeviceModel {
    pb::DeviceModel {
        name: "counter-model".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceModelSpec {
            properties: vec![pb::ModelProperty {
                name: "count".into(),
                r#type: "int".into(),
                access_mode: "ReadOnly".into(),
                ..Default::default()
            }],
            commands: vec![],
        }),
    }
}

/// A Device running its own `counter` function, ticking every second; its `count` property is
/// the `count` field of the function's `count` telemetry records, reported every second.
fn counter_device(name: &str, digest: &str) -> pb::Device {
    pb::Device {
        name: name.into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceSpec {
            device_model_reference: "counter-model".into(),
            protocol: Some(pb::ProtocolConfig {
                protocol_name: "lichen".into(),
                config_data: Some(customized_value([
                    ("module", ConfigValue::Text(format!("sha256:{digest}"))),
                    (
                        "triggers",
                        ConfigValue::Text(r#"[{"interval":"1s"}]"#.into()),
                    ),
                ])),
            }),
            properties: vec![pb::DeviceProperty {
                name: "count".into(),
                visitors: Some(pb::VisitorConfig {
                    protocol_name: "lichen".into(),
                    config_data: Some(customized_value([(
                        "field",
                        ConfigValue::Text("count".into()),
                    )])),
                }),
                report_cycle: 1000,
                report_to_cloud: true,
                ..Default::default()
            }],
            methods: vec![],
        }),
        status: None,
    }
}

/// The button-led Device of the round trip: button on GPIO27, LED on GPIO22.
fn led_device(digest: &str, desired: &str) -> pb::Device {
    objects::device_with(
        "rt",
        vec![
            ("module", ConfigValue::Text(format!("sha256:{digest}"))),
            (
                "gpio",
                ConfigValue::Text(
                    r#"[{"name":"button","pin":"GPIO27","mode":"input","bias":"pull-up"},{"name":"led","pin":"GPIO22","mode":"output","initial":"low"}]"#
                        .into(),
                ),
            ),
            (
                "triggers",
                ConfigValue::Text(
                    r#"[{"gpio-edge":"button","edge":"both","debounce":"5ms"}]"#.into(),
                ),
            ),
        ],
        desired,
        CYCLE_MS,
    )
}

fn reported(record: &Record, name: &str, property: &str) -> usize {
    record
        .twins
        .iter()
        .filter(|t| t.device_name == name)
        .flat_map(|t| t.reported_device.iter().flat_map(|s| s.twins.iter()))
        .filter(|t| t.property_name == property && t.reported.is_some())
        .count()
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let devices = args.instances.unwrap_or(1000);
    let rounds = args.iterations.unwrap_or(50).max(1);
    let max = u32::try_from(devices + 16).context("--count is too large")?;
    let agent = open_agent(dir, Some(max)).await?;
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&dir.join("dmi.sock"), state.clone()).await;
    let section = KubeEdgeSection {
        enabled: true,
        edgecore_socket: dir.join("dmi.sock"),
        mapper_socket: dir.join("lichen.sock"),
        max_devices: devices as u64 + 16,
        ..KubeEdgeSection::default()
    };
    let kubeedge = KubeEdge::start(&agent, &section).await?;
    wait(&state, "registration", |r| !r.registrations.is_empty()).await?;
    let mut dmi = edgecore.mapper().await;

    // Twin round trip through button-led on the simulated board.
    let button_led = add_guest(&agent, "button-led").await?;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(objects::led_model()),
    })
    .await
    .context("CreateDeviceModel button-led-model")?;
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(led_device(&button_led, "off")),
    })
    .await
    .context("RegisterDevice rt")?;
    wait(&state, "the first report of rt", |r| {
        reported(r, "rt", "led") > 0
    })
    .await?;
    let mut round_trips = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let value = if round % 2 == 0 { "on" } else { "off" };
        let before = state.with(|r| reported(r, "rt", "led"));
        let started = Instant::now();
        dmi.update_device(pb::UpdateDeviceRequest {
            device: Some(led_device(&button_led, value)),
        })
        .await
        .context("UpdateDevice rt")?;
        wait(&state, "the desired value reported back", |r| {
            reported(r, "rt", "led") > before
                && r.twins
                    .iter()
                    .rev()
                    .filter(|t| t.device_name == "rt")
                    .flat_map(|t| t.reported_device.iter().flat_map(|s| s.twins.iter()))
                    .find(|t| t.property_name == "led")
                    .and_then(|t| t.reported.as_ref())
                    .is_some_and(|p| p.value == value)
        })
        .await?;
        round_trips.push(started.elapsed());
    }
    let round_trips = Samples::new(round_trips);

    // N devices, each a live counter function.
    let counter = agent
        .artifacts()
        .add(lichen_agent::embedded::COUNTER.to_vec())
        .await
        .context("cannot add the counter component")?
        .digest()
        .to_string();
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(counter_model()),
    })
    .await
    .context("CreateDeviceModel counter-model")?;
    let names: Vec<String> = (0..devices).map(|i| format!("counter-{i}")).collect();
    let workloads: std::collections::BTreeSet<String> =
        names.iter().map(|n| workload_name("default", n)).collect();
    let rss_before = process_rss_bytes().context("cannot read the process RSS")?;
    let started = Instant::now();
    for name in &names {
        dmi.register_device(pb::RegisterDeviceRequest {
            device: Some(counter_device(name, &counter)),
        })
        .await
        .with_context(|| format!("RegisterDevice {name}"))?;
    }
    let registered = started.elapsed();
    loop {
        let running = agent
            .ps()
            .await
            .into_iter()
            .filter(|w| w.state == WorkloadState::Running && workloads.contains(&w.name))
            .count();
        if running == devices {
            break;
        }
        if started.elapsed() > DEADLINE {
            bail!("{running} of {devices} device functions running after {DEADLINE:?}");
        }
        // A bench, not a test: 20 ms is the resolution of the figure.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_running = started.elapsed();
    let rss_after = process_rss_bytes().context("cannot read the process RSS")?;
    let per_device = rss_after.saturating_sub(rss_before) / devices.max(1) as u64;

    // Every device reports a changed count each second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let twins_before = state.with(|r| r.twins.len());
    let cpu_before = usage()?;
    let window = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let elapsed = window.elapsed().as_secs_f64();
    let cpu = usage()?.cpu_ns.saturating_sub(cpu_before.cpu_ns) as f64 / 1e9;
    let reports = state.with(|r| r.twins.len()) - twins_before;
    let reports_per_sec = reports as f64 / elapsed;
    let cpu_percent = 100.0 * cpu / elapsed;

    kubeedge.shutdown().await;
    edgecore.stop().await;
    agent.shutdown().await;

    let mut table = Table::new(format!(
        "kubeedge: the mapper in the real agent against a STAND-IN EdgeCore ({devices} devices, {rounds} round trips)"
    ));
    table.row(
        format!("twin round trip p50 (desired on the stand-in -> button-led on GPIO22 -> reported), report cycle {CYCLE_MS} ms"),
        fmt_duration(round_trips.percentile(50.0)),
        "-",
        "fake-host mapper: 101.5 ms",
    );
    table.row(
        "twin round trip p99",
        fmt_duration(round_trips.percentile(99.0)),
        "-",
        "fake-host mapper: 119.4 ms",
    );
    table.row(
        format!("{devices} Devices: RegisterDevice calls answered"),
        fmt_duration(registered),
        "-",
        "fake-host mapper: 0.43 s for 1000",
    );
    table.row(
        format!("{devices} Devices: all functions running"),
        fmt_duration(all_running),
        "-",
        "-",
    );
    table.row(
        "process RSS growth per device (function instance + workload + mapper)",
        human_bytes(per_device),
        "-",
        "fake-host mapper alone: 15.3 KiB",
    );
    table.row(
        "twin reports reaching the stand-in (each device's count changes every second)",
        format!("{}/s", fmt_rate(reports_per_sec)),
        format!(
            "{}/s",
            fmt_count(u64::try_from(devices).unwrap_or(u64::MAX))
        ),
        "-",
    );
    table.row(
        "CPU of the process (agent, mapper, stand-in) meanwhile",
        format!("{cpu_percent:.1} % of one core"),
        "-",
        "-",
    );
    table.note(format!(
        "RSS: {} before the Devices, {} with all {devices} running",
        human_bytes(rss_before),
        human_bytes(rss_after)
    ));
    table.note(
        "EdgeCore is a stand-in (the tests' own, from KubeEdge's DMI definitions), in this process",
    );
    table.print();
    Ok(vec![
        format!(
            "- kubeedge twin round trip (report cycle {CYCLE_MS} ms): p50 {}, p99 {}",
            fmt_duration(round_trips.percentile(50.0)),
            fmt_duration(round_trips.percentile(99.0))
        ),
        format!(
            "- kubeedge {devices} Devices over DMI: all running in {}, {} RSS per device",
            fmt_duration(all_running),
            human_bytes(per_device)
        ),
        format!(
            "- kubeedge reports: {}/s at {cpu_percent:.1} % of one core",
            fmt_rate(reports_per_sec)
        ),
    ])
}
