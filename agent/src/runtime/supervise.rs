//! The run loop shared by the runtimes whose workloads are processes (containers, microVMs):
//! run once, record why the run ended, and start again per the restart policy with back-off,
//! until a stop is asked. Each runtime supplies only "run once" (and, through [`ProcessKind`],
//! how to start its loop); [`ProcessWorkload`] is the workload handle they share.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_host_apis::LogLevel;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BoxFuture, ExitInfo, Prepared, RuntimeStatus, UpdateError, Usage, Workload};
use crate::deployment::{RestartPolicy, WorkloadSpec, WorkloadState};
use crate::logs::LogHub;

/// First restart delay; it doubles after each failed run in a row.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the back-off.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Something running whose resources can be read now (a container, a QEMU process).
pub(crate) trait LiveUsage: Send + Sync {
    /// Resources used now.
    fn usage(&self) -> Usage;
}

/// The status of a supervised workload, shared by its task and its handle.
#[derive(Default)]
pub(crate) struct ProcState {
    /// `starting`, `running`, `backoff`, `failed`, `completed`, `stopped`.
    pub(crate) state: WorkloadState,
    pub(crate) digest: String,
    pub(crate) version: u64,
    pub(crate) restarts: u64,
    pub(crate) started_at: Option<Instant>,
    pub(crate) last_error: Option<String>,
    pub(crate) exit: Option<ExitInfo>,
    /// What runs now, for its usage.
    pub(crate) live: Option<Arc<dyn LiveUsage>>,
    /// MicroVMs: the accelerator of the current run.
    pub(crate) accelerator: Option<String>,
}

/// [`ProcState`] behind a lock.
#[derive(Default)]
pub(crate) struct Shared(Mutex<ProcState>);

impl Shared {
    /// Runs `f` on the state.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut ProcState) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The status for `ps`.
    pub(crate) fn status(&self, kind: &str, runner: Option<String>) -> RuntimeStatus {
        self.with(|s| RuntimeStatus {
            kind: kind.to_string(),
            state: s.state,
            digest: s.digest.clone(),
            version: s.version,
            restarts: s.restarts,
            traps: 0,
            events_handled: 0,
            queue_depth: 0,
            uptime: s.started_at.map(|t| t.elapsed()),
            last_error: s.last_error.clone(),
            exit: s.exit.clone(),
            usage: s.live.as_ref().map(|l| l.usage()).unwrap_or_default(),
            runner,
            accelerator: s.accelerator.clone(),
        })
    }
}

/// How one run ended.
pub(crate) enum RunEnd {
    /// It ended by itself (or failed to start); `success` decides `on-failure` restarts.
    Ended {
        /// Why, for `ps`.
        info: ExitInfo,
        /// Whether it counts as a success.
        success: bool,
    },
    /// A stop was asked and it is gone.
    Stopped(ExitInfo),
}

/// Runs one run: given the stop signal, returns how the run ended. It sets `running` (and
/// `live`, `started_at`) in the shared state itself once its process is up.
pub(crate) type RunOnce =
    Box<dyn FnMut(watch::Receiver<bool>) -> BoxFuture<'static, RunEnd> + Send>;

/// A supervised workload's task and its stop switch.
pub(crate) struct Supervised {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Supervised {
    /// Starts the loop for workload `name`; `what` names the kind in log lines (`container`).
    pub(crate) fn spawn(
        what: &'static str,
        name: String,
        logs: Arc<LogHub>,
        shared: Arc<Shared>,
        restart: RestartPolicy,
        run_once: RunOnce,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_loop(
            what, name, logs, shared, restart, stop_rx, run_once,
        ));
        Supervised {
            stop,
            task: Some(task),
        }
    }

    /// Asks the loop to stop (the current run is stopped) and waits for it.
    pub(crate) async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Whether the loop has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// Resolves once a stop is asked (or the handle is gone).
pub(crate) async fn stop_asked(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

async fn run_loop(
    what: &'static str,
    name: String,
    logs: Arc<LogHub>,
    shared: Arc<Shared>,
    restart: RestartPolicy,
    mut stop: watch::Receiver<bool>,
    mut run_once: RunOnce,
) {
    let mut failures_in_a_row: u32 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        shared.with(|s| s.state = WorkloadState::Starting);
        let started = Instant::now();
        let (info, success) = match run_once(stop.clone()).await {
            RunEnd::Stopped(info) => {
                shared.with(|s| {
                    s.exit = Some(info);
                    s.started_at = None;
                    s.live = None;
                });
                break;
            }
            RunEnd::Ended { info, success } => (info, success),
        };
        let text = format!("{what} {}", info.reason);
        logs.agent_line(
            &name,
            if success {
                LogLevel::Info
            } else {
                LogLevel::Error
            },
            &text,
        );
        tracing::info!(workload = %name, "{text}");
        shared.with(|s| {
            s.exit = Some(info);
            s.started_at = None;
            s.live = None;
            if !success {
                s.last_error = Some(text.clone());
            }
        });
        let again = match restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if !again {
            shared.with(|s| {
                s.state = if success {
                    WorkloadState::Completed
                } else {
                    WorkloadState::Failed
                }
            });
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures_in_a_row = 0;
        }
        let delay = BACKOFF_START
            .saturating_mul(1u32 << failures_in_a_row.min(16))
            .min(BACKOFF_MAX);
        failures_in_a_row = failures_in_a_row.saturating_add(1);
        shared.with(|s| {
            s.state = WorkloadState::Backoff;
            s.restarts += 1;
        });
        logs.agent_line(&name, LogLevel::Info, &format!("restarting in {delay:?}"));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_asked(&mut stop) => break,
        }
    }
    shared.with(|s| {
        s.state = WorkloadState::Stopped;
        s.started_at = None;
        s.live = None;
    });
}

/// A kind whose workloads are supervised processes (containers, microVMs): what
/// [`ProcessWorkload`] needs to know of it.
pub(crate) trait ProcessKind: Send + Sync + 'static {
    /// This kind's prepared artifact.
    type Artifact: Send + Sync + 'static;
    /// The kind's name in `ps`: `container`, `microvm`.
    const KIND: &'static str;
    /// The program that runs the workloads (`runc`, `qemu-system-x86_64`), for `ps`.
    fn runner(&self) -> Option<String>;
    /// This kind's artifact in `prepared` with its digest, or why `prepared` is of another
    /// kind.
    fn unpack(prepared: Prepared) -> Result<(Arc<Self::Artifact>, String), UpdateError>;
    /// Starts the run loop of the workload `spec` on `artifact`.
    fn supervise(
        &self,
        shared: &Arc<Shared>,
        artifact: Arc<Self::Artifact>,
        spec: &WorkloadSpec,
    ) -> Supervised;
}

/// A running container or microVM workload: its run loop and shared status. These kinds
/// have no hot reload and take no events: an update stops the old run and starts the new one.
pub(crate) struct ProcessWorkload<K: ProcessKind> {
    name: String,
    spec: WorkloadSpec,
    digest: String,
    shared: Arc<Shared>,
    supervised: Supervised,
    kind: K,
}

impl<K: ProcessKind> ProcessWorkload<K> {
    /// Starts the run loop of `spec` on `artifact` (whose digest is `digest`) with `kind`.
    pub(crate) fn start(
        kind: K,
        shared: Arc<Shared>,
        artifact: Arc<K::Artifact>,
        digest: String,
        spec: WorkloadSpec,
    ) -> Self {
        let supervised = kind.supervise(&shared, artifact, &spec);
        ProcessWorkload {
            name: spec.name.clone(),
            spec,
            digest,
            shared,
            supervised,
            kind,
        }
    }
}

impl<K: ProcessKind> Workload for ProcessWorkload<K> {
    fn name(&self) -> &str {
        &self.name
    }

    fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    fn digest(&self) -> &str {
        &self.digest
    }

    fn status(&self) -> RuntimeStatus {
        self.shared.status(K::KIND, self.kind.runner())
    }

    fn is_finished(&self) -> bool {
        self.supervised.is_finished() && self.shared.with(|s| s.state == WorkloadState::Stopped)
    }

    fn note_error(&self, message: String) {
        self.shared.with(|s| s.last_error = Some(message));
    }

    fn update<'a>(
        &'a mut self,
        prepared: Prepared,
        spec: WorkloadSpec,
        version: u64,
    ) -> BoxFuture<'a, Result<(), UpdateError>> {
        Box::pin(async move {
            let (artifact, digest) = K::unpack(prepared)?;
            self.supervised.stop().await;
            self.shared.with(|s| {
                s.digest = digest.clone();
                s.version = version;
                s.exit = None;
                s.last_error = None;
            });
            self.supervised = self.kind.supervise(&self.shared, artifact, &spec);
            self.digest = digest;
            self.spec = spec;
            Ok(())
        })
    }

    fn stop(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.supervised.stop().await;
        })
    }
}
