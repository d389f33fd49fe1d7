//! Starts, watches and stops containers through the OCI runtime's command line.
//!
//! Each container is one `RUNTIME run --keep` child of the agent with stdin closed and
//! stdout/stderr on pipes: the runtime hands the pipes to the container, waits for it and exits
//! with its status (128 + signal when it was killed). `--keep` leaves the stopped container and
//! its cgroup in place, so the OOM counter can be read before `delete` removes both.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncRead;
use tokio::process::Command;
use tokio::sync::watch;

use super::cgroup::{CgroupPaths, CgroupProbe};
use super::probe::OciRuntime;
use super::{Bundle, ContainerError, ContainerSpec};

/// stderr lines kept to explain a failed start.
const STDERR_TAIL: usize = 8;
/// How long to wait for the container to go after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

const STOP_NONE: u8 = 0;
const STOP_TERM: u8 = 1;
const STOP_KILL: u8 = 2;

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The container's stdout.
    Stdout,
    /// The container's stderr (also where the OCI runtime reports a failed start).
    Stderr,
}

/// One line a container printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The container's name.
    pub container: String,
    /// stdout or stderr.
    pub stream: LogStream,
    /// The line without its newline (invalid UTF-8 replaced, cut at 8 KiB).
    pub text: String,
}

/// Where a container's log lines go, one call per line, from the reader tasks.
pub type LogSink = Arc<dyn Fn(LogLine) + Send + Sync>;

/// Why a container is no longer running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Its process exited with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A signal (not from Lichen) killed it.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// The kernel's OOM killer killed a process of it at its memory limit.
    OomKilled {
        /// The exit code the runtime reported (137 when the main process was killed).
        code: i32,
    },
    /// Lichen stopped it.
    Stopped {
        /// Whether SIGKILL was needed after the grace period.
        forced: bool,
    },
    /// The OCI runtime could not create or start it.
    StartFailed {
        /// What the runtime said.
        message: String,
    },
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Exited { code } => write!(f, "exited with code {code}"),
            ExitReason::Signaled { signal } => write!(f, "killed by signal {signal}"),
            ExitReason::OomKilled { code } => {
                write!(
                    f,
                    "killed by the OOM killer at its memory limit (exit code {code})"
                )
            }
            ExitReason::Stopped { forced: false } => f.write_str("stopped with SIGTERM"),
            ExitReason::Stopped { forced: true } => {
                f.write_str("stopped with SIGKILL after the grace period")
            }
            ExitReason::StartFailed { message } => write!(f, "failed to start: {message}"),
        }
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerStatus {
    /// The runtime is running it (or still creating it).
    Running,
    /// It is gone, for this reason; its bundle and runtime state are removed.
    Exited(ExitReason),
}

/// What a container uses now, read from its cgroup; `None` when the counter is unavailable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// Memory charged to it, in bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads in it.
    pub pids: Option<u64>,
}

/// Runs containers with one OCI runtime, keeping bundles and runtime state under a directory.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    oci: OciRuntime,
    cgroup: CgroupProbe,
    work_dir: PathBuf,
    cgroup_parent: String,
}

impl ContainerRuntime {
    /// A runtime using `oci`, with bundles in `work_dir/bundles/` and the runtime's state in
    /// `work_dir/state/`. Containers' cgroups go under `/lichen`.
    pub fn new(oci: OciRuntime, cgroup: CgroupProbe, work_dir: impl Into<PathBuf>) -> Self {
        ContainerRuntime {
            oci,
            cgroup,
            work_dir: work_dir.into(),
            cgroup_parent: "/lichen".into(),
        }
    }

    /// Puts containers' cgroups under another absolute parent, for example `/lichen-test`.
    pub fn with_cgroup_parent(mut self, parent: &str) -> Self {
        self.cgroup_parent = format!("/{}", parent.trim_matches('/'));
        self
    }

    /// The OCI runtime in use.
    pub fn oci(&self) -> &OciRuntime {
        &self.oci
    }

    /// The runtime's id for a container name.
    pub fn container_id(name: &str) -> String {
        format!("lichen-{name}")
    }

    /// The bundle directory of a container name.
    pub fn bundle_dir(&self, name: &str) -> PathBuf {
        self.work_dir.join("bundles").join(Self::container_id(name))
    }

    /// Writes the bundle and starts the container; its output goes to `logs` line by line.
    /// A container of the same name left over by a crashed agent is deleted first. Returns once
    /// the runtime is running: a container the runtime cannot create shows as
    /// [`ExitReason::StartFailed`].
    pub async fn start(
        &self,
        spec: &ContainerSpec,
        logs: LogSink,
    ) -> Result<Container, ContainerError> {
        spec.validate()?;
        let id = Self::container_id(&spec.name);
        let state_root = self.work_dir.join("state");
        let _ = self
            .oci_command(&state_root, &["delete", "--force", &id])
            .output()
            .await;
        let cgroups_path = format!("{}/{id}", self.cgroup_parent);
        let dir = self.bundle_dir(&spec.name);
        // Writing the bundle stats device nodes and writes a file: off the async workers.
        let bundle = {
            let (b_dir, b_spec, b_path, b_cgroup) = (
                dir.clone(),
                spec.clone(),
                cgroups_path.clone(),
                self.cgroup.clone(),
            );
            tokio::task::spawn_blocking(move || Bundle::write(&b_dir, &b_spec, &b_path, &b_cgroup))
                .await
                .map_err(|e| ContainerError::Bundle {
                    name: spec.name.clone(),
                    path: dir.clone(),
                    source: std::io::Error::other(e),
                })??
        };

        // The runtime's own messages go to a JSON log in the bundle, apart from the container's
        // stderr, so a failed start is told from a container that printed and exited.
        let runtime_log = bundle.dir.join("runtime.log");
        let mut command = Command::new(&self.oci.path);
        command
            .arg("--root")
            .arg(&state_root)
            .arg("--log")
            .arg(&runtime_log)
            .args(["--log-format", "json", "run", "--keep", "--bundle"])
            .arg(&bundle.dir)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the agent's terminal is not the container's.
            .process_group(0);
        let started_at = Instant::now();
        let mut child = command.spawn().map_err(|source| ContainerError::Spawn {
            name: spec.name.clone(),
            runtime: self.oci.kind.to_string(),
            verb: "run",
            source,
        })?;

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(read_lines(
                out,
                spec.name.clone(),
                LogStream::Stdout,
                logs.clone(),
                None,
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(read_lines(
                err,
                spec.name.clone(),
                LogStream::Stderr,
                logs,
                Some(tail.clone()),
            )));
        }

        let (status_tx, status_rx) = watch::channel(ContainerStatus::Running);
        let stop = Arc::new(AtomicU8::new(STOP_NONE));
        let cgroup = CgroupPaths::new(self.cgroup.layout, &cgroups_path);
        let container = Container {
            name: spec.name.clone(),
            id: id.clone(),
            oci: self.oci.clone(),
            state_root: state_root.clone(),
            bundle_dir: bundle.dir.clone(),
            cgroup: cgroup.clone(),
            status: status_rx,
            stop: stop.clone(),
            started_at,
            exited_after: Arc::new(OnceLock::new()),
        };
        let exited_after = container.exited_after.clone();
        let watcher = Watcher {
            oci: self.oci.clone(),
            state_root,
            id,
            bundle,
            cgroup,
            stop,
            tail,
        };
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exited_after.set(started_at.elapsed());
            for reader in readers {
                // The pipes close when the container's last process is gone.
                let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
            }
            let reason = watcher.finish(status).await;
            let _ = status_tx.send(ContainerStatus::Exited(reason));
        });
        Ok(container)
    }

    /// Removes this runtime's cgroup parent directory (in every v1 hierarchy, or the unified
    /// one) once its containers are gone; a parent that still holds a container stays. Blocking
    /// (a few `rmdir`s).
    pub fn remove_cgroup_parent(&self) {
        let parent = self.cgroup_parent.trim_start_matches('/');
        if parent.is_empty() {
            return;
        }
        let root = Path::new("/sys/fs/cgroup");
        let hierarchies: Vec<PathBuf> = match self.cgroup.layout {
            super::CgroupLayout::V2 => vec![root.to_path_buf()],
            super::CgroupLayout::V1 | super::CgroupLayout::Hybrid => std::fs::read_dir(root)
                .map(|dirs| {
                    dirs.flatten()
                        .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|d| d.path())
                        .collect()
                })
                .unwrap_or_default(),
            super::CgroupLayout::Missing => Vec::new(),
        };
        for hierarchy in hierarchies {
            let _ = std::fs::remove_dir(hierarchy.join(parent));
        }
    }

    /// Deletes every container this runtime's state directory still holds and their bundles:
    /// what an agent killed with SIGKILL left running. Returns the ids deleted.
    pub async fn remove_leftovers(&self) -> Vec<String> {
        let state_root = self.work_dir.join("state");
        if !state_root.is_dir() {
            return Vec::new();
        }
        let listed = self
            .oci_command(&state_root, &["list", "-q"])
            .stdout(Stdio::piped())
            .output()
            .await;
        let ids: Vec<String> = match listed {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|id| id.starts_with("lichen-"))
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        for id in &ids {
            let _ = self
                .oci_command(&state_root, &["delete", "--force", id])
                .output()
                .await;
        }
        let _ = std::fs::remove_dir_all(self.work_dir.join("bundles"));
        ids
    }

    fn oci_command(&self, state_root: &Path, args: &[&str]) -> Command {
        oci_command(&self.oci, state_root, args)
    }
}

fn oci_command(oci: &OciRuntime, state_root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(&oci.path);
    command
        .arg("--root")
        .arg(state_root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// What the background task needs to turn the runtime's exit into a reason and clean up.
struct Watcher {
    oci: OciRuntime,
    state_root: PathBuf,
    id: String,
    bundle: Bundle,
    cgroup: CgroupPaths,
    stop: Arc<AtomicU8>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Watcher {
    /// The last error the runtime logged about this container, if any.
    fn runtime_error(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.bundle.dir.join("runtime.log")).ok()?;
        log.lines().rev().find_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            (entry["level"] == "error").then(|| entry["msg"].as_str().map(str::to_string))?
        })
    }

    async fn finish(self, status: std::io::Result<std::process::ExitStatus>) -> ExitReason {
        // With --keep a container that was created is still known to the runtime, stopped.
        let created = oci_command(&self.oci, &self.state_root, &["state", &self.id])
            .output()
            .await
            .is_ok_and(|o| o.status.success());
        let oom_kills = self.cgroup.oom_kills().unwrap_or(0);
        let reason = match (status, created) {
            (Err(err), _) => ExitReason::StartFailed {
                message: format!("cannot wait for {}: {err}", self.oci.kind),
            },
            (Ok(status), false) => {
                let tail = self
                    .tail
                    .lock()
                    .map(|t| t.iter().cloned().collect::<Vec<_>>());
                let said = tail.unwrap_or_default().join(" / ");
                ExitReason::StartFailed {
                    message: if said.is_empty() {
                        format!("{} {status}", self.oci.kind)
                    } else {
                        said
                    },
                }
            }
            (Ok(_), true) if let Some(message) = self.runtime_error() => {
                ExitReason::StartFailed { message }
            }
            (Ok(status), true) => {
                let code = status.code().unwrap_or(-1);
                match self.stop.load(Ordering::SeqCst) {
                    STOP_TERM => ExitReason::Stopped { forced: false },
                    STOP_KILL => ExitReason::Stopped { forced: true },
                    _ if oom_kills > 0 => ExitReason::OomKilled { code },
                    _ if code > 128 => ExitReason::Signaled { signal: code - 128 },
                    _ => ExitReason::Exited { code },
                }
            }
        };
        let deleted = oci_command(
            &self.oci,
            &self.state_root,
            &["delete", "--force", &self.id],
        )
        .output()
        .await;
        if let Ok(out) = &deleted
            && !out.status.success()
            && created
        {
            tracing::warn!(
                container = %self.id,
                "{} delete failed: {}",
                self.oci.kind,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if let Err(err) = self.bundle.remove() {
            tracing::warn!(container = %self.id, "cannot remove bundle {:?}: {err}", self.bundle.dir);
        }
        reason
    }
}

/// A started container. Dropping the handle leaves the container running: call
/// [`Container::stop`] to end it.
#[derive(Debug)]
pub struct Container {
    name: String,
    id: String,
    oci: OciRuntime,
    state_root: PathBuf,
    bundle_dir: PathBuf,
    cgroup: CgroupPaths,
    status: watch::Receiver<ContainerStatus>,
    stop: Arc<AtomicU8>,
    started_at: Instant,
    exited_after: Arc<OnceLock<Duration>>,
}

impl Container {
    /// The workload's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OCI runtime's id for it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its bundle directory (removed once it has exited).
    pub fn bundle_dir(&self) -> &Path {
        &self.bundle_dir
    }

    /// When the runtime was started.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Time from the start of the runtime to its exit (before cleanup), once it has exited.
    pub fn run_time(&self) -> Option<Duration> {
        self.exited_after.get().copied()
    }

    /// Running, or exited with a reason.
    pub fn status(&self) -> ContainerStatus {
        self.status.borrow().clone()
    }

    /// Waits until it has exited and been cleaned up, and says why it exited.
    pub async fn wait(&self) -> ExitReason {
        let mut rx = self.status.clone();
        loop {
            if let ContainerStatus::Exited(reason) = &*rx.borrow_and_update() {
                return reason.clone();
            }
            if rx.changed().await.is_err() {
                // The watcher task is gone without a verdict (the runtime was shut down).
                return match &*rx.borrow() {
                    ContainerStatus::Exited(reason) => reason.clone(),
                    ContainerStatus::Running => ExitReason::StartFailed {
                        message: "the agent's runtime shut down before the container exited".into(),
                    },
                };
            }
        }
    }

    /// Memory and processes it uses now.
    pub fn usage(&self) -> ResourceUsage {
        ResourceUsage {
            memory_bytes: self.cgroup.memory_current(),
            pids: self.cgroup.pids_current(),
        }
    }

    /// Stops it: SIGTERM, then SIGKILL if it is still running after `grace`; then the runtime
    /// deletes it and its bundle is removed. Returns why it exited (which may be something
    /// else if it exited on its own first).
    pub async fn stop(&self, grace: Duration) -> Result<ExitReason, ContainerError> {
        if let ContainerStatus::Exited(reason) = self.status() {
            return Ok(reason);
        }
        self.stop.store(STOP_TERM, Ordering::SeqCst);
        if let Some(reason) = self.signal_until("TERM", Instant::now() + grace).await {
            return Ok(reason);
        }
        self.stop.store(STOP_KILL, Ordering::SeqCst);
        if let Some(reason) = self
            .signal_until("KILL", Instant::now() + KILL_TIMEOUT)
            .await
        {
            return Ok(reason);
        }
        Err(ContainerError::Runtime {
            name: self.name.clone(),
            runtime: self.oci.kind.to_string(),
            verb: "kill",
            message: format!("still running {KILL_TIMEOUT:?} after SIGKILL"),
        })
    }

    /// Sends `signal` (again every 200 ms, in case the runtime had not created the container
    /// yet) until it has exited or `deadline` passes.
    async fn signal_until(&self, signal: &str, deadline: Instant) -> Option<ExitReason> {
        loop {
            let _ = oci_command(&self.oci, &self.state_root, &["kill", &self.id, signal])
                .output()
                .await;
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let step = (deadline - now).min(Duration::from_millis(200));
            if let Ok(reason) = tokio::time::timeout(step, self.wait()).await {
                return Some(reason);
            }
        }
    }
}

/// Reads `stream` line by line into `sink`, keeping the last lines in `tail` if given.
async fn read_lines<R: AsyncRead + Unpin>(
    stream: R,
    container: String,
    which: LogStream,
    sink: LogSink,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    crate::runtime::lines::read_lines(stream, |text| {
        if let Some(tail) = &tail
            && let Ok(mut tail) = tail.lock()
        {
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(text.clone());
        }
        sink(LogLine {
            container: container.clone(),
            stream: which,
            text,
        });
    })
    .await;
}
