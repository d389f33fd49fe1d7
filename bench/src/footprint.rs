//! The daemon's own footprint, part of the `idle` group: `lichen run` started as a child
//! process of this very binary on a temporary state directory, once with no workloads
//! (`--empty`), once on its embedded default deployment (fresh state: the two examples are
//! compiled first) and once again on that state (compiled artifacts cached). Each is read
//! from `/proc/PID/smaps_rollup` once its API answers and its workloads run, then stopped
//! with SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Table;
use lichen_agent::util::human_bytes;

/// How long a daemon may take to answer with its workloads running.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Quiet time after readiness before the reading (start-up tasks settle).
const SETTLE: Duration = Duration::from_secs(2);
/// The footprint target from the project's footprint issue.
const TARGET: &str = "<= 8 MB";

/// One reading of a process's memory, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    rss: u64,
    pss: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

fn read_footprint(pid: u32) -> Result<Footprint> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    Ok(Footprint {
        rss: field(&rollup, "Rss") * 1024,
        pss: field(&rollup, "Pss") * 1024,
        anon: field(&rollup, "Pss_Anon") * 1024,
        file: field(&rollup, "Pss_File") * 1024,
        threads: field(&status, "Threads"),
    })
}

/// Stops the child when dropped (on every path, errors included).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = i32::try_from(self.0.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

/// Starts `lichen run` on `state` with `extra` arguments, waits until `ps` lists `expected`
/// workloads, all running, and reads its footprint.
fn measure(exe: &Path, state: &Path, extra: &[&str], expected: usize) -> Result<Footprint> {
    let socket = state.join("api.sock");
    let child = Command::new(exe)
        .arg("run")
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .env("LICHEN_TASK_SOCKET", state.join("task.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {} run", exe.display()))?;
    let daemon = Daemon(child);
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let ps = Command::new(exe)
            .arg("--socket")
            .arg(&socket)
            .arg("--json")
            .arg("ps")
            .stderr(Stdio::null())
            .output()
            .context("cannot run lichen ps")?;
        if ps.status.success() {
            let text = String::from_utf8_lossy(&ps.stdout);
            let running = text.matches("\"running\"").count();
            if running >= expected {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon did not run its {expected} workloads within {READY_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(SETTLE);
    read_footprint(daemon.0.id())
}

/// Measures the daemon three ways and prints one table; returns the summary lines.
pub(super) fn run(dir: &Path) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let empty_dir = dir.join("footprint-empty");
    let default_dir = dir.join("footprint-default");
    let empty = measure(&exe, &empty_dir, &["--empty"], 0)?;
    let first = measure(&exe, &default_dir, &[], 2)?;
    let cached = measure(&exe, &default_dir, &[], 2)?;

    let mut table =
        Table::new("idle: the daemon alone (`lichen run`), its memory once its workloads run");
    for (what, f, target) in [
        ("no workloads (`lichen run --empty`)", empty, TARGET),
        (
            "embedded default (counter + thermostat), fresh state: compiles both first",
            first,
            "-",
        ),
        (
            "embedded default, restarted (compiled artifacts cached)",
            cached,
            "-",
        ),
    ] {
        table.row(
            what,
            format!(
                "RSS {} (PSS {}: anon {}, file {}), {} threads",
                human_bytes(f.rss),
                human_bytes(f.pss),
                human_bytes(f.anon),
                human_bytes(f.file),
                f.threads
            ),
            target,
            "-",
        );
    }
    table.note(
        "each daemon is a child of this binary with its own state directory and sockets, read from /proc/PID/smaps_rollup 2 s after its API listed its workloads running; file pages are the binary's code and data it touched",
    );
    table.print();
    Ok(vec![format!(
        "- Daemon with no workloads: RSS {} (PSS {}, anon {}), {} threads (target {TARGET}); embedded default restarted: RSS {}.",
        human_bytes(empty.rss),
        human_bytes(empty.pss),
        human_bytes(empty.anon),
        empty.threads,
        human_bytes(cached.rss),
    )])
}
