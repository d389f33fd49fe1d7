//! Starts, watches and stops microVMs: one QEMU child of the agent per workload, its serial
//! console on stdout read line by line as the workload's log, QMP on a Unix socket.
//!
//! Life of a microVM: `Booting` from QEMU's start until a console line holds the ready marker
//! (the boot time), then `Running`. A boot that does not print the marker within the spec's
//! timeout is failed ([`ExitReason::BootTimeout`]) and QEMU is killed. Graceful stop is an ACPI
//! power-button press through QMP `system_powerdown`: on `-M microvm` QEMU's generic event
//! device raises it, Linux's `button` driver turns it into a key event, and the guest's init
//! (or acpid/systemd) powers off; QEMU then reports `SHUTDOWN` with reason `guest-shutdown`
//! and exits. A guest that ignores the button is ended after the grace period with QMP `quit`
//! (what SIGTERM does to QEMU), and if QEMU does not answer, with SIGKILL.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{Notify, watch};

use super::probe::MicrovmProbe;
use super::qemu::{Accelerator, Machine, vm_args};
use super::qmp::Qmp;
use super::usage::ResourceUsage;
use super::{MicrovmError, MicrovmSpec};
use crate::runtime::lines::read_lines;

/// QEMU stderr lines kept to explain a failed start.
const STDERR_TAIL: usize = 8;
/// How long QEMU may take to open its QMP socket.
const QMP_CONNECT: Duration = Duration::from_secs(10);
/// How long a stop waits for a QMP session that is not connected yet.
const QMP_WAIT: Duration = Duration::from_secs(2);
/// How long QEMU may take to exit after QMP `quit`, and then after SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Unix socket paths are limited to 107 bytes.
const MAX_SOCKET_PATH: usize = 107;

const STOP_NONE: u8 = 0;
const STOP_POWERDOWN: u8 = 1;
const STOP_QUIT: u8 = 2;
const STOP_KILL: u8 = 3;
const STOP_BOOT_TIMEOUT: u8 = 4;

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The guest's serial console (kernel messages and the workload's output).
    Console,
    /// QEMU's own stderr (its errors and warnings).
    Qemu,
}

/// One line a microVM printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The microVM's name.
    pub vm: String,
    /// Console or QEMU.
    pub stream: LogStream,
    /// The line without its line ending (invalid UTF-8 replaced, cut at 8 KiB).
    pub text: String,
}

/// Where a microVM's log lines go, one call per line, from the reader tasks.
pub type LogSink = Arc<dyn Fn(LogLine) + Send + Sync>;

/// Why a microVM is no longer running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (QEMU's `SHUTDOWN` reason `guest-shutdown`).
    PoweredOff {
        /// Whether Lichen had asked it to (a graceful stop), rather than the guest deciding.
        requested: bool,
    },
    /// The guest rebooted; QEMU runs with `-no-reboot`, so that ends it.
    GuestReset,
    /// The guest kernel panicked (it reboots at once, which ends QEMU).
    GuestPanicked,
    /// The guest did not power off within the grace period; Lichen ended QEMU.
    Stopped {
        /// `false`: QMP `quit` (QEMU exits as on SIGTERM); `true`: SIGKILL was needed.
        forced: bool,
    },
    /// The ready marker did not appear on the console in time; QEMU was killed.
    BootTimeout {
        /// The spec's boot timeout.
        timeout: Duration,
        /// The marker that was awaited.
        marker: String,
    },
    /// QEMU exited on its own with this code, for no reason it reported.
    Exited {
        /// QEMU's exit code.
        code: i32,
    },
    /// A signal not sent by Lichen killed QEMU.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// QEMU could not start the VM (bad kernel, missing file, refused option).
    StartFailed {
        /// What QEMU said.
        message: String,
    },
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PoweredOff { requested: true } => {
                f.write_str("powered off on request (ACPI power button)")
            }
            ExitReason::PoweredOff { requested: false } => f.write_str("the guest powered off"),
            ExitReason::GuestReset => f.write_str("the guest rebooted, which ends a microVM"),
            ExitReason::GuestPanicked => f.write_str("the guest kernel panicked"),
            ExitReason::Stopped { forced: false } => f.write_str(
                "stopped: the guest did not power off within the grace period, QEMU was told to quit",
            ),
            ExitReason::Stopped { forced: true } => {
                f.write_str("stopped: QEMU was killed with SIGKILL")
            }
            ExitReason::BootTimeout { timeout, marker } => write!(
                f,
                "boot failed: the ready marker {marker:?} did not appear on the console within {} s; QEMU was killed",
                timeout.as_secs_f64()
            ),
            ExitReason::Exited { code } => write!(f, "QEMU exited with code {code}"),
            ExitReason::Signaled { signal } => write!(f, "QEMU was killed by signal {signal}"),
            ExitReason::StartFailed { message } => write!(f, "failed to start: {message}"),
        }
    }
}

/// Where a microVM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MicrovmStatus {
    /// QEMU runs; the ready marker has not appeared yet.
    Booting,
    /// The ready marker appeared.
    Running,
    /// QEMU is gone, for this reason.
    Exited(ExitReason),
}

/// Runs microVMs with one QEMU binary and accelerator, keeping QMP sockets under a directory.
#[derive(Debug, Clone)]
pub struct MicrovmRuntime {
    machine: Machine,
    qemu: PathBuf,
    accel: Accelerator,
    work_dir: PathBuf,
}

impl MicrovmRuntime {
    /// A runtime using what `probe` found (QEMU, and KVM only if its trial boot worked), with
    /// QMP sockets in `work_dir`. Fails, naming the missing piece, when microVMs cannot run.
    pub fn new(probe: &MicrovmProbe, work_dir: impl Into<PathBuf>) -> Result<Self, MicrovmError> {
        let (Some(machine), Ok(qemu), Some(accel)) =
            (probe.machine, &probe.qemu, probe.accelerator())
        else {
            return Err(MicrovmError::Unavailable {
                reason: probe
                    .problem()
                    .unwrap_or_else(|| "no QEMU for this host".into()),
            });
        };
        Ok(MicrovmRuntime {
            machine,
            qemu: qemu.path.clone(),
            accel,
            work_dir: work_dir.into(),
        })
    }

    /// Uses `accel` instead of the probe's choice (tests and benchmarks force TCG; KVM only
    /// works where the probe said it does).
    pub fn with_accelerator(mut self, accel: Accelerator) -> Self {
        self.accel = accel;
        self
    }

    /// The accelerator its microVMs use.
    pub fn accelerator(&self) -> Accelerator {
        self.accel
    }

    /// The QEMU machine its microVMs use.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Starts QEMU for `spec`; console lines go to `logs`. Returns once QEMU is spawned: the
    /// VM is then [`MicrovmStatus::Booting`]; see [`Microvm::wait_ready`].
    pub async fn start(&self, spec: &MicrovmSpec, logs: LogSink) -> Result<Microvm, MicrovmError> {
        let checked = spec.clone();
        tokio::task::spawn_blocking(move || checked.validate())
            .await
            .map_err(|e| MicrovmError::InvalidSpec {
                name: spec.name.clone(),
                reason: format!("validation task failed: {e}"),
            })??;
        let io = |path: &Path, source| MicrovmError::Io {
            name: spec.name.clone(),
            path: path.to_path_buf(),
            source,
        };
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| io(&self.work_dir, e))?;
        let socket = self.work_dir.join(format!("{}.qmp", spec.name));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(MicrovmError::InvalidSpec {
                name: spec.name.clone(),
                reason: format!(
                    "the QMP socket path {socket:?} is longer than {MAX_SOCKET_PATH} bytes; use a shorter work directory"
                ),
            });
        }
        match tokio::fs::remove_file(&socket).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&socket, e)),
        }

        let mut command = Command::new(&self.qemu);
        command
            .args(vm_args(&self.machine, self.accel, spec, &socket))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the agent's terminal is not the VM's.
            .process_group(0);
        let started_at = Instant::now();
        let mut child = command.spawn().map_err(|source| MicrovmError::Spawn {
            name: spec.name.clone(),
            qemu: self.qemu.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);

        let (status_tx, status_rx) = watch::channel(MicrovmStatus::Booting);
        let status_tx = Arc::new(status_tx);
        let boot_time = Arc::new(OnceLock::new());
        let console = Arc::new(ConsoleSeen::default());
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let (name, logs, marker) = (spec.name.clone(), logs.clone(), spec.ready_marker.clone());
            let (status_tx, boot_time, console) =
                (status_tx.clone(), boot_time.clone(), console.clone());
            readers.push(tokio::spawn(read_lines(out, move |text| {
                console.note(&text);
                let ready = boot_time.get().is_none() && text.contains(&marker);
                let seen_at = started_at.elapsed();
                // The marker line is in the log before the status says running.
                logs(LogLine {
                    vm: name.clone(),
                    stream: LogStream::Console,
                    text,
                });
                if ready {
                    let _ = boot_time.set(seen_at);
                    status_tx.send_if_modified(|s| {
                        let booting = *s == MicrovmStatus::Booting;
                        if booting {
                            *s = MicrovmStatus::Running;
                        }
                        booting
                    });
                }
            })));
        }
        if let Some(err) = child.stderr.take() {
            let (name, tail) = (spec.name.clone(), tail.clone());
            readers.push(tokio::spawn(read_lines(err, move |text| {
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(text.clone());
                }
                logs(LogLine {
                    vm: name.clone(),
                    stream: LogStream::Qemu,
                    text,
                });
            })));
        }

        let qmp = Arc::new(OnceLock::new());
        {
            let (qmp, socket, name) = (qmp.clone(), socket.clone(), spec.name.clone());
            tokio::spawn(async move {
                match Qmp::connect(&socket, Instant::now() + QMP_CONNECT).await {
                    Ok(session) => {
                        let _ = qmp.set(session);
                    }
                    Err(e) => tracing::warn!(vm = %name, "no QMP session: {e}"),
                }
            });
        }

        let stop = Arc::new(AtomicU8::new(STOP_NONE));
        let kill = Arc::new(Notify::new());
        let microvm = Microvm {
            name: spec.name.clone(),
            pid,
            accel: self.accel,
            started_at,
            boot_time: boot_time.clone(),
            status: status_rx,
            stop: stop.clone(),
            kill: kill.clone(),
            qmp: qmp.clone(),
        };
        let timeout = spec.boot_timeout;
        let marker = spec.ready_marker.clone();
        tokio::spawn(async move {
            // The timeout is bounded by `validate`; a deadline never overflows regardless.
            let boot_deadline = tokio::time::Instant::from_std(started_at)
                .checked_add(timeout)
                .unwrap_or_else(|| crate::util::deadline_after(timeout));
            let mut timed_out = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = kill.notified() => { let _ = child.start_kill(); }
                    _ = tokio::time::sleep_until(boot_deadline), if !timed_out => {
                        timed_out = true;
                        if boot_time.get().is_none() {
                            stop.store(STOP_BOOT_TIMEOUT, Ordering::SeqCst);
                            let _ = child.start_kill();
                        }
                    }
                }
            };
            for reader in readers {
                // The pipes close when QEMU is gone.
                let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
            }
            let stderr = tail
                .lock()
                .map(|t| t.iter().cloned().collect::<Vec<_>>().join(" / "))
                .unwrap_or_default();
            let event = qmp.get().and_then(Qmp::shutdown_event);
            let reason = exit_reason(
                stop.load(Ordering::SeqCst),
                status,
                event.as_ref().map(|e| e.reason.as_str()),
                &console,
                boot_time.get().is_some(),
                &stderr,
                (timeout, marker),
            );
            let _ = tokio::fs::remove_file(&socket).await;
            status_tx.send_replace(MicrovmStatus::Exited(reason));
        });
        Ok(microvm)
    }
}

/// Console lines that tell how a guest ended, for when QMP could not say.
#[derive(Debug, Default)]
struct ConsoleSeen {
    power_down: AtomicBool,
    restart: AtomicBool,
    panic: AtomicBool,
}

impl ConsoleSeen {
    fn note(&self, line: &str) {
        if line.contains("reboot: Power down") {
            self.power_down.store(true, Ordering::SeqCst);
        } else if line.contains("reboot: Restarting system") {
            self.restart.store(true, Ordering::SeqCst);
        } else if line.contains("Kernel panic - not syncing") {
            self.panic.store(true, Ordering::SeqCst);
        }
    }
}

/// Turns how QEMU ended into a reason: Lichen's own action first, then what the guest did
/// (from the console's panic line and QMP's `SHUTDOWN` event), then QEMU's exit status.
fn exit_reason(
    stop: u8,
    status: std::io::Result<std::process::ExitStatus>,
    shutdown: Option<&str>,
    console: &ConsoleSeen,
    booted: bool,
    stderr: &str,
    (timeout, marker): (Duration, String),
) -> ExitReason {
    use std::os::unix::process::ExitStatusExt;
    let requested = stop == STOP_POWERDOWN;
    if stop == STOP_BOOT_TIMEOUT {
        return ExitReason::BootTimeout { timeout, marker };
    }
    if console.panic.load(Ordering::SeqCst) || shutdown == Some("guest-panic") {
        return ExitReason::GuestPanicked;
    }
    match shutdown {
        Some("guest-shutdown") => return ExitReason::PoweredOff { requested },
        Some("guest-reset") => return ExitReason::GuestReset,
        _ => {}
    }
    match stop {
        STOP_QUIT => return ExitReason::Stopped { forced: false },
        STOP_KILL => return ExitReason::Stopped { forced: true },
        _ => {}
    }
    if console.power_down.load(Ordering::SeqCst) {
        return ExitReason::PoweredOff { requested };
    }
    if console.restart.load(Ordering::SeqCst) {
        return ExitReason::GuestReset;
    }
    match status {
        Err(e) => ExitReason::StartFailed {
            message: format!("cannot wait for QEMU: {e}"),
        },
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) if code != 0 && !booted => ExitReason::StartFailed {
                message: if stderr.is_empty() {
                    format!("QEMU exited with code {code}")
                } else {
                    stderr.to_string()
                },
            },
            (Some(code), _) => ExitReason::Exited { code },
            (None, Some(signal)) => ExitReason::Signaled { signal },
            (None, None) => ExitReason::Exited { code: -1 },
        },
    }
}

/// A started microVM. Dropping the handle leaves QEMU running: call [`Microvm::stop`].
#[derive(Debug)]
pub struct Microvm {
    name: String,
    pid: u32,
    accel: Accelerator,
    started_at: Instant,
    boot_time: Arc<OnceLock<Duration>>,
    status: watch::Receiver<MicrovmStatus>,
    stop: Arc<AtomicU8>,
    kill: Arc<Notify>,
    qmp: Arc<OnceLock<Qmp>>,
}

impl Microvm {
    /// The workload's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The accelerator it runs under (also in QEMU's `-accel` argument, visible in `ps`).
    pub fn accelerator(&self) -> Accelerator {
        self.accel
    }

    /// When QEMU was started.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// QEMU's start to the console line with the ready marker, once it has appeared.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get().copied()
    }

    /// Booting, running, or exited with a reason.
    pub fn status(&self) -> MicrovmStatus {
        self.status.borrow().clone()
    }

    /// Waits until the ready marker appears (returning the boot time) or the VM ends first
    /// (returning why, for example [`ExitReason::BootTimeout`]).
    pub async fn wait_ready(&self) -> Result<Duration, ExitReason> {
        let mut rx = self.status.clone();
        loop {
            match &*rx.borrow_and_update() {
                MicrovmStatus::Booting => {}
                MicrovmStatus::Running => {
                    return Ok(self.boot_time().unwrap_or_default());
                }
                MicrovmStatus::Exited(reason) => return Err(reason.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(gone(&rx));
            }
        }
    }

    /// Waits until QEMU has exited, and says why.
    pub async fn wait(&self) -> ExitReason {
        let mut rx = self.status.clone();
        loop {
            if let MicrovmStatus::Exited(reason) = &*rx.borrow_and_update() {
                return reason.clone();
            }
            if rx.changed().await.is_err() {
                return gone(&rx);
            }
        }
    }

    /// QEMU's memory now (RSS and PSS); empty once it has exited.
    pub fn usage(&self) -> ResourceUsage {
        if matches!(self.status(), MicrovmStatus::Exited(_)) || self.pid == 0 {
            return ResourceUsage::default();
        }
        ResourceUsage::of_process(self.pid)
    }

    /// Stops it: an ACPI power-button press (QMP `system_powerdown`), then QMP `quit` if the
    /// guest has not powered off after `grace`, then SIGKILL. Returns why it exited (which may
    /// be something else if it ended on its own first).
    pub async fn stop(&self, grace: Duration) -> Result<ExitReason, MicrovmError> {
        if let MicrovmStatus::Exited(reason) = self.status() {
            return Ok(reason);
        }
        // Right after start QEMU may not have opened QMP yet: give it a moment.
        let connect_by = Instant::now() + QMP_WAIT;
        while self.qmp.get().is_none() && Instant::now() < connect_by {
            if let Ok(reason) = tokio::time::timeout(Duration::from_millis(20), self.wait()).await {
                return Ok(reason);
            }
        }
        if let Some(qmp) = self.qmp.get() {
            self.stop.store(STOP_POWERDOWN, Ordering::SeqCst);
            if let Err(e) = qmp.execute("system_powerdown").await {
                tracing::warn!(vm = %self.name, "QMP system_powerdown failed: {e}");
            } else if let Ok(reason) = tokio::time::timeout(grace, self.wait()).await {
                return Ok(reason);
            }
            self.stop.store(STOP_QUIT, Ordering::SeqCst);
            // `quit` may close the socket before it replies; the exit is what counts.
            let _ = qmp.execute("quit").await;
            if let Ok(reason) = tokio::time::timeout(QUIT_TIMEOUT, self.wait()).await {
                return Ok(reason);
            }
        }
        self.stop.store(STOP_KILL, Ordering::SeqCst);
        self.kill.notify_one();
        if let Ok(reason) = tokio::time::timeout(QUIT_TIMEOUT, self.wait()).await {
            return Ok(reason);
        }
        Err(MicrovmError::Stuck {
            name: self.name.clone(),
            pid: self.pid,
        })
    }
}

/// The reason to report when the watcher task is gone without a verdict.
fn gone(rx: &watch::Receiver<MicrovmStatus>) -> ExitReason {
    match &*rx.borrow() {
        MicrovmStatus::Exited(reason) => reason.clone(),
        _ => ExitReason::StartFailed {
            message: "the agent's runtime shut down before the microVM exited".into(),
        },
    }
}

#[cfg(test)]
mod reason_tests;
