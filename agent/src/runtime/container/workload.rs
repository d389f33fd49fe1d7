//! `container` workloads behind the common [`Runtime`] / [`Workload`] traits: preparing
//! imports the image (or checks the rootfs) and resolves device grants to device nodes; a
//! workload is a task that runs the container, sends its output to the log hub, and restarts
//! it per the restart policy with back-off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lichen_devices::board::{Backend, BoardProfile};
use lichen_host_apis::{LogLevel, LogSink as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::image::ImageStore;
use super::{
    Container, ContainerRuntime, ContainerSpec, ContainerStatus, ExitReason, Limits, LogStream,
};
use crate::deployment::{Artifact, ImageRef, WorkloadSpec, WorkloadState};
use crate::logs::LogHub;
use crate::runtime::supervise::{
    LiveUsage, ProcessKind, ProcessWorkload, RunEnd, RunOnce, Shared, Supervised, stop_asked,
};
use crate::runtime::{
    BoxFuture, ExitInfo, PrepareError, Prepared, Runtime, StartInfo, Tier, UpdateError, Usage,
    Workload,
};

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

    /// The image store (for garbage collection of images no deployment uses:
    /// [`ImageStore::remove_unused`]).
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    async fn load(
        &self,
        spec: &WorkloadSpec,
        stored_digest: Option<&str>,
    ) -> Result<Prepared, PrepareError> {
        let Artifact::Container(c) = &spec.artifact else {
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
                            .map_err(|message| PrepareError::new("image", message.to_string()))?
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
fn gpio_chip(line: &lichen_devices::LineSpec) -> Result<PathBuf, lichen_devices::Error> {
    lichen_devices::linux::locate(line).map(|l| l.chip)
}

#[cfg(not(target_os = "linux"))]
fn gpio_chip(_line: &lichen_devices::LineSpec) -> Result<PathBuf, &'static str> {
    Err("GPIO character devices exist on Linux only")
}

impl Runtime for ContainerTier {
    fn tier(&self) -> Tier {
        Tier::Container
    }

    fn probe<'a>(&'a self) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            self.runtime
                .as_ref()
                .map(|r| format!("{} ({})", r.oci().kind, r.oci().version))
                .ok_or_else(|| "a working OCI runtime (crun or runc)".to_string())
        })
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a WorkloadSpec,
        stored_digest: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Prepared, PrepareError>> {
        Box::pin(self.load(spec, stored_digest))
    }

    fn release<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(runtime) = self.runtime.clone() {
                let _ = tokio::task::spawn_blocking(move || runtime.remove_cgroup_parent()).await;
            }
        })
    }

    fn collect_garbage<'a>(
        &'a self,
        in_use: &'a std::collections::BTreeSet<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (images, in_use) = (self.images.clone(), in_use.clone());
            match tokio::task::spawn_blocking(move || images.remove_unused(&in_use)).await {
                Ok(Ok(removed)) if !removed.is_empty() => {
                    tracing::info!(images = ?removed, "removed images that no deployment uses");
                }
                Ok(Ok(_)) => {}
                Ok(Err(err)) => tracing::warn!(%err, "cannot remove unused images"),
                Err(err) => tracing::warn!(%err, "removing unused images failed"),
            }
        })
    }

    fn recover<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // Scratch directories of imports cut short by a killed agent.
            let images = self.images.clone();
            match tokio::task::spawn_blocking(move || images.remove_scratch()).await {
                Ok(Ok(left)) if !left.is_empty() => tracing::warn!(
                    scratch = ?left,
                    "removed image scratch directories left by an agent that did not finish"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(err)) => tracing::warn!(%err, "cannot clear the image store's scratch"),
                Err(err) => tracing::warn!(%err, "clearing the image store's scratch failed"),
            }
            let Some(runtime) = &self.runtime else {
                return;
            };
            let left = runtime.remove_leftovers().await;
            if !left.is_empty() {
                tracing::warn!(
                    containers = ?left,
                    "deleted containers left running by an agent that did not stop them"
                );
            }
        })
    }

    fn start(&self, prepared: Prepared, spec: WorkloadSpec, info: StartInfo) -> Box<dyn Workload> {
        let Prepared::Container(prepared) = prepared else {
            unreachable!("the supervisor starts a workload with the runtime that prepared it")
        };
        let shared = Arc::new(Shared::default());
        shared.with(|s| {
            s.state = WorkloadState::Starting;
            s.digest = prepared.digest.clone();
            s.version = info.version;
        });
        let tier = TierHandle {
            runtime: self.runtime.clone(),
            logs: self.logs.clone(),
        };
        let digest = prepared.digest.clone();
        Box::new(ProcessWorkload::start(tier, shared, prepared, digest, spec))
    }
}

/// What a workload needs of its tier to start (again, after an update).
#[derive(Clone)]
struct TierHandle {
    runtime: Option<ContainerRuntime>,
    logs: Arc<LogHub>,
}

impl ProcessKind for TierHandle {
    type Artifact = PreparedContainer;
    const KIND: &'static str = "container";

    fn runner(&self) -> Option<String> {
        self.runtime.as_ref().map(|r| r.oci().kind.to_string())
    }

    fn unpack(prepared: Prepared) -> Result<(Arc<PreparedContainer>, String), UpdateError> {
        match prepared {
            Prepared::Container(prepared) => {
                let digest = prepared.digest.clone();
                Ok((prepared, digest))
            }
            _ => Err(UpdateError::OtherKind {
                kind: "container",
                wanted: "container",
            }),
        }
    }

    /// Starts the run loop of a container workload.
    fn supervise(
        &self,
        shared: &Arc<Shared>,
        prepared: Arc<PreparedContainer>,
        spec: &WorkloadSpec,
    ) -> Supervised {
        let container_spec = container_spec(&prepared, spec);
        let (runtime, logs, state) = (self.runtime.clone(), self.logs.clone(), shared.clone());
        let run_once: RunOnce = Box::new(move |stop| {
            Box::pin(run_once(
                runtime.clone(),
                logs.clone(),
                state.clone(),
                container_spec.clone(),
                stop,
            ))
        });
        Supervised::spawn(
            "container",
            spec.name.clone(),
            self.logs.clone(),
            shared.clone(),
            spec.restart,
            run_once,
        )
    }
}

fn container_spec(prepared: &PreparedContainer, spec: &WorkloadSpec) -> ContainerSpec {
    let mut c = ContainerSpec::new(
        &spec.name,
        prepared.rootfs.clone(),
        prepared.command.clone(),
    );
    c.env = prepared.env.clone();
    c.devices = prepared.devices.clone();
    c.limits = Limits {
        memory_bytes: spec.limits.memory_bytes,
        cpus: spec.limits.cpu_millis.map(|m| f64::from(m) / 1000.0),
        pids: spec.limits.pids,
    };
    c
}

impl LiveUsage for Container {
    fn usage(&self) -> Usage {
        if self.status() != ContainerStatus::Running {
            return Usage::default();
        }
        let usage = Container::usage(self);
        Usage {
            memory_bytes: usage.memory_bytes,
            pids: usage.pids,
        }
    }
}

/// One run of a container: start it, wait for its exit or a stop.
async fn run_once(
    runtime: Option<ContainerRuntime>,
    logs: Arc<LogHub>,
    shared: Arc<Shared>,
    spec: ContainerSpec,
    mut stop: watch::Receiver<bool>,
) -> RunEnd {
    let Some(runtime) = runtime else {
        let reason = ExitReason::StartFailed {
            message: "no OCI runtime works on this host".into(),
        };
        return RunEnd::Ended {
            info: exit_info(&reason),
            success: false,
        };
    };
    let sink: super::LogSink = {
        let logs = logs.clone();
        Arc::new(move |line| {
            let (level, context) = match line.stream {
                LogStream::Stdout => (LogLevel::Info, "stdout"),
                LogStream::Stderr => (LogLevel::Warn, "stderr"),
            };
            logs.log(&line.container, level, context, &line.text);
        })
    };
    let container = match runtime.start(&spec, sink).await {
        Ok(container) => Arc::new(container),
        Err(err) => {
            let reason = ExitReason::StartFailed {
                message: err.to_string(),
            };
            return RunEnd::Ended {
                info: exit_info(&reason),
                success: false,
            };
        }
    };
    shared.with(|s| {
        s.state = WorkloadState::Running;
        s.started_at = Some(Instant::now());
        s.live = Some(container.clone());
    });
    logs.agent_line(
        &spec.name,
        LogLevel::Info,
        &format!("container started with {}", runtime.oci().kind),
    );
    tokio::select! {
        reason = container.wait() => RunEnd::Ended {
            success: matches!(reason, ExitReason::Exited { code: 0 }),
            info: exit_info(&reason),
        },
        _ = stop_asked(&mut stop) => {
            let reason = container.stop(STOP_GRACE).await.unwrap_or_else(|e| {
                ExitReason::StartFailed { message: e.to_string() }
            });
            RunEnd::Stopped(exit_info(&reason))
        }
    }
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

/// Path of the tier's working directory under the state directory.
pub fn work_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("containers")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_grants(grants: &str) -> WorkloadSpec {
        let text = format!(
            "[[workloads]]\nname = \"box\"\nkind = \"container\"\nrootfs = \"r\"\ncommand = [\"/bin/true\"]\n{grants}"
        );
        crate::deployment::parse("d.toml", &text, Path::new("/"))
            .expect("parses")
            .spec
            .workloads
            .remove(0)
    }

    fn board(name: &str) -> BoardProfile {
        BoardProfile::builtin(name).expect("built-in profile")
    }

    #[test]
    fn bus_grants_become_their_device_nodes_once_each() {
        let spec = with_grants(
            "spi = [{ name = \"adc\", bus = \"spi0.0\" }, { name = \"adc2\", bus = \"spi0.1\" }]\n\
             i2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }, { name = \"env2\", bus = \"i2c-1\", addresses = [0x49] }]\n",
        );
        assert_eq!(
            device_nodes(&spec, &board("rpi4b")).expect("resolves"),
            vec![
                PathBuf::from("/dev/spidev0.0"),
                PathBuf::from("/dev/spidev0.1"),
                PathBuf::from("/dev/i2c-1"),
            ]
        );
        assert_eq!(
            device_nodes(&with_grants(""), &board("sim")),
            Ok(Vec::new())
        );
    }

    #[test]
    fn a_simulated_board_has_no_node_to_give_and_says_so() {
        let spec =
            with_grants("gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }]\n");
        let err = device_nodes(&spec, &board("sim")).expect_err("sim has no nodes");
        assert_eq!(err.field, "gpio[0].pin");
        assert!(
            err.message
                .starts_with("board \"sim\" simulates its devices inside the agent"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_gpio_grant_resolves_to_the_chip_holding_the_pins_line() {
        let spec =
            with_grants("gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }]\n");
        match device_nodes(&spec, &board("rpi4b")) {
            // A host with the Pi's header chip: that chip's node, and only it.
            Ok(nodes) => {
                assert_eq!(nodes.len(), 1, "{nodes:?}");
                assert!(nodes[0].starts_with("/dev/gpiochip"), "{nodes:?}");
            }
            // Anywhere else the line is not found, and the error names the pin.
            Err(err) => {
                assert_eq!(err.field, "gpio[0].pin");
                assert!(
                    err.message
                        .starts_with("cannot find the gpiochip of pin \"GPIO17\""),
                    "{}",
                    err.message
                );
            }
        }
    }
}
