//! `isolation`: the same trivial workload in each isolation tier, side by side in one run:
//! start-to-ready latency (p50/p99), memory per instance (PSS) and instances per 512 MiB, for
//! Wasm (in-process engine), crun and runc (OCI containers) and a QEMU microVM (accelerator
//! named), with the seed analysis's claims (sections 8.2.1 and 8.2.2) beside each figure.
//!
//! "Ready" is the workload's first sign of life: for Wasm the reply to its first command, for a
//! container the marker line on its stdout, for a microVM the marker line on its serial
//! console. Memory is PSS (shared pages divided among their users), read from
//! `/proc/PID/smaps_rollup` of every process that belongs to an instance.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::{Samples, api, fmt_duration, module_bytes, open_agent, same_module_text};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::api::types::SendRequest;
use lichen_agent::runtime::container::{self, ContainerRuntime, ContainerSpec};
use lichen_agent::runtime::microvm::{self, GuestRoot, MicrovmRuntime, MicrovmSpec};

/// Wasm instances started by default (each stays up, so the last start shares the engine with
/// all the others).
const WASM_INSTANCES: usize = 100;
/// Containers per OCI runtime by default, all kept running until the memory is read.
const CONTAINER_INSTANCES: usize = 10;
/// MicroVM boots by default (each ~5 s under TCG).
const MICROVM_SAMPLES: usize = 3;
/// The marker the container and microVM workloads print when ready.
const MARKER: &str = "LICHEN-READY";
/// The cgroup parent of the benchmark's containers (removed at the end when empty).
const CGROUP_PARENT: &str = "lichen-bench";
/// 512 MiB, the budget of the "instances per 512 MiB" column.
const BUDGET: u64 = 512 << 20;

/// One tier's outcome.
struct Measured {
    tier: String,
    starts: Samples,
    pss_per_instance: Option<u64>,
    instances: usize,
    start_claim: &'static str,
    memory_claim: &'static str,
    note: Option<String>,
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let count = args.instances;
    let mut rows: Vec<std::result::Result<Measured, (String, String)>> = Vec::new();

    rows.push(
        wasm(
            &dir.join("wasm"),
            args,
            count.unwrap_or(WASM_INSTANCES).max(1),
        )
        .await
        .map_err(|e| ("wasm (in-process Wasmtime)".to_string(), format!("{e:#}"))),
    );

    let host = tokio::task::spawn_blocking(container::probe)
        .await
        .context("the container probe task failed")?;
    for check in &host.runtimes {
        let tier = format!("container: {}", check.kind);
        let outcome = match (&check.runtime, &check.problem) {
            (Some(oci), None) => container_tier(
                &dir.join(check.kind.binary()),
                oci.clone(),
                host.cgroup.clone(),
                count.unwrap_or(CONTAINER_INSTANCES).max(1),
            )
            .await
            .map_err(|e| format!("{e:#}")),
            (_, Some(problem)) => Err(format!("not measured: {problem}")),
            (None, None) => Err("not measured: not installed".to_string()),
        };
        rows.push(outcome.map_err(|e| (tier, e)));
    }

    let samples = args.microvms.unwrap_or(MICROVM_SAMPLES).max(1);
    let vm = microvm_tier(&dir.join("vm"), samples).await;
    rows.push(vm);

    print_table(&rows);
    Ok(summary(&rows))
}

/// Wasm: `n` workloads of the embedded counter component started one by one through the
/// agent (deploy of a precompiled component to the reply to its first `get`), all kept
/// running; memory is the agent process's PSS growth divided by `n`.
async fn wasm(dir: &Path, args: &BenchArgs, n: usize) -> Result<Measured> {
    let (bytes, label) = module_bytes(args)?;
    let slots = u32::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .with_context(|| format!("{n} instances do not fit the pool's u32 instance count"))?;
    let agent = open_agent(dir, Some(slots)).await?;
    let artifact = agent
        .artifacts()
        .add(bytes)
        .await
        .with_context(|| format!("cannot add {label}"))?;
    let digest = artifact.digest().to_string();
    let names: Vec<String> = (0..n).map(|i| format!("iso-{i:05}")).collect();
    let before = pss_of(std::process::id()).context("cannot read this process's PSS")?;
    let mut starts = Vec::with_capacity(n);
    for i in 0..n {
        // Each deployment holds every instance so far: the agent starts only the new one.
        let text = same_module_text("bench isolation", &names[..=i], &digest);
        let started = Instant::now();
        agent
            .deploy_text("bench-isolation.toml", &text, Path::new("/"))
            .await
            .map_err(api)?;
        agent
            .send(
                &names[i],
                SendRequest {
                    command: "get".into(),
                    payload: String::new(),
                },
            )
            .await
            .map_err(api)?;
        starts.push(started.elapsed());
    }
    let after = pss_of(std::process::id()).context("cannot read this process's PSS")?;
    agent.shutdown().await;
    Ok(Measured {
        tier: "wasm (in-process Wasmtime)".into(),
        starts: Samples::new(starts),
        pss_per_instance: Some(after.saturating_sub(before) / n as u64),
        instances: n,
        start_claim: "6-10 ms",
        memory_claim: "~6 MB (1 MB bytecode + 5 MB memory)",
        note: Some(format!(
            "{label}; the deploy holds all instances so far, so later starts also parse a longer deployment"
        )),
    })
}

/// A container tier: `n` busybox containers that print the marker and sleep, started one by
/// one and kept running; memory is the PSS of every process in their cgroups plus the
/// runtime's own `run` process that waits for each.
async fn container_tier(
    dir: &Path,
    oci: container::OciRuntime,
    cgroup: container::CgroupProbe,
    n: usize,
) -> Result<Measured> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))
        .with_context(|| format!("cannot create {}", rootfs.display()))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("cannot copy /bin/busybox (install busybox-static) into the bench rootfs")?;
    let kind = oci.kind;
    let runtime =
        ContainerRuntime::new(oci, cgroup, dir.join("work")).with_cgroup_parent(CGROUP_PARENT);
    let mut running = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    let mut failure = None;
    for i in 0..n {
        let name = format!("iso-{kind}-{i:03}");
        let spec = ContainerSpec::new(
            &name,
            &rootfs,
            [
                "/bin/busybox",
                "sh",
                "-c",
                "echo LICHEN-READY; exec /bin/busybox sleep 600",
            ],
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink: container::LogSink = Arc::new(move |line: container::LogLine| {
            if line.text.contains(MARKER) {
                let _ = tx.send(());
            }
        });
        let started = Instant::now();
        let c = match runtime.start(&spec, sink).await {
            Ok(c) => c,
            Err(e) => {
                failure = Some(format!("{e}"));
                break;
            }
        };
        let ready = tokio::select! {
            got = rx.recv() => got.is_some(),
            reason = c.wait() => { failure = Some(reason.to_string()); false }
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                failure = Some("no marker within 30 s".into()); false
            }
        };
        if ready {
            starts.push(started.elapsed());
        }
        running.push(c);
        if !ready {
            break;
        }
    }
    // Let the last ones settle, then read every instance's processes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = running.iter().map(|c| c.id().to_string()).collect();
    let total = tokio::task::spawn_blocking(move || pss_of_matching(&ids))
        .await
        .context("the PSS task failed")?;
    let up = running.len();
    for c in &running {
        let _ = c.stop(Duration::from_secs(5)).await;
    }
    remove_empty_cgroup_parent();
    if let Some(failure) = failure {
        anyhow::bail!("container {} of {n} failed: {failure}", up.max(1));
    }
    Ok(Measured {
        tier: format!("container: {kind}"),
        starts: Samples::new(starts),
        pss_per_instance: Some(total / up.max(1) as u64),
        instances: up,
        start_claim: "300-500 ms",
        memory_claim: "~138 MB (10 MB namespace + 128 MB app)",
        note: Some(format!(
            "{kind} run of busybox `sh -c 'echo {MARKER}; exec sleep 600'` from a plain rootfs"
        )),
    })
}

/// The microVM tier: `samples` boots of the example (Debian kernel + busybox initramfs) one at
/// a time, each to its marker; memory is each QEMU's PSS a second after ready.
async fn microvm_tier(
    dir: &Path,
    samples: usize,
) -> std::result::Result<Measured, (String, String)> {
    let probe = tokio::task::spawn_blocking(microvm::probe_cached)
        .await
        .map_err(|e| ("microvm".to_string(), format!("the probe task failed: {e}")))?;
    let tier = match probe.accelerator() {
        Some(accel) => format!(
            "microvm: QEMU -M {} + {}",
            probe.machine.map_or("?", |m| m.machine),
            accel.name().to_uppercase()
        ),
        None => "microvm".to_string(),
    };
    let fail = |e: String| (tier.clone(), e);
    let runtime = MicrovmRuntime::new(probe, dir.join("run"))
        .map_err(|e| fail(format!("not measured: {e}")))?;
    let (kernel, initramfs) = tokio::task::spawn_blocking(example_image)
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(format!("not measured: {e:#}")))?;
    let mut starts = Vec::with_capacity(samples);
    let mut pss = Vec::with_capacity(samples);
    for i in 0..samples {
        let spec = MicrovmSpec::new(
            &format!("iso-vm-{i}"),
            &kernel,
            GuestRoot::Initramfs(initramfs.clone()),
        );
        let vm = runtime
            .start(&spec, Arc::new(|_| {}))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let boot = vm.wait_ready().await;
        if boot.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            pss.push(vm.usage().pss_bytes.unwrap_or(0));
        }
        let _ = vm.stop(Duration::from_secs(30)).await;
        match boot {
            Ok(t) => starts.push(t),
            Err(reason) => return Err(fail(format!("boot {} failed: {reason}", i + 1))),
        }
    }
    let per = pss.iter().sum::<u64>() / pss.len().max(1) as u64;
    let each: Vec<String> = starts.iter().map(|d| fmt_duration(*d)).collect();
    Ok(Measured {
        tier,
        starts: Samples::new(starts),
        pss_per_instance: Some(per),
        instances: samples,
        start_claim: "50-60 s full VM; 125 ms Firecracker",
        memory_claim: "~640 MB (512 MB guest OS + 128 MB app)",
        note: Some(format!(
            "{}: Debian kernel + busybox initramfs, 1 vCPU, 128 MiB, booted one at a time to the console marker (boots: {}); {}",
            probe.summary(),
            each.join(", "),
            if runtime.accelerator() == microvm::Accelerator::Tcg {
                "TCG emulates the CPU in software: a working KVM boots in a fraction of this"
            } else {
                "under KVM"
            }
        )),
    })
}

/// The example microVM image: `$LICHEN_MICROVM_KERNEL` and `$LICHEN_MICROVM_INITRAMFS`, or
/// built by the repository's scripts when run from the repository's root.
fn example_image() -> Result<(PathBuf, PathBuf)> {
    if let (Some(k), Some(i)) = (
        std::env::var_os("LICHEN_MICROVM_KERNEL"),
        std::env::var_os("LICHEN_MICROVM_INITRAMFS"),
    ) {
        return Ok((k.into(), i.into()));
    }
    let script = |path: &str, args: &[&str]| -> Result<PathBuf> {
        let out = Command::new(path)
            .args(args)
            .output()
            .with_context(|| format!("no example image: cannot run {path} (run from the repository root, or set LICHEN_MICROVM_KERNEL and LICHEN_MICROVM_INITRAMFS)"))?;
        anyhow::ensure!(
            out.status.success(),
            "{path} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let kernel = script("images/fetch-kernel.sh", &[])?.join("vmlinuz");
    let initramfs = script("images/microvm-example/build-initramfs.sh", &["ready"])?;
    Ok((kernel, initramfs))
}

/// Removes the benchmark's empty cgroup parent from every hierarchy (best effort: a
/// non-empty or missing one stays as it is).
fn remove_empty_cgroup_parent() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs = vec![PathBuf::from("/sys/fs/cgroup").join(CGROUP_PARENT)];
    dirs.extend(entries.flatten().map(|e| e.path().join(CGROUP_PARENT)));
    for dir in dirs {
        let _ = std::fs::remove_dir(dir);
    }
}

/// PSS of one process, in bytes.
fn pss_of(pid: u32) -> Option<u64> {
    microvm::ResourceUsage::of_process(pid).pss_bytes
}

/// Total PSS of every process whose command line or cgroup names one of `ids` (the runtime's
/// `run` process and the container's own processes).
fn pss_of_matching(ids: &[String]) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let ours = ids.iter().any(|id| {
            cmdline.split(' ').any(|word| word == id) || cgroup.contains(&format!("/{id}\n"))
        });
        if ours {
            total += pss_of(pid).unwrap_or(0);
        }
    }
    total
}

fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

fn print_table(rows: &[std::result::Result<Measured, (String, String)>]) {
    if super::json::enabled() {
        for m in rows.iter().flatten() {
            let group = "isolation";
            let tier = format!("{} (n={})", m.tier, m.instances);
            let p50 = fmt_duration(m.starts.percentile(50.0));
            let p99 = fmt_duration(m.starts.percentile(99.0));
            let (start_claim, memory_claim) =
                (m.start_claim.to_string(), m.memory_claim.to_string());
            super::json::record(
                group,
                &format!("{tier}: start -> ready p50"),
                &p50,
                "-",
                &start_claim,
            );
            super::json::record(
                group,
                &format!("{tier}: start -> ready p99"),
                &p99,
                "-",
                &start_claim,
            );
            if let Some(pss) = m.pss_per_instance {
                super::json::record(
                    group,
                    &format!("{tier}: PSS per instance"),
                    &mib(pss),
                    "-",
                    &memory_claim,
                );
            }
        }
        return;
    }
    println!(
        "\n### isolation: the same trivial workload in each tier (seed analysis 8.2.1 / 8.2.2 beside each figure)\n"
    );
    let header = [
        "tier",
        "start -> ready p50",
        "p99",
        "claimed start",
        "PSS per instance",
        "claimed memory",
        "per 512 MiB",
    ]
    .map(String::from);
    let mut table = vec![header];
    let mut notes = Vec::new();
    for row in rows {
        match row {
            Ok(m) => {
                table.push([
                    format!("{} (n={})", m.tier, m.instances),
                    fmt_duration(m.starts.percentile(50.0)),
                    fmt_duration(m.starts.percentile(99.0)),
                    m.start_claim.to_string(),
                    m.pss_per_instance.map_or("-".into(), mib),
                    m.memory_claim.to_string(),
                    m.pss_per_instance
                        .filter(|b| *b > 0)
                        .map_or("-".into(), |b| (BUDGET / b).to_string()),
                ]);
                if let Some(note) = &m.note {
                    notes.push(format!("{}: {note}", m.tier));
                }
            }
            Err((tier, why)) => {
                table.push([
                    tier.clone(),
                    "-".into(),
                    "-".into(),
                    claim_for(tier).0.into(),
                    "-".into(),
                    claim_for(tier).1.into(),
                    "-".into(),
                ]);
                notes.push(format!("{tier}: {why}"));
            }
        }
    }
    let mut widths = [0usize; 7];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (i, row) in table.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("| {} |", rule.join(" | "));
        }
    }
    println!();
    for note in notes {
        println!("- {note}");
    }
    println!(
        "- start -> ready: Wasm, deploy to the reply to the first command; containers, the runtime's start to the marker on stdout; microVMs, QEMU's start to the marker on the serial console"
    );
    println!(
        "- PSS: Wasm, the agent process's growth / instances; containers, the runtime's run process and the container's processes; microVMs, the QEMU process (guest RAM it touched + QEMU)"
    );
    println!();
}

fn claim_for(tier: &str) -> (&'static str, &'static str) {
    if tier.starts_with("wasm") {
        ("6-10 ms", "~6 MB")
    } else if tier.starts_with("container") {
        ("300-500 ms", "~138 MB")
    } else {
        ("50-60 s full VM; 125 ms Firecracker", "~640 MB")
    }
}

fn summary(rows: &[std::result::Result<Measured, (String, String)>]) -> Vec<String> {
    rows.iter()
        .map(|row| match row {
            Ok(m) => format!(
                "- Isolation, {}: start to ready p50 {}, p99 {} over {} (claimed {}); PSS per instance {} (claimed {}), {} per 512 MiB.",
                m.tier,
                fmt_duration(m.starts.percentile(50.0)),
                fmt_duration(m.starts.percentile(99.0)),
                m.instances,
                m.start_claim,
                m.pss_per_instance.map_or("-".into(), mib),
                m.memory_claim,
                m.pss_per_instance
                    .filter(|b| *b > 0)
                    .map_or("-".into(), |b| (BUDGET / b).to_string()),
            ),
            Err((tier, why)) => format!("- Isolation, {tier}: {why}"),
        })
        .collect()
}
