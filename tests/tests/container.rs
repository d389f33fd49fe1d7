//! The container runtime against the real OCI runtime of this host (runc here; crun where it
//! accepts the cgroup layout): output captured, OOM kill reported, fork bomb held by the pids
//! limit, devices denied without a grant, stop with SIGTERM then SIGKILL. Needs root. Fails
//! when neither crun nor runc is installed, unless `LICHEN_TEST_ALLOW_MISSING` lists `runc`
//! (then it skips, saying so); the microVM test likewise needs QEMU (`qemu`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_agent::api::types::WorkloadState;
use lichen_agent::runtime::container::{
    ContainerRuntime, ContainerSpec, ContainerStatus, ExitReason, Limits, LogLine, LogSink,
    LogStream, probe_cached,
};

/// A runtime for the first OCI runtime that works. None installed fails the test, or gives
/// `None` (with the reason printed) when `LICHEN_TEST_ALLOW_MISSING` lists `runc`; a runtime
/// that is installed but works nowhere fails the test.
fn runtime(dir: &Path) -> Option<ContainerRuntime> {
    let probe = probe_cached();
    match probe.usable_runtime() {
        Some(oci) => Some(
            ContainerRuntime::new(oci.clone(), probe.cgroup.clone(), dir.join("work"))
                .with_cgroup_parent("/lichen-test"),
        ),
        None if probe.runtimes.iter().all(|c| c.runtime.is_none()) => {
            lichen_tests::tools::missing(
                "runc",
                &format!(
                    "neither crun nor runc is installed ({})",
                    probe.runtime_summary()
                ),
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
    // Wait for its process to show in the container's cgroup (deadline 20 s), not for a time.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sleeper.usage().pids.unwrap_or(0) < 1 {
        assert!(
            Instant::now() < deadline,
            "the sleeper's process never showed in its cgroup"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sleeper.status(), ContainerStatus::Running);
    assert!(sleeper.bundle_dir().join("config.json").is_file());
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

// ---- container workloads deployed by file, through the real daemon ----

use lichen_tests::{Daemon, guest, output_text};

/// Whether an OCI runtime works here: as [`runtime`], `false` only when none is installed and
/// `LICHEN_TEST_ALLOW_MISSING` lists `runc`.
fn containers_work() -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    runtime(dir.path()).is_some()
}

/// `lichen logs NAME` as text.
fn logs(daemon: &Daemon, name: &str) -> String {
    output_text(&daemon.cli(&["logs", name]))
}

/// Stops the daemon with SIGTERM so its containers are stopped and deleted.
fn finish(mut daemon: Daemon) {
    daemon.stop().expect("the daemon stops on SIGTERM");
}

#[test]
fn a_container_deployed_by_file_runs_and_its_output_reaches_lichen_logs() {
    if !containers_work() {
        return;
    }
    let daemon = Daemon::start().expect("daemon starts");
    busybox_rootfs(daemon.dir.path());
    let text = r#"
[[workloads]]
name = "hello"
kind = "container"
rootfs = "rootfs"
command = ["/bin/sh", "-c", "echo hello from $WHERE; echo to stderr >&2; exit 0"]
env = { WHERE = "a-container" }
restart = "never"
[workloads.limits]
memory = "32MiB"
cpus = 0.5
pids = 32
"#;
    let out = daemon.deploy("deploy.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = daemon.wait_for("hello", "completed", |s| {
        s.state == WorkloadState::Completed
    });
    assert_eq!(status.kind, "container");
    assert_eq!(status.isolation, "container");
    assert_eq!(status.exit_code, Some(0));
    assert!(!status.oom_killed);
    assert!(
        status.runner.as_deref() == Some("runc") || status.runner.as_deref() == Some("crun"),
        "{status:?}"
    );
    let text = logs(&daemon, "hello");
    assert!(text.contains("[stdout] hello from a-container"), "{text}");
    assert!(text.contains("[stderr] to stderr"), "{text}");
    assert!(text.contains("container exited with code 0"), "{text}");
    // The table shows the kind too.
    let table = output_text(&daemon.cli(&["ps"]));
    assert!(
        table.contains("hello") && table.contains("container"),
        "{table}"
    );
    finish(daemon);
}

#[test]
fn a_container_over_its_memory_limit_is_oom_killed_and_ps_says_so() {
    if !containers_work() {
        return;
    }
    let daemon = Daemon::start().expect("daemon starts");
    busybox_rootfs(daemon.dir.path());
    let text = r#"
[[workloads]]
name = "hog"
kind = "container"
rootfs = "rootfs"
command = ["/bin/sh", "-c", "echo hogging; x=0123456789abcdef; while true; do x=\"$x$x\"; done"]
restart = "never"
[workloads.limits]
memory = "16MiB"
"#;
    let out = daemon.deploy("deploy.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = daemon.wait_for("hog", "failed", |s| s.state == WorkloadState::Failed);
    assert!(status.oom_killed, "{status:?}");
    assert_eq!(status.exit_code, Some(137));
    assert_eq!(
        status.exit_reason.as_deref(),
        Some("killed by the OOM killer at its memory limit (exit code 137)")
    );
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("OOM killer")),
        "{status:?}"
    );
    assert!(logs(&daemon, "hog").contains("hogging"));
    finish(daemon);
}

#[test]
fn a_failing_container_is_restarted_with_back_off_and_stopped_when_removed() {
    if !containers_work() {
        return;
    }
    let daemon = Daemon::start().expect("daemon starts");
    busybox_rootfs(daemon.dir.path());
    let crashy = r#"
[[workloads]]
name = "crashy"
kind = "container"
rootfs = "rootfs"
command = ["/bin/sh", "-c", "echo attempt; exit 3"]
restart = "on-failure"

[[workloads]]
name = "sleeper"
kind = "container"
rootfs = "rootfs"
command = ["/bin/sh", "-c", "echo sleeping; exec sleep 300"]
"#;
    let out = daemon.deploy("deploy.toml", crashy);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = daemon.wait_for("crashy", "3 restarts", |s| s.restarts >= 3);
    assert_eq!(status.exit_code, Some(3));
    assert!(logs(&daemon, "crashy").matches("[stdout] attempt").count() >= 3);
    let sleeper = daemon.wait_for("sleeper", "running", |s| {
        s.state == WorkloadState::Running && s.pids.unwrap_or(0) >= 1
    });
    assert!(sleeper.memory_bytes > 0, "{sleeper:?}");
    // A container takes no commands; `lichen stop` stops it (and runc forgets it).
    let out = daemon.cli(&["send", "sleeper", "ping"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is a container: it takes no commands"),
        "{}",
        output_text(&out)
    );
    let out = daemon.cli(&["stop", "sleeper"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let stopped = daemon.status("sleeper").expect("kept in ps");
    assert_eq!(stopped.state, WorkloadState::Stopped);
    assert!(
        !live_containers(&daemon).contains(&"lichen-sleeper".to_string()),
        "{:?}",
        live_containers(&daemon)
    );

    // A deployment without them stops both; the sleeper's container is gone from runc.
    let out = daemon.deploy("deploy.toml", "workloads = []\n");
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(daemon.ps().is_empty());
    let state_root = daemon.state_dir().join("containers/state");
    let left: Vec<_> = std::fs::read_dir(&state_root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "containers left in {state_root:?}: {left:?}"
    );
    finish(daemon);
}

#[test]
fn an_isolation_this_host_lacks_is_refused_naming_the_missing_piece() {
    // The daemon's PATH has no crun or runc: the probe honestly finds no OCI runtime.
    let daemon = Daemon::start_with(&[], Some("export PATH=/nonexistent")).expect("daemon starts");
    let good = format!(
        "[[workloads]]\nname = \"counter\"\nmodule = \"{}\"\n",
        guest("counter").display()
    );
    let out = daemon.deploy("deploy.toml", &good);
    assert!(out.status.success(), "{}", output_text(&out));
    let before = daemon.status("counter").expect("counter runs");

    let text = format!(
        "{good}\n[[workloads]]\nname = \"box\"\nkind = \"container\"\nrootfs = \"rootfs\"\ncommand = [\"/bin/true\"]\n"
    );
    let out = daemon.deploy("mixed.toml", &text);
    assert!(!out.status.success());
    let message = output_text(&out);
    assert!(
        message.contains("mixed.toml:5:1: workloads[1].isolation: \"container\" isolation needs a working OCI runtime: crun is not installed; runc is not installed"),
        "{message}"
    );
    // A microVM is refused too, with its own missing piece.
    let out = daemon.deploy(
        "vm.toml",
        &format!("{good}isolation = \"strongest\"\n\n[[workloads]]\nname = \"box\"\nkind = \"container\"\nisolation = \"strongest\"\nrootfs = \"rootfs\"\ncommand = [\"/bin/true\"]\n"),
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("workloads[1].isolation: \"container\" isolation needs"),
        "{}",
        output_text(&out)
    );
    // A microVM is refused naming its own missing piece: no QEMU in this PATH.
    let out = daemon.deploy(
        "vm.toml",
        &format!("{good}\n[[workloads]]\nname = \"vm\"\nkind = \"microvm\"\nkernel = \"vmlinuz\"\ninitramfs = \"initrd\"\n"),
    );
    assert!(!out.status.success());
    let message = output_text(&out);
    assert!(
        message.contains(
            "workloads[1].isolation: \"microvm\" isolation needs a usable KVM or QEMU: qemu-system-"
        ),
        "{message}"
    );
    assert!(message.contains("is not installed"), "{message}");
    // Nothing changed.
    let rows = daemon.ps();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].deployment_version, before.deployment_version);
    let doctor = output_text(&daemon.cli(&["doctor"]));
    assert!(doctor.contains("isolation container"), "{doctor}");
    finish(daemon);
}

#[test]
fn a_mixed_deployment_applies_atomically() {
    if !containers_work() {
        return;
    }
    let daemon = Daemon::start().expect("daemon starts");
    busybox_rootfs(daemon.dir.path());
    let counter = guest("counter");
    let v1 = format!(
        r#"
[[workloads]]
name = "counter"
module = "{}"
triggers = [{{ interval = "50ms" }}]

[[workloads]]
name = "box"
kind = "container"
rootfs = "rootfs"
command = ["/bin/sh", "-c", "echo box v1; exec sleep 300"]
"#,
        counter.display()
    );
    let out = daemon.deploy("deploy.toml", &v1);
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("box", "running", |s| s.state == WorkloadState::Running);
    daemon.wait_for("counter", "running", |s| s.state == WorkloadState::Running);
    let version = daemon.status("box").expect("box").deployment_version;

    // A bad container image rejects the whole: the wasm change beside it is not applied.
    let bad_image = format!(
        "[[workloads]]\nname = \"counter2\"\nmodule = \"{}\"\n\n[[workloads]]\nname = \"box\"\nkind = \"container\"\nimage = \"no-such-image\"\n",
        counter.display()
    );
    let out = daemon.deploy("bad.toml", &bad_image);
    assert!(!out.status.success());
    let message = output_text(&out);
    assert!(
        message.contains("bad.toml:8:1: workloads[1].image: image ")
            && message.contains("no-such-image\": cannot read it"),
        "{message}"
    );
    // A bad wasm module rejects the whole: the new container is not started.
    let bad_module = "[[workloads]]\nname = \"box2\"\nkind = \"container\"\nrootfs = \"rootfs\"\ncommand = [\"/bin/true\"]\n\n[[workloads]]\nname = \"counter\"\nmodule = \"missing.wasm\"\n";
    let out = daemon.deploy("bad2.toml", bad_module);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("workloads[1].module: cannot read module file"),
        "{}",
        output_text(&out)
    );
    let names: Vec<String> = daemon.ps().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["box", "counter"]);
    assert!(daemon.ps().iter().all(|s| s.deployment_version == version));
    assert!(!logs(&daemon, "box").contains("box v2"));

    // A good change restarts the container with its new command; the counter is unchanged.
    let v2 = v1.replace("box v1", "box v2");
    let out = daemon.deploy("deploy.toml", &v2);
    assert!(out.status.success(), "{}", output_text(&out));
    let report = output_text(&out);
    assert!(report.contains("reloaded   box"), "{report}");
    assert!(report.contains("unchanged  counter"), "{report}");
    daemon.wait_for("box", "v2 running", |s| {
        s.state == WorkloadState::Running && s.deployment_version > version
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs(&daemon, "box").contains("box v2") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(logs(&daemon, "box").contains("[stdout] box v2"));
    finish(daemon);
}

/// Writes an OCI image layout of `rootfs` (one gzip-less layer) with an entrypoint, default
/// arguments and an environment variable, as a registry-free `docker save`-like tool would.
fn oci_layout(dir: &Path, rootfs: &Path) -> PathBuf {
    use sha2::Digest as _;
    let layout = dir.join("hello-oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs dir");
    let put = |bytes: &[u8], media: &str| -> serde_json::Value {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("write blob");
        serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    };
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", rootfs).expect("tar the rootfs");
    let layer = builder.into_inner().expect("layer tar");
    let layer_desc = put(&layer, "application/vnd.oci.image.layer.v1.tar");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo image says $GREETING"],
            "Env": ["PATH=/bin", "GREETING=hello-from-the-image"]
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"].clone()]}
    });
    let config_desc = put(
        &serde_json::to_vec(&config).expect("json"),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc]
    });
    let manifest_desc = put(
        &serde_json::to_vec(&manifest).expect("json"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]}))
            .expect("json"),
    )
    .expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    layout
}

#[test]
fn an_oci_layout_image_is_imported_by_digest_and_runs() {
    if !containers_work() {
        return;
    }
    let daemon = Daemon::start().expect("daemon starts");
    let scratch = tempfile::tempdir().expect("temp dir");
    let rootfs = busybox_rootfs(scratch.path());
    let layout = oci_layout(daemon.dir.path(), &rootfs);
    let manifest_digest = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
                .expect("json");
        index["manifests"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    };
    // The layout as a tarball too.
    let tarball = daemon.dir.path().join("hello-oci.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(status.success());

    let text = r#"
[[workloads]]
name = "from-dir"
kind = "container"
image = "hello-oci"
restart = "never"

[[workloads]]
name = "from-tar"
kind = "container"
image = "hello-oci.tar"
args = ["echo args replaced; echo $GREETING"]
restart = "never"
"#;
    let out = daemon.deploy("deploy.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
    for name in ["from-dir", "from-tar"] {
        let status = daemon.wait_for(name, "completed", |s| s.state == WorkloadState::Completed);
        assert_eq!(
            status.module_digest, manifest_digest,
            "content-addressed by manifest"
        );
    }
    let dir_logs = logs(&daemon, "from-dir");
    assert!(
        dir_logs.contains("[stdout] image says hello-from-the-image"),
        "{dir_logs}"
    );
    let tar_logs = logs(&daemon, "from-tar");
    assert!(tar_logs.contains("[stdout] args replaced"), "{tar_logs}");
    assert!(
        tar_logs.contains("[stdout] hello-from-the-image"),
        "{tar_logs}"
    );
    let hex = manifest_digest.trim_start_matches("sha256:");
    assert!(
        daemon
            .state_dir()
            .join("images")
            .join(hex)
            .join("rootfs/bin/busybox")
            .is_file()
    );
    // Once the applied deployment no longer uses the image, the agent removes it.
    let out = daemon.deploy("empty.toml", "workloads = []\n");
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        !daemon.state_dir().join("images").join(hex).exists(),
        "the unused image was collected"
    );
    finish(daemon);
}

// ---- microVMs in deployments (real QEMU; TCG here, where KVM-PVM cannot boot stock kernels) ----

/// Runs an image script of the repository and returns the path it prints.
fn image_script(script: &str, args: &[&str]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(script);
    let out = Command::new(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script:?}: {e}"));
    assert!(
        out.status.success(),
        "{script:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn a_deployment_mixing_wasm_container_and_microvm_applies_atomically() {
    if !containers_work() || !lichen_tests::tools::qemu_present() {
        return;
    }
    let kernel = image_script("images/fetch-kernel.sh", &[]).join("vmlinuz");
    let initramfs = image_script("images/microvm-example/build-initramfs.sh", &["ready"]);
    let never = image_script(
        "images/microvm-example/build-initramfs.sh",
        &["never-ready"],
    );
    let daemon = Daemon::start().expect("daemon starts");
    busybox_rootfs(daemon.dir.path());
    let v1 = format!(
        r#"
[[workloads]]
name = "counter"
module = "{counter}"
triggers = [{{ interval = "50ms" }}]

[[workloads]]
name = "box"
kind = "container"
rootfs = "rootfs"
command = ["/bin/sh", "-c", "echo box up; exec sleep 300"]

[[workloads]]
name = "vm"
kind = "microvm"
isolation = "strongest"
kernel = "{kernel}"
initramfs = "{initramfs}"
boot-timeout = "120s"
[workloads.limits]
memory = "128MiB"
"#,
        counter = guest("counter").display(),
        kernel = kernel.display(),
        initramfs = initramfs.display(),
    );
    let out = daemon.deploy("deploy.toml", &v1);
    assert!(out.status.success(), "{}", output_text(&out));
    let vm = daemon.wait_for("vm", "booted", |s| s.state == WorkloadState::Running);
    assert_eq!(vm.kind, "microvm");
    assert_eq!(vm.isolation, "microvm");
    let accel = vm.accelerator.clone().expect("the accelerator is shown");
    assert!(accel == "tcg" || accel == "kvm", "{vm:?}");
    println!("microVM booted under {accel} (KVM only where a trial boot proved it)");
    assert!(logs(&daemon, "vm").contains("LICHEN-READY"));
    let table = output_text(&daemon.cli(&["ps"]));
    assert!(table.contains(&format!("microvm ({accel})")), "{table}");
    daemon.wait_for("box", "running", |s| s.state == WorkloadState::Running);
    let version = daemon.status("vm").expect("vm").deployment_version;

    // A microVM whose kernel file is missing rejects the whole: the container change beside
    // it is not applied.
    let bad = v1
        .replace("echo box up", "echo box changed")
        .replace(&kernel.display().to_string(), "/nonexistent/vmlinuz");
    let out = daemon.deploy("deploy.toml", &bad);
    assert!(!out.status.success());
    let message = output_text(&out);
    assert!(
        message.contains("workloads[2].kernel: cannot read /nonexistent/vmlinuz"),
        "{message}"
    );
    assert!(daemon.ps().iter().all(|s| s.deployment_version == version));
    assert!(!logs(&daemon, "box").contains("box changed"));

    // A microVM that never prints its marker fails after its boot timeout; the others run on.
    let failing = format!(
        "{}\n[[workloads]]\nname = \"silent\"\nkind = \"microvm\"\nkernel = \"{}\"\ninitramfs = \"{}\"\nboot-timeout = \"15s\"\nrestart = \"never\"\n",
        v1,
        kernel.display(),
        never.display()
    );
    let out = daemon.deploy("deploy.toml", &failing);
    assert!(out.status.success(), "{}", output_text(&out));
    let silent = daemon.wait_for("silent", "failed", |s| s.state == WorkloadState::Failed);
    assert!(
        silent
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("boot failed: the ready marker")),
        "{silent:?}"
    );
    assert_eq!(
        daemon.status("vm").expect("vm").state,
        WorkloadState::Running
    );
    assert_eq!(
        daemon.status("box").expect("box").state,
        WorkloadState::Running
    );

    // Removing them all stops the VM (ACPI power button) and the container.
    let out = daemon.deploy("deploy.toml", "workloads = []\n");
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(daemon.ps().is_empty());
    finish(daemon);
}

/// The `lichen-*` containers runc (or crun) still knows in a daemon's state directory.
fn live_containers(daemon: &Daemon) -> Vec<String> {
    let probe = probe_cached();
    let Some(oci) = probe.usable_runtime() else {
        return Vec::new();
    };
    let out = Command::new(&oci.path)
        .arg("--root")
        .arg(daemon.state_dir().join("containers/state"))
        .args(["list", "-q"])
        .output()
        .expect("the OCI runtime runs");
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("lichen-"))
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

#[test]
fn kill_9_during_a_mixed_deploy_leaves_the_old_or_the_new_never_a_mix() {
    if !containers_work() {
        return;
    }
    let mut daemon = Daemon::start().expect("daemon starts");
    busybox_rootfs(daemon.dir.path());
    let deployment = |version: u32| {
        format!(
            "[[workloads]]\nname = \"counter\"\nmodule = \"{}\"\n[workloads.config]\nv = \"{version}\"\n\n\
             [[workloads]]\nname = \"box-{version}\"\nkind = \"container\"\nrootfs = \"rootfs\"\n\
             command = [\"/bin/sh\", \"-c\", \"exec sleep 300\"]\n",
            guest("counter").display()
        )
    };
    let out = daemon.deploy("deploy.toml", &deployment(0));
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("box-0", "running", |s| s.state == WorkloadState::Running);
    let mut seen_new = 0;
    for round in 1..=4u32 {
        let path = daemon.write_file("next.toml", &deployment(round));
        let mut deploy = Command::new(lichen_tests::lichen_bin())
            .arg("--socket")
            .arg(daemon.socket())
            .arg("deploy")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("deploy runs");
        // Kill at a different point of the deploy each round.
        std::thread::sleep(Duration::from_millis([2, 5, 9, 14][round as usize - 1]));
        daemon.kill9().expect("kill -9");
        // The CLI must not carry its request over to the restarted daemon.
        let _ = deploy.kill();
        let _ = deploy.wait();
        daemon.restart().expect("daemon restarts on the same state");
        let rows = daemon.ps();
        let names: Vec<&str> = rows.iter().map(|s| s.name.as_str()).collect();
        let versions: Vec<u64> = rows.iter().map(|s| s.deployment_version).collect();
        assert_eq!(rows.len(), 2, "round {round}: {names:?}");
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "round {round}: one deployment, not a mix: {rows:?}"
        );
        let boxed = names
            .iter()
            .find(|n| n.starts_with("box-"))
            .expect("a container workload")
            .to_string();
        if boxed == format!("box-{round}") {
            seen_new += 1;
        }
        // Only the restored container runs: what the killed agent left is deleted. (`running`
        // shows once runc is started; runc lists the container once it has created it.)
        daemon.wait_for(&boxed, "running", |s| s.state == WorkloadState::Running);
        let want = vec![format!("lichen-{boxed}")];
        let deadline = Instant::now() + Duration::from_secs(30);
        while live_containers(&daemon) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(live_containers(&daemon), want, "round {round}");
    }
    println!("kill -9 during deploy: the new deployment survived {seen_new} of 4 rounds");
    finish(daemon);
}

/// PIDs of the QEMU processes whose command line names `dir` (their QMP socket lives there).
fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            running(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                    let cmdline = String::from_utf8_lossy(&raw);
                    cmdline.contains("qemu-system") && cmdline.contains(&needle)
                })
        })
        .collect()
}

/// Whether process `pid` still runs (an exited one whose parent is gone may linger as a zombie
/// where PID 1 does not reap).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
    })
}

#[test]
fn a_microvm_left_running_by_a_killed_agent_is_ended_when_the_agent_comes_back() {
    let kernel = image_script("images/fetch-kernel.sh", &[]).join("vmlinuz");
    let initramfs = image_script("images/microvm-example/build-initramfs.sh", &["ready"]);
    let mut daemon = Daemon::start().expect("daemon starts");
    let text = format!(
        r#"
[[workloads]]
name = "vm"
kind = "microvm"
kernel = "{kernel}"
initramfs = "{initramfs}"
boot-timeout = "120s"
[workloads.limits]
memory = "128MiB"
"#,
        kernel = kernel.display(),
        initramfs = initramfs.display(),
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("vm", "booted", |s| s.state == WorkloadState::Running);
    let state_dir = daemon.state_dir();
    let before = qemu_pids_under(&state_dir);
    assert_eq!(before.len(), 1, "one QEMU for the VM: {before:?}");

    // kill -9 gives the agent no chance to stop its VM: QEMU lives on as an orphan.
    daemon.kill9().expect("kill -9");
    assert!(running(before[0]), "QEMU outlives the killed agent");

    daemon.restart().expect("the agent restarts");
    daemon.wait_for("vm", "booted again", |s| s.state == WorkloadState::Running);
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(before[0]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !running(before[0]),
        "the orphaned QEMU (pid {}) was ended",
        before[0]
    );
    let after = qemu_pids_under(&state_dir);
    assert_eq!(after.len(), 1, "only the restored VM runs: {after:?}");
    assert_ne!(after, before);
    assert!(
        daemon.log().contains("ended QEMU processes left running"),
        "{}",
        daemon.log()
    );
    finish(daemon);
}
