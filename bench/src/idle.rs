//! `idle`: what the agent costs when nothing happens. The four device examples are deployed
//! on the simulated board (`blinky`, `adc-sampler`, `env-sensor` with 1 h interval triggers,
//! `button-led` with its `gpio-edge` trigger), and the process is watched for a quiet window:
//! CPU time of all its threads (`/proc/self/task/*/schedstat`, nanoseconds) and context
//! switches (`/proc/self/task/*/status`), each thread's wake-up counted once per switch.
//! An agent that waits for events costs ~0; a timer that fires when no workload asked for it
//! shows as switches per second.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::devices::add_guest;
use super::{Table, api, open_agent};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::api::types::WorkloadState;

/// Default quiet window (`--iterations` sets it in seconds).
const WINDOW: Duration = Duration::from_secs(10);
/// The target from the project's footprint issue: 0.1 % of a core.
const TARGET_PERCENT: f64 = 0.1;

/// CPU time and context switches of every thread of this process, summed.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Usage {
    pub(super) cpu_ns: u64,
    switches: u64,
}

pub(super) fn usage() -> Result<Usage> {
    let mut total = Usage::default();
    let tasks = std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")?;
    for task in tasks {
        let dir = task.context("cannot read /proc/self/task")?.path();
        // A thread that ended since the listing has no files left: it counts nothing.
        let Ok(schedstat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        total.cpu_ns += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
        for line in status.lines() {
            if let Some(value) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total.switches += value.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let window = args
        .iterations
        .map_or(WINDOW, |s| Duration::from_secs(s.max(1) as u64));
    let agent = open_agent(dir, Some(16)).await?;
    let mut digests = Vec::new();
    for name in ["blinky", "adc-sampler", "env-sensor", "button-led"] {
        digests.push(add_guest(&agent, name).await?);
    }
    let text = format!(
        "description = \"bench idle: the device examples, timers 1 h\"\n\n\
         [[workloads]]\nname = \"blinky\"\nmodule = \"sha256:{}\"\ntriggers = [{{ interval = \"1h\" }}]\n\
         gpio = [{{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }}]\n\n\
         [[workloads]]\nname = \"adc-sampler\"\nmodule = \"sha256:{}\"\ntriggers = [{{ interval = \"1h\" }}]\n\
         spi = [{{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }}]\n\n\
         [[workloads]]\nname = \"env-sensor\"\nmodule = \"sha256:{}\"\ntriggers = [{{ interval = \"1h\" }}]\n\
         i2c = [{{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }}]\n\n\
         [[workloads]]\nname = \"button-led\"\nmodule = \"sha256:{}\"\n\
         triggers = [{{ gpio-edge = \"button\", edge = \"both\", debounce = \"5ms\" }}]\n\
         gpio = [{{ name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\" }},\n\
         {{ name = \"led\", pin = \"GPIO22\", mode = \"output\", initial = \"low\" }}]\n",
        digests[0], digests[1], digests[2], digests[3]
    );
    agent
        .deploy_text("bench-idle.toml", &text, Path::new("/"))
        .await
        .map_err(api)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ps = agent.ps().await;
        if ps.len() == 4 && ps.iter().all(|w| w.state == WorkloadState::Running) {
            break;
        }
        if Instant::now() > deadline {
            let states: Vec<String> = ps
                .iter()
                .map(|w| format!("{} {}", w.name, w.state))
                .collect();
            bail!(
                "the device examples did not all start: {}",
                states.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let start-up work (status rows, log persisting, the blocking pool) settle first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = usage()?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = usage()?;
    let elapsed = started.elapsed().as_secs_f64();
    agent.shutdown().await;

    let cpu = after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e9;
    let percent = 100.0 * cpu / elapsed;
    let switches = after.switches.saturating_sub(before.switches) as f64 / elapsed;
    let mut table = Table::new(format!(
        "idle: the four device examples deployed (timers 1 h, one gpio-edge trigger), {:.0} s quiet",
        elapsed
    ));
    table.row(
        "agent CPU, all threads",
        format!(
            "{percent:.3} % of a core ({:.1} ms in {elapsed:.0} s)",
            cpu * 1e3
        ),
        format!("<= {TARGET_PERCENT} %"),
        "-",
    );
    table.row(
        "thread wake-ups (context switches)",
        format!("{switches:.1}/s"),
        "~0",
        "-",
    );
    table.note(
        "measured in the bench process, which hosts the agent (the bench thread sleeps through the window); CPU from /proc/self/task/*/schedstat, switches from their status files",
    );
    table.print();
    let mut summary = vec![format!(
        "- idle, four device examples deployed: {percent:.3} % of a core, {switches:.1} wake-ups/s (target <= {TARGET_PERCENT} %)."
    )];
    let dir = dir.to_path_buf();
    summary.extend(
        tokio::task::spawn_blocking(move || super::footprint::run(&dir))
            .await
            .context("the daemon footprint task failed")??,
    );
    Ok(summary)
}
