//! The container runtime against the real OCI runtime of this host (runc here; crun where it
//! accepts the cgroup layout): output captured, OOM kill reported, fork bomb held by the pids
//! limit, devices denied without a grant, stop with SIGTERM then SIGKILL. Needs root. Skips,
//! saying so, only when neither crun nor runc is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_agent::runtime::container::{
    ContainerRuntime, ContainerSpec, ContainerStatus, ExitReason, Limits, LogLine, LogSink,
    LogStream, probe_cached,
};

/// A runtime for the first OCI runtime that works, or `None` (with the reason printed) when
/// none is installed. A runtime that is installed but works nowhere fails the test.
fn runtime(dir: &Path) -> Option<ContainerRuntime> {
    let probe = probe_cached();
    match probe.usable_runtime() {
        Some(oci) => Some(
            ContainerRuntime::new(oci.clone(), probe.cgroup.clone(), dir.join("work"))
                .with_cgroup_parent("/lichen-test"),
        ),
        None if probe.runtimes.iter().all(|c| c.runtime.is_none()) => {
            eprintln!(
                "SKIPPED: neither crun nor runc is installed ({})",
                probe.runtime_summary()
            );
            None
        }
        None => panic!(
            "an OCI runtime is installed but none works: {}",
            probe.runtime_summary()
        ),
    }
}

/// A busybox-static rootfs built now: `/bin/busybox` and a symlink per applet used.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let busybox = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("busybox"))
                .find(|b| b.is_file())
        })
        .expect("busybox-static is installed (scripts/install-deps)");
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("create rootfs/bin");
    std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
    for applet in [
        "sh", "echo", "true", "sleep", "cat", "ls", "touch", "head", "wc", "dd", "tail",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet symlink");
    }
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("create mount point");
    }
    rootfs
}

/// A log sink that keeps every line.
fn collect() -> (LogSink, Arc<Mutex<Vec<LogLine>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink: LogSink = {
        let lines = lines.clone();
        Arc::new(move |line| lines.lock().expect("log lock").push(line))
    };
    (sink, lines)
}

fn text(lines: &Mutex<Vec<LogLine>>) -> String {
    lines
        .lock()
        .expect("log lock")
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn sh(name: &str, rootfs: &Path, script: &str) -> ContainerSpec {
    ContainerSpec::new(name, rootfs, ["/bin/sh", "-c", script])
}

#[tokio::test]
async fn echo_output_is_captured_and_the_root_is_read_only_and_offline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(rt) = runtime(dir.path()) else {
        return;
    };
    let rootfs = busybox_rootfs(dir.path());
    let (sink, lines) = collect();
    let mut spec = sh(
        "echo",
        &rootfs,
        "echo hello; echo to-stderr >&2; touch /written; cat /proc/net/dev; echo $GREETING; exit 3",
    );
    spec.env.push(("GREETING".into(), "from-env".into()));
    let container = rt.start(&spec, sink).await.expect("starts");
    let exit = container.wait().await;
    let got = lines.lock().expect("log lock").clone();
    let all = text(&lines);
    assert_eq!(exit, ExitReason::Exited { code: 3 }, "{all}");
    assert!(
        got.iter()
            .any(|l| l.text == "hello" && l.stream == LogStream::Stdout && l.container == "echo"),
        "{all}"
    );
    assert!(
        got.iter()
            .any(|l| l.text == "to-stderr" && l.stream == LogStream::Stderr),
        "{all}"
    );
    assert!(all.contains("Read-only file system"), "{all}");
    assert!(all.contains("from-env"), "{all}");
    // A new network namespace: only the loopback interface exists.
    let interfaces: Vec<&str> = all
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(_, rest)| rest.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|(name, _)| name.trim())
        .collect();
    assert_eq!(interfaces, vec!["lo"], "{all}");
    assert!(!rootfs.join("written").exists());
    assert!(
        !container.bundle_dir().exists(),
        "bundle removed after exit"
    );
}

#[tokio::test]
async fn memory_hog_is_oom_killed_under_16_mib_and_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(rt) = runtime(dir.path()) else {
        return;
    };
    let rootfs = busybox_rootfs(dir.path());
    let (sink, lines) = collect();
    let mut spec = sh(
        "hog",
        &rootfs,
        "echo hogging; x=0123456789abcdef; while true; do x=\"$x$x\"; done",
    );
    spec.limits = Limits {
        memory_bytes: Some(16 << 20),
        ..Limits::default()
    };
    let container = rt.start(&spec, sink).await.expect("starts");
    let exit = tokio::time::timeout(Duration::from_secs(60), container.wait())
        .await
        .expect("the hog dies within a minute");
    assert!(
        matches!(exit, ExitReason::OomKilled { code: 137 }),
        "{exit:?}: {}",
        text(&lines)
    );
    assert_eq!(
        exit.to_string(),
        "killed by the OOM killer at its memory limit (exit code 137)"
    );
    assert!(text(&lines).contains("hogging"));
}

#[tokio::test]
async fn fork_bomb_is_held_by_a_pids_limit_of_16() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(rt) = runtime(dir.path()) else {
        return;
    };
    let rootfs = busybox_rootfs(dir.path());
    let (sink, lines) = collect();
    let mut spec = sh(
        "bomb",
        &rootfs,
        "f() { f | f & sleep 5; }; f; echo survivor",
    );
    spec.limits.pids = Some(16);
    let container = rt.start(&spec, sink).await.expect("starts");
    let mut peak = 0;
    let started = Instant::now();
    while container.status() == ContainerStatus::Running
        && started.elapsed() < Duration::from_secs(20)
    {
        peak = peak.max(container.usage().pids.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exit = tokio::time::timeout(Duration::from_secs(20), container.wait()).await;
    let exit = match exit {
        Ok(exit) => exit,
        Err(_) => container.stop(Duration::from_secs(1)).await.expect("stops"),
    };
    let all = text(&lines);
    println!("fork bomb: peak {peak} pids in the container, {exit}");
    assert!(peak <= 16, "peak {peak}");
    assert!(
        all.contains("can't fork") || all.contains("Resource temporarily unavailable"),
        "{all}"
    );
    // The host is fine: it still starts processes.
    let host = Command::new("true").status().expect("host can fork");
    assert!(host.success());
}

#[tokio::test]
async fn without_a_device_grant_no_device_can_be_opened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(rt) = runtime(dir.path()) else {
        return;
    };
    let rootfs = busybox_rootfs(dir.path());
    // A node planted in the image itself, with a major no driver claims here (240, local use):
    // only the device cgroup stands between it and the container.
    let planted = Command::new("mknod")
        .arg(rootfs.join("gpiochip-planted"))
        .args(["c", "240", "0"])
        .status()
        .expect("mknod runs");
    assert!(planted.success());
    let host_node = PathBuf::from(format!("/dev/lichen-test-gpiochip-{}", std::process::id()));
    let made = Command::new("mknod")
        .arg(&host_node)
        .args(["c", "240", "0"])
        .status()
        .expect("mknod runs");
    assert!(made.success());

    let script = format!(
        "cat /dev/gpiochip0; cat /gpiochip-planted; cat {}; ls /dev",
        host_node.display()
    );
    let (sink, lines) = collect();
    let denied = rt
        .start(&sh("nodev", &rootfs, &script), sink)
        .await
        .expect("starts");
    denied.wait().await;
    let without = text(&lines);

    let (sink, lines) = collect();
    let mut granted = sh("withdev", &rootfs, &script);
    granted.devices.push(host_node.clone());
    let allowed = rt.start(&granted, sink).await.expect("starts");
    allowed.wait().await;
    let with = text(&lines);
    let _ = std::fs::remove_file(&host_node);

    println!("without grant:\n{without}\nwith grant:\n{with}");
    assert!(
        without.contains("'/dev/gpiochip0': No such file or directory"),
        "{without}"
    );
    assert!(
        without.contains("'/gpiochip-planted': Operation not permitted"),
        "{without}"
    );
    assert!(
        without.contains(&format!(
            "'{}': No such file or directory",
            host_node.display()
        )),
        "{without}"
    );
    // Granted: the node exists and the cgroup lets the open through to the kernel, which finds
    // no driver for major 240 (ENXIO) instead of refusing (EPERM). The rule is by number, so
    // the planted node with the same numbers opens the same way.
    assert!(
        with.contains(&format!(
            "'{}': No such device or address",
            host_node.display()
        )),
        "{with}"
    );
    assert!(!with.contains("Operation not permitted"), "{with}");
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_and_removes_the_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(rt) = runtime(dir.path()) else {
        return;
    };
    let rootfs = busybox_rootfs(dir.path());

    // `sleep` as PID 1 of its namespace ignores SIGTERM: SIGKILL is needed.
    let (sink, _) = collect();
    let sleeper = rt
        .start(
            &ContainerSpec::new("sleeper", &rootfs, ["/bin/sleep", "600"]),
            sink,
        )
        .await
        .expect("starts");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sleeper.status(), ContainerStatus::Running);
    assert!(sleeper.bundle_dir().join("config.json").is_file());
    assert!(sleeper.usage().pids.unwrap_or(0) >= 1);
    let asked = Instant::now();
    let exit = sleeper
        .stop(Duration::from_millis(500))
        .await
        .expect("stops");
    let took = asked.elapsed();
    assert_eq!(exit, ExitReason::Stopped { forced: true });
    assert!(
        took >= Duration::from_millis(500),
        "waited the grace period: {took:?}"
    );
    assert!(!sleeper.bundle_dir().exists(), "bundle removed");

    // A shell that handles SIGTERM goes within the grace period.
    let (sink, lines) = collect();
    let polite = rt
        .start(
            &sh(
                "polite",
                &rootfs,
                "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
            ),
            sink,
        )
        .await
        .expect("starts");
    let ready = Instant::now();
    while !text(&lines).contains("ready") && ready.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exit = polite.stop(Duration::from_secs(10)).await.expect("stops");
    assert_eq!(exit, ExitReason::Stopped { forced: false });
    assert!(text(&lines).contains("bye"));
    assert!(!polite.bundle_dir().exists());
    let state = dir.path().join("work/state");
    let listed = Command::new(&rt.oci().path)
        .arg("--root")
        .arg(&state)
        .args(["list", "--quiet"])
        .output()
        .expect("runtime lists");
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "",
        "no container left"
    );
}

#[tokio::test]
async fn a_runtime_that_cannot_create_the_container_reports_start_failed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(rt) = runtime(dir.path()) else {
        return;
    };
    let rootfs = busybox_rootfs(dir.path());
    let (sink, _) = collect();
    let container = rt
        .start(
            &ContainerSpec::new("nobin", &rootfs, ["/bin/no-such-binary"]),
            sink,
        )
        .await
        .expect("the runtime starts");
    let exit = container.wait().await;
    match &exit {
        ExitReason::StartFailed { message } => {
            assert!(message.contains("no-such-binary"), "{message}")
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert!(!container.bundle_dir().exists());
}

/// Start-to-exit of `true` over 20 runs for each runtime that works here (printed, not asserted).
#[tokio::test]
async fn latency_of_true_per_runtime() {
    let dir = tempfile::tempdir().expect("temp dir");
    if runtime(dir.path()).is_none() {
        return;
    }
    let rootfs = busybox_rootfs(dir.path());
    let probe = probe_cached();
    for check in &probe.runtimes {
        let Some(oci) = check.runtime.as_ref().filter(|_| check.works()) else {
            println!(
                "{}: not measured: {}",
                check.kind,
                check.problem.as_deref().unwrap_or("?")
            );
            continue;
        };
        let rt = ContainerRuntime::new(
            oci.clone(),
            probe.cgroup.clone(),
            dir.path().join(oci.kind.binary()),
        )
        .with_cgroup_parent("/lichen-test");
        let mut run = Vec::new();
        let mut total = Vec::new();
        for i in 0..20 {
            let (sink, _) = collect();
            let spec = ContainerSpec::new(&format!("true-{i}"), &rootfs, ["/bin/true"]);
            let started = Instant::now();
            let container = rt.start(&spec, sink).await.expect("starts");
            let exit = container.wait().await;
            total.push(started.elapsed());
            assert_eq!(exit, ExitReason::Exited { code: 0 });
            run.push(container.run_time().expect("exited"));
        }
        run.sort();
        total.sort();
        println!(
            "{} ({}): `true` start-to-exit p50 {:.1} ms (min {:.1}, max {:.1}); with state check, delete and bundle removal p50 {:.1} ms, 20 runs",
            oci.kind,
            oci.version,
            run[9].as_secs_f64() * 1e3,
            run[0].as_secs_f64() * 1e3,
            run[19].as_secs_f64() * 1e3,
            total[9].as_secs_f64() * 1e3,
        );
    }
}
