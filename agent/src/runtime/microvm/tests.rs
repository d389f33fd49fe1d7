//! Real QEMU boots of the example workload (`images/microvm-example/build-initramfs.sh`: the
//! Debian kernel from `images/fetch-kernel.sh` and a busybox initramfs), under TCG so that
//! they run the same on machines whose KVM cannot boot a stock kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Runs an image script and returns the path it prints.
fn script_output(script: &str, args: &[&str]) -> PathBuf {
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

/// The example kernel and the initramfs `variant` (`ready` or `never-ready`).
fn example(variant: &str) -> (PathBuf, PathBuf) {
    let kernel = script_output("images/fetch-kernel.sh", &[]).join("vmlinuz");
    let initramfs = script_output("images/microvm-example/build-initramfs.sh", &[variant]);
    (kernel, initramfs)
}

async fn tcg_runtime(dir: &Path) -> MicrovmRuntime {
    // The first probe boots a trial kernel under KVM: off the async worker.
    let probe = tokio::task::spawn_blocking(probe_cached)
        .await
        .expect("the probe task runs");
    let runtime = MicrovmRuntime::new(probe, dir)
        .expect("QEMU is installed by scripts/install-deps")
        .with_accelerator(Accelerator::Tcg);
    println!(
        "microVM under TCG (software emulation, not KVM): qemu {} -M {}",
        runtime.machine().binary,
        runtime.machine().machine
    );
    runtime
}

fn collecting_sink() -> (LogSink, Arc<Mutex<Vec<LogLine>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink: LogSink = {
        let lines = lines.clone();
        Arc::new(move |line: LogLine| lines.lock().expect("test lock").push(line))
    };
    (sink, lines)
}

fn console_has(lines: &Mutex<Vec<LogLine>>, text: &str) -> bool {
    lines
        .lock()
        .expect("test lock")
        .iter()
        .any(|l| l.stream == LogStream::Console && l.text.contains(text))
}

/// Kills QEMU if a failed assertion leaves it running (tests clean up what they start).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !process_gone(self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_logs_its_marker_and_powers_off_on_request() {
    let (kernel, initramfs) = example("ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tcg_runtime(dir.path()).await;
    let spec = MicrovmSpec::new("example", kernel, GuestRoot::Initramfs(initramfs));
    let (sink, lines) = collecting_sink();
    let vm = runtime.start(&spec, sink).await.expect("QEMU starts");
    let _guard = KillOnDrop(vm.pid());
    let boot = vm
        .wait_ready()
        .await
        .expect("the example reaches its marker");
    // Read once QEMU is surely past exec (right after spawn its arguments may not be set yet).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid())).expect("QEMU runs");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(" -accel tcg "),
        "the accelerator shows in QEMU's arguments (and so in ps): {cmdline}"
    );
    println!(
        "booted to LICHEN-READY in {} ms under TCG",
        boot.as_millis()
    );
    assert_eq!(vm.status(), MicrovmStatus::Running);
    assert_eq!(vm.boot_time(), Some(boot));
    assert!(
        console_has(&lines, "LICHEN-READY"),
        "the marker reached the sink"
    );
    // The workload's own periodic line reaches the sink too.
    let ticked = async {
        while !console_has(&lines, "lichen-example tick 1") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), ticked)
        .await
        .expect("the example logs a tick after its marker");
    let usage = vm.usage();
    println!("QEMU usage: {usage:?}");
    assert!(usage.pss_bytes.is_some_and(|b| b > 0), "{usage:?}");
    assert!(usage.rss_bytes >= usage.pss_bytes, "{usage:?}");

    let reason = vm
        .stop(Duration::from_secs(60))
        .await
        .expect("the VM stops");
    assert_eq!(
        reason,
        ExitReason::PoweredOff { requested: true },
        "{reason}"
    );
    assert!(console_has(
        &lines,
        "lichen-example: power button, powering off"
    ));
    assert!(process_gone(vm.pid()), "QEMU is gone");
    assert_eq!(vm.usage(), ResourceUsage::default());
    assert!(
        !dir.path().join("example.qmp").exists(),
        "the QMP socket is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_that_never_prints_its_marker_fails_after_the_timeout_and_qemu_is_gone() {
    let (kernel, initramfs) = example("never-ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tcg_runtime(dir.path()).await;
    let mut spec = MicrovmSpec::new("silent", kernel, GuestRoot::Initramfs(initramfs));
    spec.boot_timeout = Duration::from_secs(4);
    let (sink, lines) = collecting_sink();
    let vm = runtime.start(&spec, sink).await.expect("QEMU starts");
    let pid = vm.pid();
    let _guard = KillOnDrop(pid);
    let failed = vm.wait_ready().await.expect_err("the marker never appears");
    let expected = ExitReason::BootTimeout {
        timeout: Duration::from_secs(4),
        marker: "LICHEN-READY".into(),
    };
    assert_eq!(failed, expected);
    assert_eq!(vm.status(), MicrovmStatus::Exited(expected.clone()));
    assert_eq!(vm.boot_time(), None);
    assert!(
        failed.to_string().starts_with(
            "boot failed: the ready marker \"LICHEN-READY\" did not appear on the console within 4 s"
        ),
        "{failed}"
    );
    assert!(process_gone(pid), "QEMU was killed");
    assert!(!console_has(&lines, "LICHEN-READY"));
    // Stopping an ended VM reports how it ended and does nothing else.
    assert_eq!(vm.stop(Duration::from_secs(1)).await.ok(), Some(expected));
}

#[tokio::test]
async fn a_kernel_qemu_cannot_load_is_a_failed_start_with_qemus_words() {
    let (_, initramfs) = example("ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage-vmlinuz");
    std::fs::write(&garbage, vec![0x5a_u8; 64 * 1024]).expect("write garbage kernel");
    let runtime = tcg_runtime(&dir.path().join("run")).await;
    let mut spec = MicrovmSpec::new("garbage", &garbage, GuestRoot::Initramfs(initramfs));
    spec.boot_timeout = Duration::from_secs(30);
    let (sink, lines) = collecting_sink();
    let vm = runtime.start(&spec, sink).await.expect("QEMU starts");
    let reason = vm.wait().await;
    let ExitReason::StartFailed { message } = &reason else {
        panic!("expected a failed start, got {reason}");
    };
    println!("QEMU said: {message}");
    assert!(message.starts_with("qemu"), "{message}");
    assert!(process_gone(vm.pid()));
    let qemu_lines = lines
        .lock()
        .expect("test lock")
        .iter()
        .filter(|l| l.stream == LogStream::Qemu)
        .count();
    assert!(qemu_lines > 0, "QEMU's error reached the log sink");
}

#[tokio::test]
async fn a_bad_spec_is_refused_before_qemu_starts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tcg_runtime(dir.path()).await;
    let spec = MicrovmSpec::new(
        "missing",
        dir.path().join("no-kernel"),
        GuestRoot::Initramfs(dir.path().join("no-initrd")),
    );
    let (sink, lines) = collecting_sink();
    let err = runtime
        .start(&spec, sink)
        .await
        .expect_err("a missing kernel is refused");
    let text = err.to_string();
    assert!(
        text.starts_with("microvm \"missing\": the kernel ") && text.contains("no-kernel"),
        "{text}"
    );
    assert!(lines.lock().expect("test lock").is_empty());
    assert!(!dir.path().join("missing.qmp").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_the_power_button_is_ended_after_the_grace_period() {
    let (kernel, initramfs) = example("deaf");
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tcg_runtime(dir.path()).await;
    let spec = MicrovmSpec::new("deaf", kernel, GuestRoot::Initramfs(initramfs));
    let (sink, lines) = collecting_sink();
    let vm = runtime.start(&spec, sink).await.expect("QEMU starts");
    let _guard = KillOnDrop(vm.pid());
    vm.wait_ready()
        .await
        .expect("the deaf example reaches its marker");
    let reason = vm.stop(Duration::from_secs(2)).await.expect("the VM stops");
    assert_eq!(reason, ExitReason::Stopped { forced: false }, "{reason}");
    assert!(
        !console_has(&lines, "powering off"),
        "the guest never powered off"
    );
    assert!(process_gone(vm.pid()), "QEMU is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_right_after_start_ends_qemu_through_qmp_not_sigkill() {
    let (kernel, initramfs) = example("ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tcg_runtime(dir.path()).await;
    let spec = MicrovmSpec::new("early", kernel, GuestRoot::Initramfs(initramfs));
    let (sink, _lines) = collecting_sink();
    let vm = runtime.start(&spec, sink).await.expect("QEMU starts");
    let _guard = KillOnDrop(vm.pid());
    // The kernel cannot handle the power button this early, so the grace period runs out.
    let reason = vm.stop(Duration::from_secs(1)).await.expect("the VM stops");
    assert_eq!(reason, ExitReason::Stopped { forced: false }, "{reason}");
    assert_eq!(vm.boot_time(), None);
    assert!(process_gone(vm.pid()), "QEMU is gone");
}
