//! Figures of the KubeEdge mapper with the test stand-in EdgeCore and the FAKE agent (no
//! functions run: the agent's own density figures are `lichen bench`'s). Prints:
//! - twin round trip: a desired value set on the stand-in (`UpdateDevice`) to the reported
//!   value back at the stand-in, p50/p99, at the shortest report cycle (100 ms), which bounds it;
//! - 1000 devices: time to register them over DMI, the mapper's memory per device, and its CPU
//!   while each device reports a changed value every second.
//!
//! `cargo run --release -p lichen-kubeedge --example dmi_bench [-- --devices N --rounds N]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lichen_kubeedge::Running;
use lichen_kubeedge::mapper::MapperConfig;
use lichen_kubeedge::proto::ConfigValue;
use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::queue::SqliteQueue;
use lichen_kubeedge::workload::workload_name;
use support::fake::FakeAgent;
use support::standin::{EdgeCoreState, StandInEdgeCore};
use support::{DIGEST, device_with, led_model};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process, in clock ticks (100 per second on Linux).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

fn plain(name: &str, desired: &str, cycle_ms: i64) -> pb::Device {
    device_with(
        name,
        vec![("module", ConfigValue::Text(format!("sha256:{DIGEST}")))],
        desired,
        cycle_ms,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // A float-to-integer `as` saturates (NaN gives 0) and the index is clamped below.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let devices = arg("--devices", 1000);
    let rounds = arg("--rounds", 100);
    let dir = tempfile::tempdir().expect("a scratch directory");
    let agent = FakeAgent::new(&[DIGEST]);
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    let queue = Arc::new(SqliteQueue::open(&dir.path().join("kubeedge.db"), 1_000_000).unwrap());
    let config = MapperConfig {
        edgecore_socket: dir.path().join("dmi.sock"),
        mapper_socket: dir.path().join("lichen.sock"),
        max_devices: devices.max(1) + 1,
        ..MapperConfig::default()
    };
    let running = Running::start(agent.clone(), queue, config).await.unwrap();
    state
        .wait_for("registration", Duration::from_secs(30), |r| {
            !r.registrations.is_empty()
        })
        .await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(led_model()),
    })
    .await
    .unwrap();

    // Twin round trip.
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(plain("rt", "v0", 100)),
    })
    .await
    .unwrap();
    let mut times = Vec::with_capacity(rounds);
    for i in 1..=rounds {
        let value = format!("v{i}");
        let start = Instant::now();
        dmi.update_device(pb::UpdateDeviceRequest {
            device: Some(plain("rt", &value, 100)),
        })
        .await
        .unwrap();
        state
            .wait_for("the reported value", Duration::from_secs(30), |r| {
                r.twins.iter().rev().take(4).any(|t| {
                    t.device_name == "rt"
                        && t.reported_device
                            .iter()
                            .flat_map(|s| s.twins.iter())
                            .any(|tw| {
                                tw.property_name == "led"
                                    && tw.reported.as_ref().is_some_and(|v| v.value == value)
                            })
                })
            })
            .await;
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "twin round trip (desired on the stand-in -> set command -> reported at the stand-in), report cycle 100 ms, {rounds} rounds: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3
    );
    dmi.remove_device(pb::RemoveDeviceRequest {
        device_name: "rt".into(),
        device_namespace: "default".into(),
    })
    .await
    .unwrap();

    // Many devices.
    let rss_before = rss_kib();
    let start = Instant::now();
    for i in 0..devices {
        dmi.register_device(pb::RegisterDeviceRequest {
            device: Some(plain(&format!("d{i}"), "on", 1000)),
        })
        .await
        .unwrap();
    }
    let registered = start.elapsed();
    let rss_after = rss_kib();
    println!(
        "{devices} devices registered over DMI in {:.2} s ({:.0} per second); mapper memory {:.1} KiB per device (process RSS {} -> {} KiB)",
        registered.as_secs_f64(),
        devices as f64 / registered.as_secs_f64(),
        (rss_after.saturating_sub(rss_before)) as f64 / devices.max(1) as f64,
        rss_before,
        rss_after
    );
    // Every device's function publishes a new value every second for 10 s.
    let sent_before = state.with(|r| r.twins.len());
    let cpu_before = cpu_ticks();
    let start = Instant::now();
    for second in 0..10 {
        for i in 0..devices {
            agent.publish(
                &workload_name("default", &format!("d{i}")),
                "presses",
                &second.to_string(),
            );
        }
        tokio::time::sleep_until((start + Duration::from_secs(second + 1)).into()).await;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_ticks() - cpu_before;
    let sent = state.with(|r| r.twins.len()) - sent_before;
    println!(
        "{devices} devices each reporting a changed value every second for {:.0} s: {sent} twin reports reached the stand-in ({:.0}/s); process CPU {:.1} % of one core (mapper, stand-in and fake agent together)",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        cpu as f64 / elapsed.as_secs_f64()
    );
    running.shutdown().await;
    edgecore.stop().await;
}
