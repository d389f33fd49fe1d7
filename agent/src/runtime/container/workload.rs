//! `container` workloads behind the common [`Runtime`] / [`Workload`] traits: preparing
//! imports the image (or checks the rootfs) and resolves device grants to device nodes; a
//! workload is a task that runs the container, sends its output to the log hub, and restarts
//! it per the restart policy with back-off.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_devices::board::{Backend, BoardProfile};
use lichen_host_apis::{LogLevel, LogSink as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::image::ImageStore;
use super::{
    Container, ContainerRuntime, ContainerSpec, ContainerStatus, ExitReason, Limits, LogStream,
};
use crate::deployment::{ImageRef, RestartPolicy, WorkloadSpec};
use crate::logs::LogHub;
use crate::runtime::{
    BoxFuture, ExitInfo, PrepareError, Prepared, Runtime, RuntimeStatus, StartInfo, Tier, Usage,
    Workload,
};

/// First restart delay; it doubles after each failed run in a row.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the back-off.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// SIGTERM grace period on stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A container workload ready to start: its root filesystem, what to run, its devices.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedContainer {
    /// sha256 (hex) of the image manifest, or of `rootfs:<path>` for a plain rootfs.
    pub digest: String,
    /// The root filesystem directory (mounted read-only).
    pub rootfs: PathBuf,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Environment: the image's, then the deployment's.
    pub env: Vec<(String, String)>,
    /// Device nodes its grants resolve to.
    pub devices: Vec<PathBuf>,
}

/// Runs `container` workloads with the OCI runtime the probe found.
pub struct ContainerTier {
    runtime: Option<ContainerRuntime>,
    images: ImageStore,
    logs: Arc<LogHub>,
    board: BoardProfile,
}

impl ContainerTier {
    /// A tier using `runtime` (`None` when no OCI runtime works: the isolation probe then
    /// refuses container workloads before they get here), images stored in `images`.
    pub fn new(
        runtime: Option<ContainerRuntime>,
        images: ImageStore,
        logs: Arc<LogHub>,
        board: BoardProfile,
    ) -> Self {
        ContainerTier {
            runtime,
            images,
            logs,
            board,
        }
    }

    async fn load(
        &self,
        spec: &WorkloadSpec,
        stored_digest: Option<&str>,
    ) -> Result<Prepared, PrepareError> {
        let Some(c) = &spec.container else {
            return Err(PrepareError::new(
                "kind",
                "a container workload needs an image or a rootfs",
            ));
        };
        let devices = device_nodes(spec, &self.board)?;
        let (digest, rootfs, image_config) = match &c.image {
            ImageRef::Rootfs(path) => {
                let meta = std::fs::metadata(path).map_err(|e| {
                    PrepareError::new(
                        "rootfs",
                        format!("cannot use rootfs {}: {e}", path.display()),
                    )
                })?;
                if !meta.is_dir() {
                    return Err(PrepareError::new(
                        "rootfs",
                        format!("rootfs {} is not a directory", path.display()),
                    ));
                }
                let digest = hex::encode(Sha256::digest(
                    format!("rootfs:{}", path.display()).as_bytes(),
                ));
                (digest, path.clone(), None)
            }
            ImageRef::Oci(path) => {
                let stored = stored_digest.and_then(|d| self.images.get(d));
                let image = match stored {
                    Some(image) => image,
                    None => {
                        let (store, source) = (self.images.clone(), path.clone());
                        tokio::task::spawn_blocking(move || store.import(&source))
                            .await
                            .map_err(|e| PrepareError::new("image", format!("import failed: {e}")))?
                            .map_err(|message| PrepareError::new("image", message))?
                    }
                };
                (image.digest, image.rootfs, Some(image.config))
            }
        };
        let (entrypoint, cmd, mut env) = match &image_config {
            Some(config) => (
                config.entrypoint.clone(),
                config.cmd.clone(),
                config
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .filter(|(k, _)| k != "PATH")
                    .collect::<Vec<_>>(),
            ),
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        let mut command = c.command.clone().unwrap_or(entrypoint);
        command.extend(c.args.clone().unwrap_or(cmd));
        if command.first().is_none_or(|p| p.is_empty()) {
            return Err(PrepareError::new(
                "command",
                "the image names no entrypoint or command: give `command`",
            ));
        }
        for (key, value) in &c.env {
            env.retain(|(k, _)| k != key);
            env.push((key.clone(), value.clone()));
        }
        Ok(Prepared::Container(Arc::new(PreparedContainer {
            digest,
            rootfs,
            command,
            env,
            devices,
        })))
    }
}

/// The device nodes a container's grants give it: a GPIO pin's gpiochip, an SPI device's
/// spidev node, an I2C bus's i2c-dev node (the whole chip or bus: the kernel cannot hand out
/// a single line or address to another process). Errors name the grant's field.
pub fn device_nodes(
    spec: &WorkloadSpec,
    board: &BoardProfile,
) -> Result<Vec<PathBuf>, PrepareError> {
    let first = spec
        .gpio
        .first()
        .map(|_| "gpio[0].pin")
        .or_else(|| spec.spi.first().map(|_| "spi[0].bus"))
        .or_else(|| spec.i2c.first().map(|_| "i2c[0].bus"));
    let Some(first) = first else {
        return Ok(Vec::new());
    };
    if board.backend == Backend::Sim {
        return Err(PrepareError::new(
            first,
            format!(
                "board \"{}\" simulates its devices inside the agent: there is no device node to give a container (grant devices to wasm workloads, or run on a board with real devices)",
                board.name
            ),
        ));
    }
    let mut nodes: Vec<PathBuf> = Vec::new();
    let mut add = |path: PathBuf| {
        if !nodes.contains(&path) {
            nodes.push(path);
        }
    };
    for (i, grant) in spec.gpio.iter().enumerate() {
        let field = format!("gpio[{i}].pin");
        let pin = board.pin(&grant.pin).ok_or_else(|| {
            PrepareError::new(
                &field,
                format!("pin \"{}\" is not on board \"{}\"", grant.pin, board.name),
            )
        })?;
        add(gpio_chip(&pin.line).map_err(|e| {
            PrepareError::new(
                &field,
                format!("cannot find the gpiochip of pin \"{}\": {e}", grant.pin),
            )
        })?);
    }
    for (i, grant) in spec.spi.iter().enumerate() {
        let bus = board.spi_bus(&grant.bus).ok_or_else(|| {
            PrepareError::new(
                format!("spi[{i}].bus"),
                format!(
                    "SPI device \"{}\" is not on board \"{}\"",
                    grant.bus, board.name
                ),
            )
        })?;
        add(PathBuf::from(&bus.device));
    }
    for (i, grant) in spec.i2c.iter().enumerate() {
        let bus = board.i2c_bus(&grant.bus).ok_or_else(|| {
            PrepareError::new(
                format!("i2c[{i}].bus"),
                format!(
                    "I2C bus \"{}\" is not on board \"{}\"",
                    grant.bus, board.name
                ),
            )
        })?;
        add(PathBuf::from(&bus.device));
    }
    Ok(nodes)
}

#[cfg(target_os = "linux")]
fn gpio_chip(line: &lichen_devices::LineSpec) -> Result<PathBuf, String> {
    lichen_devices::linux::locate(line)
        .map(|l| l.chip)
        .map_err(|e| e.to_string())
}

#[cfg(not(target_os = "linux"))]
fn gpio_chip(_line: &lichen_devices::LineSpec) -> Result<PathBuf, String> {
    Err("GPIO character devices exist on Linux only".into())
}

impl Runtime for ContainerTier {
    fn tier(&self) -> Tier {
        Tier::Container
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a WorkloadSpec,
        stored_digest: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Prepared, PrepareError>> {
        Box::pin(self.load(spec, stored_digest))
    }

    fn start(&self, prepared: Prepared, spec: WorkloadSpec, info: StartInfo) -> Box<dyn Workload> {
        let Prepared::Container(prepared) = prepared else {
            unreachable!("the supervisor starts a workload with the runtime that prepared it")
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                state: "starting".into(),
                digest: prepared.digest.clone(),
                version: info.version,
                ..State::default()
            }),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(
            Runner {
                runtime: self.runtime.clone(),
                logs: self.logs.clone(),
                shared: shared.clone(),
                prepared: prepared.clone(),
                spec: spec.clone(),
                stop: stop_rx,
            }
            .run(),
        );
        Box::new(ContainerWorkload {
            name: spec.name.clone(),
            digest: prepared.digest.clone(),
            spec,
            shared,
            stop: stop_tx,
            task: Some(task),
            runner: self.runtime.as_ref().map(|r| r.oci().kind.to_string()),
            tier: self.clone_handle(),
        })
    }
}

impl ContainerTier {
    fn clone_handle(&self) -> TierHandle {
        TierHandle {
            runtime: self.runtime.clone(),
            logs: self.logs.clone(),
        }
    }
}

/// What a workload needs of its tier to start again after an update.
#[derive(Clone)]
struct TierHandle {
    runtime: Option<ContainerRuntime>,
    logs: Arc<LogHub>,
}

#[derive(Default)]
struct State {
    state: String,
    digest: String,
    version: u64,
    restarts: u64,
    started_at: Option<Instant>,
    last_error: Option<String>,
    exit: Option<ExitInfo>,
    current: Option<Arc<Container>>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The task that runs one container workload, run after run.
struct Runner {
    runtime: Option<ContainerRuntime>,
    logs: Arc<LogHub>,
    shared: Arc<Shared>,
    prepared: Arc<PreparedContainer>,
    spec: WorkloadSpec,
    stop: watch::Receiver<bool>,
}

impl Runner {
    fn container_spec(&self) -> ContainerSpec {
        let mut spec = ContainerSpec::new(
            &self.spec.name,
            self.prepared.rootfs.clone(),
            self.prepared.command.clone(),
        );
        spec.env = self.prepared.env.clone();
        spec.devices = self.prepared.devices.clone();
        spec.limits = Limits {
            memory_bytes: self.spec.limits.memory_bytes,
            cpus: self.spec.limits.cpu_millis.map(|m| f64::from(m) / 1000.0),
            pids: self.spec.limits.pids,
        };
        spec
    }

    fn note(&self, level: LogLevel, message: &str) {
        self.logs.agent_line(&self.spec.name, level, message);
    }

    async fn run(mut self) {
        let name = self.spec.name.clone();
        let mut failures_in_a_row: u32 = 0;
        loop {
            if *self.stop.borrow() {
                break;
            }
            self.shared.with(|s| s.state = "starting".into());
            let Some(runtime) = self.runtime.clone() else {
                self.finish_failed("no OCI runtime works on this host".into());
                return;
            };
            let logs = self.logs.clone();
            let sink: super::LogSink = Arc::new(move |line| {
                let (level, context) = match line.stream {
                    LogStream::Stdout => (LogLevel::Info, "stdout"),
                    LogStream::Stderr => (LogLevel::Warn, "stderr"),
                };
                logs.log(&line.container, level, context, &line.text);
            });
            let started = Instant::now();
            let reason = match runtime.start(&self.container_spec(), sink).await {
                Err(err) => ExitReason::StartFailed {
                    message: err.to_string(),
                },
                Ok(container) => {
                    let container = Arc::new(container);
                    self.shared.with(|s| {
                        s.state = "running".into();
                        s.started_at = Some(Instant::now());
                        s.current = Some(container.clone());
                    });
                    self.note(
                        LogLevel::Info,
                        &format!("container started with {}", runtime.oci().kind),
                    );
                    let reason = tokio::select! {
                        reason = container.wait() => reason,
                        _ = stop_asked(&mut self.stop) => {
                            let reason = container.stop(STOP_GRACE).await.unwrap_or_else(|e| {
                                ExitReason::StartFailed { message: e.to_string() }
                            });
                            self.shared.with(|s| {
                                s.state = "stopped".into();
                                s.started_at = None;
                                s.current = None;
                                s.exit = Some(exit_info(&reason));
                            });
                            return;
                        }
                    };
                    self.shared.with(|s| {
                        s.started_at = None;
                        s.current = None;
                    });
                    reason
                }
            };
            let info = exit_info(&reason);
            let success = matches!(reason, ExitReason::Exited { code: 0 });
            let text = format!("container {}", info.reason);
            self.note(
                if success {
                    LogLevel::Info
                } else {
                    LogLevel::Error
                },
                &text,
            );
            tracing::info!(workload = %name, "{text}");
            self.shared.with(|s| {
                s.exit = Some(info);
                if !success {
                    s.last_error = Some(text.clone());
                }
            });
            let restart = match self.spec.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !success,
                RestartPolicy::Never => false,
            };
            if !restart {
                self.shared.with(|s| {
                    s.state = if success { "completed" } else { "failed" }.into();
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
            self.shared.with(|s| {
                s.state = "backoff".into();
                s.restarts += 1;
            });
            self.note(LogLevel::Info, &format!("restarting in {delay:?}"));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_asked(&mut self.stop) => break,
            }
        }
        self.shared.with(|s| {
            s.state = "stopped".into();
            s.started_at = None;
        });
    }

    fn finish_failed(&self, message: String) {
        self.note(LogLevel::Error, &message);
        self.shared.with(|s| {
            s.state = "failed".into();
            s.last_error = Some(message);
        });
    }
}

/// Resolves once a stop is asked (or the workload handle is gone).
async fn stop_asked(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

fn exit_info(reason: &ExitReason) -> ExitInfo {
    let (code, oom_killed) = match reason {
        ExitReason::Exited { code } => (Some(*code), false),
        ExitReason::OomKilled { code } => (Some(*code), true),
        ExitReason::Signaled { signal } => (Some(128 + signal), false),
        ExitReason::Stopped { .. } | ExitReason::StartFailed { .. } => (None, false),
    };
    ExitInfo {
        reason: reason.to_string(),
        code,
        oom_killed,
    }
}

/// A running `container` workload: its task and shared status.
pub struct ContainerWorkload {
    name: String,
    spec: WorkloadSpec,
    digest: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    runner: Option<String>,
    tier: TierHandle,
}

impl ContainerWorkload {
    async fn stop_task(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Workload for ContainerWorkload {
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
        self.shared.with(|s| {
            let usage = s
                .current
                .as_ref()
                .filter(|c| c.status() == ContainerStatus::Running)
                .map(|c| c.usage())
                .unwrap_or_default();
            RuntimeStatus {
                kind: "container".into(),
                state: s.state.clone(),
                digest: s.digest.clone(),
                version: s.version,
                restarts: s.restarts,
                traps: 0,
                events_handled: 0,
                queue_depth: 0,
                uptime: s.started_at.map(|t| t.elapsed()),
                last_error: s.last_error.clone(),
                exit: s.exit.clone(),
                usage: Usage {
                    memory_bytes: usage.memory_bytes,
                    pids: usage.pids,
                },
                runner: self.runner.clone(),
                accelerator: None,
            }
        })
    }

    fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
            && self.shared.with(|s| s.state == "stopped")
    }

    fn note_error(&self, message: String) {
        self.shared.with(|s| s.last_error = Some(message));
    }

    fn update<'a>(
        &'a mut self,
        prepared: Prepared,
        spec: WorkloadSpec,
        version: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Prepared::Container(prepared) = prepared else {
                return Err("a container workload can only be updated to a container".into());
            };
            // A container has no hot reload: the old run stops, the new one starts.
            self.stop_task().await;
            let (stop_tx, stop_rx) = watch::channel(false);
            self.shared.with(|s| {
                s.digest = prepared.digest.clone();
                s.version = version;
                s.exit = None;
                s.last_error = None;
            });
            self.task = Some(tokio::spawn(
                Runner {
                    runtime: self.tier.runtime.clone(),
                    logs: self.tier.logs.clone(),
                    shared: self.shared.clone(),
                    prepared: prepared.clone(),
                    spec: spec.clone(),
                    stop: stop_rx,
                }
                .run(),
            ));
            self.stop = stop_tx;
            self.digest = prepared.digest.clone();
            self.spec = spec;
            Ok(())
        })
    }

    fn stop(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.stop_task().await;
        })
    }
}

/// Path of the tier's working directory under the state directory.
pub fn work_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("containers")
}
