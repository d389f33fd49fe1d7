//! `lichen bench`: figures for the claims in the README, measured in-process against the real
//! agent library (real SQLite, real Wasmtime) with a temporary state directory.
//!
//! | what | measures |
//! | --- | --- |
//! | `startup` | deploy of a precompiled component to its first handled event; the engine alone |
//! | `density` | process RSS with N live `counter` instances |
//! | `dispatch` | ticks per second across N instances, through the store's group commit |
//! | `reload` | hot reloads under a stream of commands: duration, events lost, handled twice |
//! | `idle` | CPU and thread wake-ups with the four device examples deployed and nothing happening; the daemon's RSS/PSS with no workloads and on its embedded default |
//! | `devices` | GPIO toggles and SPI transactions from Wasm vs native, edge to `on-event` latency (sim board) |
//! | `size` | the binary's size, and the static release binaries' if built |
//! | `sync` | hub link: durable outbox ingest, drain and catch-up against Mosquitto, bytes written per record, records lost across broker restarts + `kill -9` |
//! | `kubeedge` | the KubeEdge mapper in the agent against a stand-in EdgeCore: twin round trip p50/p99, 1000 Devices as live functions (time, RSS per device), reports/s and CPU |
//! | `isolation` | one trivial workload as Wasm, crun, runc and a QEMU microVM: start-to-ready p50/p99, PSS per instance, instances per 512 MiB |
//! | `guests` | the JavaScript and Python example guests: size, compile time and peak RSS on the node, precompiled load p50, agent RSS with 50 Python instances |
//! | `pods` | under a containerd of its own: `ctr run` to first output, Lichen's shim vs runc's, and memory per extra pod |
//!
//! `lichen bench` alone runs every group in its own child process (`startup`,
//! `density,dispatch`, `reload`, `idle`, `devices`, `size`), so each RSS figure starts from a fresh
//! process, and ends with one summary line per figure. `reload`, `idle`, `devices` and
//! `kubeedge` read the example guests from `examples/` (`scripts/build-examples`) or the
//! directory `LICHEN_EXAMPLE_GUESTS` names: the binary embeds only the default deployment's
//! `counter` and `thermostat`, and building it builds no guest. Benchmarks print figures; they assert nothing.
//! With `--json` (`lichen bench --json`), every figure goes out as one JSON document instead
//! ([`json::Document`]: name, value, unit, target per figure).

mod density;
mod devices;
mod figures;
mod fixture;
mod footprint;
mod guests;
mod idle;
mod isolation;
pub mod json;
#[cfg(feature = "kubeedge")]
mod kubeedge;
mod pods;
mod reload;
mod size;
mod startup;
mod sync;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use clap::Args;

use figures::{Samples, Table, fmt_count, fmt_duration, fmt_rate};
use fixture::{
    BenchDirs, WorkloadText, api, deployment_text, engine_setup, histogram, load_phases,
    module_bytes, open_agent, same_module_text,
};

/// Options of `lichen bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure: `startup`, `density`, `dispatch`, `reload`, `size`, `sync`, `pods`, `kubeedge`, `guests`, or
    /// several joined by commas [default: all, each group in its own process].
    pub what: Option<String>,
    /// How many workload instances to run; `pods`: long-running pods per
    /// runtime [default: 5]; `kubeedge`: Devices [default: 1000].
    #[arg(long = "count", visible_alias = "instances", value_name = "N")]
    pub instances: Option<usize>,
    /// How many events to deliver; for `sync`, records ingested and caught up [default:
    /// 100000].
    #[arg(long, value_name = "N")]
    pub events: Option<u64>,
    /// Module to measure [default: the embedded demo module].
    #[arg(long, value_name = "FILE")]
    pub module: Option<PathBuf>,
    /// Directory for the benchmark's state [default: a temporary directory].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Cold starts measured by `startup` [default: 200]; reloads done by `reload` [default: 50];
    /// rounds of broker restart + `kill -9` done by `sync` [default: 20]; `ctr run` rounds per
    /// runtime done by `pods` [default: 10].
    #[arg(long, value_name = "N")]
    pub iterations: Option<usize>,
    /// MicroVM boots measured by `isolation` [default: 3; each takes ~5 s under TCG].
    #[arg(long, value_name = "N")]
    pub microvms: Option<usize>,
}

/// Every benchmark, in the order `lichen bench` runs them.
pub const BENCHMARKS: [&str; 12] = [
    "startup",
    "density",
    "dispatch",
    "reload",
    "idle",
    "devices",
    "size",
    "isolation",
    "sync",
    "pods",
    "kubeedge",
    "guests",
];

/// How `lichen bench` without WHAT splits the benchmarks into child processes.
const GROUPS: [&str; 11] = [
    "startup",
    "density,dispatch",
    "reload",
    "idle",
    "devices",
    "size",
    "isolation",
    "sync",
    "pods",
    "kubeedge",
    "guests",
];

/// The line after which a run prints its summary lines.
const SUMMARY_HEADER: &str = "## Summary (one line per figure)";

/// Runs the benchmarks named in `args`.
///
/// The benchmarks run on a runtime of their own so that, unless `LICHEN_LOG` says otherwise,
/// the agent's per-deploy info lines stay off the terminal (and out of the timings).
pub async fn run(args: BenchArgs, as_json: bool) -> Result<()> {
    if as_json {
        json::enable();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lichen-bench".into())
        .spawn(move || {
            let result = bench_runtime().and_then(|runtime| {
                quiet_logs_on_this_thread();
                runtime.block_on(run_in_runtime(args))
            });
            let _ = tx.send(result);
        })
        .context("cannot start the benchmark thread")?;
    rx.await
        .context("the benchmark thread ended without a result")?
}

/// The agent's default threads (`[threads]`), so RSS figures count what the daemon runs.
fn bench_runtime() -> Result<tokio::runtime::Runtime> {
    let threads = lichen_agent::config::ThreadsSection::default();
    let stack = lichen_agent::config::parse_size(&threads.worker_stack)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.worker_count())
        .max_blocking_threads(threads.max_blocking)
        .thread_stack_size(usize::try_from(stack)?)
        .enable_all()
        .on_thread_start(quiet_logs_on_this_thread)
        .build()
        .context("cannot start the benchmark's async runtime")
}

/// Shows only warnings and errors on this thread, unless `LICHEN_LOG` is set.
fn quiet_logs_on_this_thread() {
    if std::env::var_os("LICHEN_LOG").is_some() {
        return;
    }
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_ansi(lichen_agent::util::stderr_colours())
        .finish();
    let guard = tracing::dispatcher::set_default(&tracing::Dispatch::new(subscriber));
    // The thread keeps this default for its whole life.
    std::mem::forget(guard);
}

async fn run_in_runtime(args: BenchArgs) -> Result<()> {
    match &args.what {
        None => match child_executable() {
            Some(exe) => tokio::task::spawn_blocking(move || run_children(&exe, &args))
                .await
                .context("the benchmark driver task failed")?,
            None => run_selected(&BENCHMARKS, &args).await,
        },
        Some(what) => {
            let selected = parse_what(what)?;
            run_selected(&selected, &args).await
        }
    }
}

/// Parses `startup` or `density,dispatch` into benchmark names.
fn parse_what(what: &str) -> Result<Vec<&'static str>> {
    let mut selected = Vec::new();
    for word in what.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let word = if word == "all" { None } else { Some(word) };
        match word {
            None => selected.extend(BENCHMARKS),
            Some(word) => {
                let name = BENCHMARKS.iter().find(|b| **b == word).with_context(|| {
                    format!(
                        "unknown benchmark {word:?}: use {} or all",
                        BENCHMARKS.join(", ")
                    )
                })?;
                selected.push(*name);
            }
        }
    }
    anyhow::ensure!(
        !selected.is_empty(),
        "no benchmark named: use {} or all",
        BENCHMARKS.join(", ")
    );
    Ok(selected)
}

/// The `lichen` binary, when this process is one, to run each group in a fresh process.
fn child_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let stem = exe.file_stem()?.to_str()?;
    (stem == "lichen").then_some(exe)
}

/// Runs every group in its own process, passes its tables through and prints all summary
/// lines at the end.
fn run_children(exe: &Path, args: &BenchArgs) -> Result<()> {
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    let mut merged = json::Document::default();
    for group in GROUPS {
        let mut command = Command::new(exe);
        command.arg("bench").arg(group);
        if json::enabled() {
            command.arg("--json");
        }
        if let Some(n) = args.instances {
            command.arg("--count").arg(n.to_string());
        }
        if let Some(n) = args.events {
            command.arg("--events").arg(n.to_string());
        }
        if let Some(n) = args.iterations {
            command.arg("--iterations").arg(n.to_string());
        }
        if let Some(n) = args.microvms {
            command.arg("--microvms").arg(n.to_string());
        }
        if let Some(module) = &args.module {
            command.arg("--module").arg(module);
        }
        if let Some(dir) = &args.state_dir {
            command.arg("--state-dir").arg(dir);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {} bench {group}", exe.display()))?;
        let stdout = child.stdout.take().context("the child's stdout is piped")?;
        let mut in_summary = false;
        let mut document = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read a benchmark's output")?;
            if json::enabled() {
                document.push_str(&line);
                document.push('\n');
            } else if line == SUMMARY_HEADER {
                in_summary = true;
            } else if in_summary {
                if !line.trim().is_empty() {
                    summary.push(line);
                }
            } else {
                println!("{line}");
            }
        }
        let status = child.wait().context("cannot wait for a benchmark")?;
        if json::enabled() {
            match serde_json::from_str::<json::Document>(&document) {
                Ok(part) => {
                    merged.figures.extend(part.figures);
                    merged.failed.extend(part.failed);
                }
                Err(err) => merged
                    .failed
                    .push(format!("{group}: its output is not a JSON document: {err}")),
            }
        }
        if !status.success() {
            summary.push(format!("- {group}: the benchmark failed ({status})"));
            failed.push(group);
        }
    }
    if json::enabled() {
        println!("{}", serde_json::to_string_pretty(&merged)?);
    } else {
        print_summary(&summary);
    }
    anyhow::ensure!(
        failed.is_empty(),
        "benchmarks failed: {} (see above)",
        failed.join(", ")
    );
    Ok(())
}

async fn run_selected(selected: &[&str], args: &BenchArgs) -> Result<()> {
    let dirs = BenchDirs::new(args.state_dir.as_deref())?;
    let has = |name: &str| selected.contains(&name);
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    let mut outcome = |name: &'static str, result: Result<Vec<String>>| match result {
        Ok(lines) => summary.extend(lines),
        Err(err) => {
            if json::enabled() {
                eprintln!("{name}: failed: {err:#}");
            } else {
                println!("\n{name}: failed: {err:#}\n");
            }
            summary.push(format!("- {name}: not measured: {err:#}"));
            failed.push(name);
        }
    };
    if has("startup") {
        let result = async { startup::run(&dirs.fresh("startup")?, args).await }.await;
        outcome("startup", result);
    }
    if has("density") || has("dispatch") {
        let result = async {
            density::run(
                &dirs.fresh("density")?,
                args,
                has("density"),
                has("dispatch"),
            )
            .await
        }
        .await;
        let name = if has("density") {
            "density"
        } else {
            "dispatch"
        };
        outcome(name, result);
    }
    if has("reload") {
        let result = async { reload::run(&dirs.fresh("reload")?, args).await }.await;
        outcome("reload", result);
    }
    if has("idle") {
        let result = async { idle::run(&dirs.fresh("idle")?, args).await }.await;
        outcome("idle", result);
    }
    if has("devices") {
        let result = async { devices::run(&dirs.fresh("devices")?, args).await }.await;
        outcome("devices", result);
    }
    if has("size") {
        outcome("size", size::run());
    }
    if has("isolation") {
        let result = async { isolation::run(&dirs.fresh("isolation")?, args).await }.await;
        outcome("isolation", result);
    }
    if has("sync") {
        let result = async { sync::run(&dirs.fresh("sync")?, args).await }.await;
        outcome("sync", result);
    }
    if has("pods") {
        let result = async { pods::run(&dirs.fresh("pods")?, args).await }.await;
        outcome("pods", result);
    }
    if has("kubeedge") {
        #[cfg(feature = "kubeedge")]
        let result = async { kubeedge::run(&dirs.fresh("kubeedge")?, args).await }.await;
        #[cfg(not(feature = "kubeedge"))]
        let result = Err(anyhow::anyhow!(
            "this build has no KubeEdge mapper (the `kubeedge` feature)"
        ));
        outcome("kubeedge", result);
    }
    if has("guests") {
        let result = async { guests::run(&dirs.fresh("guests")?, args).await }.await;
        outcome("guests", result);
    }
    if json::enabled() {
        let document = json::Document {
            figures: json::take(),
            failed: summary
                .iter()
                .filter(|l| l.contains(": not measured: "))
                .map(|l| l.trim_start_matches("- ").to_string())
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!("{SUMMARY_HEADER}");
        for line in &summary {
            println!("{line}");
        }
        println!();
    }
    anyhow::ensure!(
        failed.is_empty(),
        "benchmarks failed: {}",
        failed.join(", ")
    );
    Ok(())
}

fn print_summary(lines: &[String]) {
    println!("{SUMMARY_HEADER}");
    for line in lines {
        println!("{line}");
    }
    println!();
}

#[cfg(test)]
mod tests;
