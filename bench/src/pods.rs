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
//! Longer than ~600 lines because it holds the whole fixture a pod figure needs (the agent and
//! containerd processes, `ctr` calls, an OCI image builder, two hand-encoded modules); it
//! splits into `pods/{harness,image}.rs` when a second containerd benchmark needs them.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::{Samples, Table, fmt_duration};
use crate::BenchArgs;
use lichen_agent::runtime::microvm::ResourceUsage;

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

/// The programs the benchmark runs.
struct Tools {
    lichen: PathBuf,
    shim_dir: PathBuf,
    busybox: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|file| file.is_file())
    })
}

impl Tools {
    fn find() -> Result<Self> {
        for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
            on_path(tool).with_context(|| {
                format!("{tool} is not on PATH (Debian: apt-get install containerd runc)")
            })?;
        }
        let busybox = on_path("busybox")
            .context("busybox is not on PATH (Debian: apt-get install busybox-static)")?;
        let lichen = std::env::current_exe().context("cannot find the lichen binary")?;
        let beside = lichen.with_file_name("containerd-shim-lichen-v1");
        let shim = if beside.is_file() {
            beside
        } else {
            on_path("containerd-shim-lichen-v1").with_context(|| {
                format!(
                    "containerd-shim-lichen-v1 is neither beside {} nor on PATH \
                     (cargo build -p lichen-shim)",
                    lichen.display()
                )
            })?
        };
        let shim_dir = shim
            .parent()
            .context("the shim has a directory")?
            .to_path_buf();
        Ok(Self {
            lichen,
            shim_dir,
            busybox,
        })
    }
}

/// Waits for `ready` with a deadline, polling every 20 ms; `alive` fails when the process
/// that should make it ready has gone.
fn wait_for(
    what: &str,
    mut ready: impl FnMut() -> bool,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        alive()?;
        if start.elapsed() > DEADLINE {
            bail!("{what} did not happen within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A child process, killed and reaped when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn still_running(child: &mut Child, name: &str, log: &Path) -> Result<()> {
    if let Some(status) = child.try_wait()? {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail = &text[text.floor_char_boundary(text.len().saturating_sub(3000))..];
        bail!("{name} exited with {status}:\n{tail}");
    }
    Ok(())
}

/// `lichen run` serving the task API.
struct Agent {
    child: std::cell::RefCell<Owned>,
    task_socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, tools: &Tools) -> Result<Self> {
        let state = dir.join("agent");
        std::fs::create_dir_all(&state)?;
        let task_socket = dir.join("task.sock");
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&tools.lichen)
            .arg("--socket")
            .arg(dir.join("api.sock"))
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .arg("--empty")
            .env(lichen_shim::SOCKET_ENV, &task_socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start lichen run")?;
        let agent = Self {
            child: std::cell::RefCell::new(Owned(child)),
            task_socket,
            log: log_path.clone(),
        };
        wait_for(
            "the agent serving the task API",
            || std::os::unix::net::UnixStream::connect(&agent.task_socket).is_ok(),
            || still_running(&mut agent.child.borrow_mut().0, "lichen run", &log_path),
        )?;
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.borrow().0.id()
    }
}

/// containerd with its own root, state, socket and config.
struct Containerd {
    _child: Owned,
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, tools: &Tools, task_socket: &Path) -> Result<Self> {
        let d = dir.join("containerd");
        for sub in ["root", "state", "opt"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            d = d.display()
        );
        std::fs::write(d.join("config.toml"), config)?;
        let path = format!(
            "{}:{}",
            tools.shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log_path = d.join("containerd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Owned(
            Command::new("containerd")
                .arg("--config")
                .arg(d.join("config.toml"))
                .env("PATH", path)
                .env(lichen_shim::SOCKET_ENV, task_socket)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start containerd")?,
        );
        let ctrd = |child: Owned| Self {
            _child: child,
            dir: d.clone(),
        };
        let socket = d.join("containerd.sock");
        wait_for(
            "containerd answering",
            || {
                socket.exists()
                    && Command::new("ctr")
                        .arg("--address")
                        .arg(&socket)
                        .arg("version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            },
            || still_running(&mut child.0, "containerd", &log_path),
        )?;
        Ok(ctrd(child))
    }

    fn ctr_command(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .arg("-n")
            .arg("lichen-bench")
            .stdin(Stdio::null());
        command
    }

    fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out: Output = self
            .ctr_command()
            .args(args)
            .output()
            .context("cannot run ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {args:?} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds a one-layer image holding `bytes` at `path` and imports it.
    fn import(&self, name: &str, path: &str, bytes: &[u8], entrypoint: &[&str]) -> Result<()> {
        let tar = image_tar(name, path, bytes, entrypoint)?;
        let file = self.dir.join(format!("{}.tar", path.replace('/', "-")));
        std::fs::File::create(&file)?.write_all(&tar)?;
        self.ctr_ok(&[
            "images",
            "import",
            "--all-platforms",
            &file.display().to_string(),
        ])?;
        std::fs::remove_file(&file)?;
        Ok(())
    }

    /// Runs `ctr run --rm ARGS`; returns the time to its first stdout line (which must hold
    /// `marker`) and to its exit.
    fn first_output(&self, args: &[&str], marker: &str) -> Result<(Duration, Duration)> {
        let start = Instant::now();
        let mut child = self
            .ctr_command()
            .arg("run")
            .arg("--rm")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run ctr")?;
        let stdout = child.stdout.take().context("ctr's stdout is piped")?;
        let mut line = String::new();
        BufReader::new(stdout.take(LINE_BYTES))
            .read_line(&mut line)
            .context("cannot read ctr's stdout")?;
        let first = start.elapsed();
        let out = child.wait_with_output().context("cannot wait for ctr")?;
        let exit = start.elapsed();
        if !line.contains(marker) || !out.status.success() {
            bail!(
                "ctr run {args:?} printed {line:?} and ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((first, exit))
    }

    /// Waits until task `id` is RUNNING; returns its pid.
    fn wait_running(&self, id: &str) -> Result<u32> {
        let mut pid = None;
        let mut last = String::new();
        wait_for(
            &format!("task {id} running"),
            || {
                last = self.ctr_ok(&["task", "ls"]).unwrap_or_default();
                pid = last.lines().find_map(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    (cols.first() == Some(&id) && cols.get(2) == Some(&"RUNNING"))
                        .then(|| cols.get(1).and_then(|p| p.parse().ok()))
                        .flatten()
                });
                pid.is_some()
            },
            || Ok(()),
        )
        .with_context(|| format!("ctr task ls: {last}"))?;
        pid.context("a running task has a pid")
    }

    /// Kills, deletes and removes the tasks and containers `ids`.
    fn remove_tasks(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id])?;
        }
        for id in ids {
            let mut stopped = false;
            wait_for(
                &format!("task {id} stopped"),
                || {
                    stopped = self.ctr_ok(&["task", "ls"]).is_ok_and(|t| {
                        t.lines()
                            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
                    });
                    stopped
                },
                || Ok(()),
            )?;
            self.ctr_ok(&["task", "delete", id])?;
            self.ctr_ok(&["containers", "delete", id])?;
        }
        Ok(())
    }
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn append(builder: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, bytes)?;
    Ok(())
}

/// An OCI image layout tarball of one layer holding `bytes` at `path` (mode 0755).
fn image_tar(name: &str, path: &str, bytes: &[u8], entrypoint: &[&str]) -> Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    if let Some((parent, _)) = path.rsplit_once('/') {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        layer.append_data(&mut header, format!("{parent}/"), std::io::empty())?;
    }
    append(&mut layer, path, bytes, 0o755)?;
    let layer = layer.into_inner()?;
    let config = serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [digest(&layer)] },
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&layer), "size": layer.len() }],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": { "io.containerd.image.name": name },
        }],
    })
    .to_string()
    .into_bytes();
    let mut out = tar::Builder::new(Vec::new());
    append(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut out, "index.json", &index, 0o644)?;
    for blob in [&layer, &config, &manifest] {
        let file = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        append(&mut out, &file, blob, 0o644)?;
    }
    Ok(out.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_encoded_modules_are_the_wat_they_document() {
        let hello = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 16) "lichen pod ready\n")
                (func (export "_start")
                  (i32.store (i32.const 0) (i32.const 16))
                  (i32.store (i32.const 4) (i32.const 17))
                  (drop (call 0 (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
        )
        .unwrap();
        let sleeper = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "poll_oneoff" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 200) "lichen pod sleeping\n")
                (func (export "_start")
                  (i32.store (i32.const 100) (i32.const 200))
                  (i32.store (i32.const 104) (i32.const 20))
                  (drop (call 0 (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 108)))
                  (i32.store8 (i32.const 8) (i32.const 0))
                  (i32.store (i32.const 16) (i32.const 1))
                  (i64.store (i32.const 24) (i64.const 1000000000))
                  (loop
                    (drop (call 1 (i32.const 0) (i32.const 304) (i32.const 1) (i32.const 400)))
                    (br 0))))"#,
        )
        .unwrap();
        assert_eq!(HELLO_WASM, hello.as_slice());
        assert_eq!(SLEEPER_WASM, sleeper.as_slice());
    }

    #[test]
    fn a_parent_pid_is_read_after_the_command_name() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }

    #[test]
    fn task_path_parts_are_read_back_for_the_rounds_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        std::fs::write(
            &log,
            "2026 INFO lichen_agent::pods: pod program ready task=lichen-0 artifact_us=900 cached=true\n\
             2026 INFO lichen_shim::service::rpc: pod task path timed task=lichen-0 bundle_us=100 mount_us=200 entrypoint_us=300 fifo_us=40 create_us=1000 start_us=500\n\
             2026 INFO lichen_shim::service::rpc: pod task path timed task=warm-lichen bundle_us=9999 mount_us=1 entrypoint_us=1 fifo_us=1 create_us=1 start_us=1\n",
        )
        .unwrap();
        let parts = task_path_parts(&log, "lichen-").unwrap();
        let got: Vec<(&str, Duration)> = parts
            .iter()
            .map(|(name, s)| (*name, s.percentile(50.0)))
            .collect();
        assert_eq!(got.len(), 7, "{got:?}");
        assert_eq!(got[0], ("bundle read", Duration::from_micros(100)));
        assert_eq!(
            got[5],
            (
                "of which program from the compile cache",
                Duration::from_micros(900)
            )
        );
        assert_eq!(got[6], ("Start", Duration::from_micros(500)));
    }

    #[test]
    fn image_tars_name_every_blob_by_its_digest() {
        let tar = image_tar("x/y:1", "bin/a", b"abc", &["/bin/a"]).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = 0;
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(digest(&bytes), format!("sha256:{hex}"));
                seen += 1;
            }
        }
        assert_eq!(seen, 3);
    }
}
