//! `pods`: issue 12's figures for Wasm pods under containerd. The benchmark starts a containerd
//! of its own (own root, state, socket and config, CRI off, like `tests/tests/containerd.rs`)
//! and a `lichen run` agent serving the task API, imports three images built here offline
//! (a Wasm `hello`, a Wasm `sleeper`, the host's static busybox) and measures, in one run,
//! alternating the two runtimes:
//!
//! - pod start to first output: from spawning `ctr run --rm` to the first line on its stdout,
//!   with Lichen's shim (`io.containerd.lichen.v1`, the Wasm module precompiled and cached by
//!   a warm-up run) and with `containerd-shim-runc-v2` (busybox `echo`); then the ratio;
//! - what `ctr` alone costs (`ctr task ls` against the same containerd) and what creating the
//!   container costs before any runtime is involved (`ctr containers create`: snapshot and
//!   metadata): the part of both figures that is containerd's own;
//! - the shim's `start` process on its own (exec to exit, as containerd runs it, against the
//!   running agent in a scratch bundle): the part outside the agent that is Lichen's;
//! - memory per extra pod, as PSS (`/proc/PID/smaps_rollup`): the resident agent's growth with
//!   `--count` long-running Wasm pods, divided by the count, vs the runc shim process plus the
//!   container's process of each busybox `sleep` pod.
//!
//! It needs `containerd`, `ctr`, `containerd-shim-runc-v2`, `runc` and a static `busybox` on
//! `PATH`, and `containerd-shim-lichen-v1` beside the `lichen` binary or on `PATH`
//! (`cargo build -p lichen-shim`); it runs as root (containerd does).
//!
//! This file holds the figures (measuring and reporting); the fixture they need (the agent and
//! containerd processes, `ctr` calls) is in `pods/harness.rs`, the OCI image builder in
//! `pods/image.rs`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Samples, Table, fmt_duration};
use crate::BenchArgs;
use lichen_agent::runtime::microvm::ResourceUsage;

mod harness;
mod image;

use harness::{Agent, Containerd, Tools};

/// Lichen's runtime type.
const LICHEN: &str = "io.containerd.lichen.v1";
/// runc's shim v2.
const RUNC: &str = "io.containerd.runc.v2";
/// Default `ctr run` rounds per runtime (`--iterations`).
const ROUNDS: usize = 10;
/// Default long-running pods per runtime for the memory figure (`--count`).
const PODS: usize = 5;
/// Most rounds or pods accepted.
const MOST: usize = 200;
/// Longest wait for containerd, the agent or a task.
const DEADLINE: Duration = Duration::from_secs(60);
/// Longest first line read from `ctr run`'s stdout.
const LINE_BYTES: u64 = 4096;

const HELLO_IMAGE: &str = "lichen.bench/hello:1";
const SLEEPER_IMAGE: &str = "lichen.bench/sleeper:1";
const BUSYBOX_IMAGE: &str = "lichen.bench/busybox:1";
const WASM_MARKER: &str = "lichen pod ready";
const RUNC_MARKER: &str = "runc pod ready";

/// A WASI preview-1 command module that writes `lichen pod ready\n` to stdout and returns.
/// Hand-encoded (the agent has no WAT parser outside its tests); the test at the end checks
/// it against this text:
/// ```wat
/// (module
///   (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
///   (func (export "_start")) ;; stores iovec {16, 17} at 0, fd_write(1, 0, 1, 8), drop
///   (memory (export "memory") 1) (data (i32.const 16) "lichen pod ready\n"))
/// ```
const HELLO_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x02, 0x60, 0x04, 0x7f, 0x7f, 0x7f,
    0x7f, 0x01, 0x7f, 0x60, 0x00, 0x00, 0x02, 0x23, 0x01, 0x16, 0x77, 0x61, 0x73, 0x69, 0x5f, 0x73,
    0x6e, 0x61, 0x70, 0x73, 0x68, 0x6f, 0x74, 0x5f, 0x70, 0x72, 0x65, 0x76, 0x69, 0x65, 0x77, 0x31,
    0x08, 0x66, 0x64, 0x5f, 0x77, 0x72, 0x69, 0x74, 0x65, 0x00, 0x00, 0x03, 0x02, 0x01, 0x01, 0x05,
    0x03, 0x01, 0x00, 0x01, 0x07, 0x13, 0x02, 0x06, 0x6d, 0x65, 0x6d, 0x6f, 0x72, 0x79, 0x02, 0x00,
    0x06, 0x5f, 0x73, 0x74, 0x61, 0x72, 0x74, 0x00, 0x01, 0x0a, 0x1d, 0x01, 0x1b, 0x00, 0x41, 0x00,
    0x41, 0x10, 0x36, 0x02, 0x00, 0x41, 0x04, 0x41, 0x11, 0x36, 0x02, 0x00, 0x41, 0x01, 0x41, 0x00,
    0x41, 0x01, 0x41, 0x08, 0x10, 0x00, 0x1a, 0x0b, 0x0b, 0x17, 0x01, 0x00, 0x41, 0x10, 0x0b, 0x11,
    0x6c, 0x69, 0x63, 0x68, 0x65, 0x6e, 0x20, 0x70, 0x6f, 0x64, 0x20, 0x72, 0x65, 0x61, 0x64, 0x79,
    0x0a,
];

/// A WASI preview-1 command module that writes `lichen pod sleeping\n` and then sleeps a
/// second at a time (`poll_oneoff` on the monotonic clock) until it is stopped. Hand-encoded
/// like [`HELLO_WASM`] and checked against the same WAT as the containerd tests' sleeper.
const SLEEPER_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x02, 0x60, 0x04, 0x7f, 0x7f, 0x7f,
    0x7f, 0x01, 0x7f, 0x60, 0x00, 0x00, 0x02, 0x48, 0x02, 0x16, 0x77, 0x61, 0x73, 0x69, 0x5f, 0x73,
    0x6e, 0x61, 0x70, 0x73, 0x68, 0x6f, 0x74, 0x5f, 0x70, 0x72, 0x65, 0x76, 0x69, 0x65, 0x77, 0x31,
    0x08, 0x66, 0x64, 0x5f, 0x77, 0x72, 0x69, 0x74, 0x65, 0x00, 0x00, 0x16, 0x77, 0x61, 0x73, 0x69,
    0x5f, 0x73, 0x6e, 0x61, 0x70, 0x73, 0x68, 0x6f, 0x74, 0x5f, 0x70, 0x72, 0x65, 0x76, 0x69, 0x65,
    0x77, 0x31, 0x0b, 0x70, 0x6f, 0x6c, 0x6c, 0x5f, 0x6f, 0x6e, 0x65, 0x6f, 0x66, 0x66, 0x00, 0x00,
    0x03, 0x02, 0x01, 0x01, 0x05, 0x03, 0x01, 0x00, 0x01, 0x07, 0x13, 0x02, 0x06, 0x6d, 0x65, 0x6d,
    0x6f, 0x72, 0x79, 0x02, 0x00, 0x06, 0x5f, 0x73, 0x74, 0x61, 0x72, 0x74, 0x00, 0x02, 0x0a, 0x4d,
    0x01, 0x4b, 0x00, 0x41, 0xe4, 0x00, 0x41, 0xc8, 0x01, 0x36, 0x02, 0x00, 0x41, 0xe8, 0x00, 0x41,
    0x14, 0x36, 0x02, 0x00, 0x41, 0x01, 0x41, 0xe4, 0x00, 0x41, 0x01, 0x41, 0xec, 0x00, 0x10, 0x00,
    0x1a, 0x41, 0x08, 0x41, 0x00, 0x3a, 0x00, 0x00, 0x41, 0x10, 0x41, 0x01, 0x36, 0x02, 0x00, 0x41,
    0x18, 0x42, 0x80, 0x94, 0xeb, 0xdc, 0x03, 0x37, 0x03, 0x00, 0x03, 0x40, 0x41, 0x00, 0x41, 0xb0,
    0x02, 0x41, 0x01, 0x41, 0x90, 0x03, 0x10, 0x01, 0x1a, 0x0c, 0x00, 0x0b, 0x0b, 0x0b, 0x1b, 0x01,
    0x00, 0x41, 0xc8, 0x01, 0x0b, 0x14, 0x6c, 0x69, 0x63, 0x68, 0x65, 0x6e, 0x20, 0x70, 0x6f, 0x64,
    0x20, 0x73, 0x6c, 0x65, 0x65, 0x70, 0x69, 0x6e, 0x67, 0x0a,
];

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let dir = dir.to_path_buf();
    let rounds = args.iterations.unwrap_or(ROUNDS).clamp(1, MOST);
    let pods = args.instances.unwrap_or(PODS).clamp(1, MOST);
    tokio::task::spawn_blocking(move || measure(&dir, rounds, pods))
        .await
        .context("the pods benchmark task failed")?
}

/// What one run measured.
struct Figures {
    lichen: Samples,
    runc: Samples,
    lichen_exit: Samples,
    runc_exit: Samples,
    ctr_alone: Samples,
    create: Samples,
    shim_start: Samples,
    /// The task path's parts as the agent timed them, per Lichen round.
    parts: Vec<(&'static str, Samples)>,
    lichen_first: Duration,
    lichen_pss_per_pod: i64,
    lichen_rss_per_pod: i64,
    runc_pss_per_pod: u64,
    runc_rss_per_pod: u64,
    pods: usize,
}

fn measure(dir: &Path, rounds: usize, pods: usize) -> Result<Vec<String>> {
    let tools = Tools::find()?;
    let agent = Agent::start(dir, &tools)?;
    let ctrd = Containerd::start(dir, &tools, &agent.task_socket)?;
    ctrd.import(HELLO_IMAGE, "hello.wasm", HELLO_WASM, &["/hello.wasm"])?;
    ctrd.import(
        SLEEPER_IMAGE,
        "sleeper.wasm",
        SLEEPER_WASM,
        &["/sleeper.wasm"],
    )?;
    let busybox = std::fs::read(&tools.busybox)
        .with_context(|| format!("cannot read {}", tools.busybox.display()))?;
    ctrd.import(BUSYBOX_IMAGE, "bin/busybox", &busybox, &["/bin/busybox"])?;

    let lichen_run = |id: &str| {
        ctrd.first_output(
            &["--runtime", LICHEN, HELLO_IMAGE, id, "/hello.wasm"],
            WASM_MARKER,
        )
    };
    let runc_run = |id: &str| {
        ctrd.first_output(
            &[
                "--runtime",
                RUNC,
                BUSYBOX_IMAGE,
                id,
                "/bin/busybox",
                "echo",
                RUNC_MARKER,
            ],
            RUNC_MARKER,
        )
    };
    // The first Wasm run compiles the module (the agent caches it by digest); the first runc
    // run warms runc's and busybox's pages. Neither is in the samples.
    let (lichen_first, _) = lichen_run("warm-lichen")?;
    runc_run("warm-runc")?;

    let (mut lichen, mut runc, mut lichen_exit, mut runc_exit, mut ctr_alone, mut create) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (first, exit) = lichen_run(&format!("lichen-{round}"))?;
        lichen.push(first);
        lichen_exit.push(exit);
        let (first, exit) = runc_run(&format!("runc-{round}"))?;
        runc.push(first);
        runc_exit.push(exit);
        let start = Instant::now();
        ctrd.ctr_ok(&["task", "ls"])?;
        ctr_alone.push(start.elapsed());
        let id = format!("create-{round}");
        let start = Instant::now();
        ctrd.ctr_ok(&["containers", "create", HELLO_IMAGE, &id])?;
        create.push(start.elapsed());
        ctrd.ctr_ok(&["containers", "delete", &id])?;
    }

    let shim_start = shim_start_samples(dir, &tools, &agent.task_socket, rounds)?;
    let parts = task_path_parts(&agent.log, "lichen-")?;
    let (lichen_pss_per_pod, lichen_rss_per_pod) = lichen_memory(&ctrd, &agent, pods)?;
    let (runc_pss_per_pod, runc_rss_per_pod) = runc_memory(&ctrd, pods)?;
    let figures = Figures {
        lichen: Samples::new(lichen),
        runc: Samples::new(runc),
        lichen_exit: Samples::new(lichen_exit),
        runc_exit: Samples::new(runc_exit),
        ctr_alone: Samples::new(ctr_alone),
        create: Samples::new(create),
        shim_start,
        parts,
        lichen_first,
        lichen_pss_per_pod,
        lichen_rss_per_pod,
        runc_pss_per_pod,
        runc_rss_per_pod,
        pods,
    };
    Ok(report(&figures, rounds))
}

/// Runs the shim's `start` as containerd does (flags, `TTRPC_ADDRESS`, the bundle as its
/// working directory) against the running agent, `rounds` times; exec to exit.
fn shim_start_samples(
    dir: &Path,
    tools: &Tools,
    task_socket: &Path,
    rounds: usize,
) -> Result<Samples> {
    let bundle = dir.join("shim-start-bundle");
    std::fs::create_dir_all(&bundle)
        .with_context(|| format!("cannot create {}", bundle.display()))?;
    let shim = tools.shim_dir.join("containerd-shim-lichen-v1");
    let containerd = dir.join("containerd.sock");
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let start = Instant::now();
        let out = Command::new(&shim)
            .args(["-namespace", "lichen-bench", "-address"])
            .arg(&containerd)
            .args(["-id", &format!("shim-start-{round}"), "start"])
            .env(lichen_shim::SOCKET_ENV, task_socket)
            .env("TTRPC_ADDRESS", dir.join("containerd.sock.ttrpc"))
            .current_dir(&bundle)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", shim.display()))?;
        samples.push(start.elapsed());
        if !out.status.success() {
            bail!(
                "{} start failed: {}",
                shim.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::remove_dir_all(&bundle).ok();
    Ok(Samples::new(samples))
}

/// PSS and RSS growth of the agent per long-running Wasm pod.
fn lichen_memory(ctrd: &Containerd, agent: &Agent, pods: usize) -> Result<(i64, i64)> {
    let before = ResourceUsage::of_process(agent.pid());
    let ids: Vec<String> = (0..pods).map(|i| format!("lichen-sleeper-{i}")).collect();
    for id in &ids {
        ctrd.ctr_ok(&["run", "-d", "--runtime", LICHEN, SLEEPER_IMAGE, id])?;
    }
    for id in &ids {
        ctrd.wait_running(id)?;
    }
    let after = ResourceUsage::of_process(agent.pid());
    ctrd.remove_tasks(&ids)?;
    let per = |a: Option<u64>, b: Option<u64>| -> Result<i64> {
        let (a, b) = (
            a.context("the agent's smaps_rollup")?,
            b.context("the agent's smaps_rollup")?,
        );
        // i128 holds any difference of two u64 byte counts; the quotient is back in i64's range
        // for any pod count of at least one.
        let count = i128::try_from(pods.max(1)).unwrap_or(i128::MAX);
        let per = (i128::from(b) - i128::from(a)) / count;
        Ok(i64::try_from(per).unwrap_or(if per < 0 { i64::MIN } else { i64::MAX }))
    };
    Ok((
        per(before.pss_bytes, after.pss_bytes)?,
        per(before.rss_bytes, after.rss_bytes)?,
    ))
}

/// PSS and RSS of each busybox `sleep` pod's runc shim and container process, averaged.
fn runc_memory(ctrd: &Containerd, pods: usize) -> Result<(u64, u64)> {
    let ids: Vec<String> = (0..pods).map(|i| format!("runc-sleeper-{i}")).collect();
    for id in &ids {
        ctrd.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNC,
            BUSYBOX_IMAGE,
            id,
            "/bin/busybox",
            "sleep",
            "3600",
        ])?;
    }
    let (mut pss, mut rss) = (0u64, 0u64);
    for id in &ids {
        let pid = ctrd.wait_running(id)?;
        let shim = parent_of(pid).with_context(|| format!("the shim of pod {id} (pid {pid})"))?;
        for process in [pid, shim] {
            let usage = ResourceUsage::of_process(process);
            pss += usage.pss_bytes.unwrap_or(0);
            rss += usage.rss_bytes.unwrap_or(0);
        }
    }
    ctrd.remove_tasks(&ids)?;
    Ok((pss / pods as u64, rss / pods as u64))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces, so read after the last `)`.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A byte count as i64 for [`kib`], saturating (no process has 2^63 bytes).
fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn kib(bytes: i64) -> String {
    if bytes.abs() < 1 << 20 {
        format!("{} KiB", bytes / 1024)
    } else {
        // Only printed: f64 keeps the MiB figure to one decimal for any realistic size.
        let mib = bytes as f64 / f64::from(1u32 << 20);
        format!("{mib:.1} MiB")
    }
}

fn report(f: &Figures, rounds: usize) -> Vec<String> {
    let ratio = f.runc.percentile(50.0).as_secs_f64() / f.lichen.percentile(50.0).as_secs_f64();
    let p = |s: &Samples| {
        format!(
            "p50 {}, p99 {}",
            fmt_duration(s.percentile(50.0)),
            fmt_duration(s.percentile(99.0))
        )
    };
    let mut table = Table::new(format!(
        "pods: `ctr run` under containerd, Lichen shim vs runc shim ({rounds} rounds each, alternating)"
    ));
    table.row(
        "pod start to first output, Lichen (Wasm, module cached)",
        p(&f.lichen),
        "5x faster than runc",
        "-",
    );
    table.row(
        "pod start to first output, runc (busybox echo)",
        p(&f.runc),
        "-",
        "-",
    );
    table.row(
        "ratio runc / Lichen (p50)",
        format!("{ratio:.1}x"),
        ">= 5x",
        "-",
    );
    table.row(
        "Lichen first run (module compiled)",
        fmt_duration(f.lichen_first),
        "-",
        "-",
    );
    table.row(
        "`ctr run --rm` to exit, Lichen",
        p(&f.lichen_exit),
        "-",
        "-",
    );
    table.row("`ctr run --rm` to exit, runc", p(&f.runc_exit), "-", "-");
    table.row(
        "`ctr task ls` alone (ctr's own cost)",
        p(&f.ctr_alone),
        "-",
        "-",
    );
    table.row(
        "`ctr containers create` alone (snapshot + metadata: containerd's, same for both)",
        p(&f.create),
        "-",
        "-",
    );
    table.row(
        format!(
            "memory per extra pod, Lichen (agent growth / {} pods)",
            f.pods
        ),
        format!(
            "{} PSS ({} RSS)",
            kib(f.lichen_pss_per_pod),
            kib(f.lichen_rss_per_pod)
        ),
        "-",
        "-",
    );
    table.row(
        "memory per extra pod, runc (shim + container process)",
        format!(
            "{} PSS ({} RSS)",
            kib(signed(f.runc_pss_per_pod)),
            kib(signed(f.runc_rss_per_pod))
        ),
        "-",
        "-",
    );
    table.row(
        "shim `start` process alone (exec to exit: connect check, two bundle files, address)",
        p(&f.shim_start),
        "-",
        "-",
    );
    for (part, samples) in &f.parts {
        table.row(format!("Lichen task path: {part}"), p(samples), "-", "-");
    }
    table.note("Wasm pods run on the resident agent: its shim's `start` only prints the agent's task socket.");
    table.note("Task path parts are timed inside the agent (shim service and pod runtime); the rest of a start (ctr, containerd, the shim `start` process, the ttrpc connect) is outside it.");
    table.print();
    vec![
        format!(
            "- pods: start to first output Lichen p50 {} vs runc p50 {} ({ratio:.1}x, target >= 5x)",
            fmt_duration(f.lichen.percentile(50.0)),
            fmt_duration(f.runc.percentile(50.0)),
        ),
        format!(
            "- pods: memory per extra pod Lichen {} PSS vs runc {} PSS",
            kib(f.lichen_pss_per_pod),
            kib(signed(f.runc_pss_per_pod))
        ),
    ]
}

/// The parts of the task path the agent logged (`pod task path timed` from the shim service,
/// `pod program ready` from the pod runtime) for the tasks whose id starts with `prefix`.
fn task_path_parts(log: &Path, prefix: &str) -> Result<Vec<(&'static str, Samples)>> {
    const LOG_BYTES: u64 = 64 << 20;
    let mut text = String::new();
    std::fs::File::open(log)
        .with_context(|| format!("cannot open {}", log.display()))?
        .take(LOG_BYTES)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", log.display()))?;
    const PARTS: [(&str, &str); 7] = [
        ("bundle read", "bundle_us"),
        ("rootfs mount", "mount_us"),
        ("entrypoint read", "entrypoint_us"),
        ("FIFO open", "fifo_us"),
        ("agent Create", "create_us"),
        ("of which program from the compile cache", "artifact_us"),
        ("Start", "start_us"),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); PARTS.len()];
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(&format!(" {key}=")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    for line in text.lines() {
        let ours = line
            .split(" task=")
            .nth(1)
            .is_some_and(|t| t.starts_with(prefix));
        if !ours || !(line.contains("pod task path timed") || line.contains("pod program ready")) {
            continue;
        }
        for (i, (_, key)) in PARTS.iter().enumerate() {
            if let Some(us) = field(line, key) {
                samples[i].push(Duration::from_micros(us));
            }
        }
    }
    Ok(PARTS
        .iter()
        .zip(samples)
        .filter(|(_, s)| !s.is_empty())
        .map(|((name, _), s)| (*name, Samples::new(s)))
        .collect())
}

#[cfg(test)]
mod tests;
