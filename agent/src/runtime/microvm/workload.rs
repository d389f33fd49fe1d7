//! `microvm` workloads behind the common [`Runtime`] / [`Workload`] traits: preparing checks
//! the kernel and root files and fingerprints them; a workload is a run loop that boots the VM,
//! sends its console to the log hub, and restarts it per the restart policy with back-off.
//!
//! The host is probed when a deployment first needs microVMs (the probe may boot a trial
//! guest to tell a usable KVM from one that only exists), not at agent start.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lichen_host_apis::{LogLevel, LogSink as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OnceCell, watch};

use super::{ExitReason, GuestRoot, LogStream, Microvm, MicrovmRuntime, MicrovmSpec};
use crate::deployment::{Artifact, GuestRootRef, WorkloadSpec, WorkloadState};
use crate::logs::LogHub;
use crate::runtime::supervise::{
    LiveUsage, ProcessKind, ProcessWorkload, RunEnd, RunOnce, Shared, Supervised, stop_asked,
};
use crate::runtime::{
    BoxFuture, ExitInfo, PrepareError, Prepared, Runtime, StartInfo, Tier, UpdateError, Usage,
    Workload,
};

/// Guest memory of a microVM whose deployment sets no memory limit.
const DEFAULT_MEMORY_MIB: u32 = 128;
/// Grace period of the ACPI power button on stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A microVM workload ready to boot.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedMicrovm {
    /// sha256 (hex) of the kernel's bytes followed by the root's.
    pub digest: String,
    /// What QEMU boots.
    pub spec: MicrovmSpec,
}

/// Runs `microvm` workloads through QEMU.
pub struct MicrovmTier {
    work_dir: PathBuf,
    logs: Arc<LogHub>,
    /// The probe's outcome and the runtime, made when first needed.
    runtime: OnceCell<(Result<String, String>, Option<MicrovmRuntime>)>,
}

impl MicrovmTier {
    /// A tier with QMP sockets under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>, logs: Arc<LogHub>) -> Self {
        MicrovmTier {
            work_dir: work_dir.into(),
            logs,
            runtime: OnceCell::new(),
        }
    }

    async fn probed(&self) -> &(Result<String, String>, Option<MicrovmRuntime>) {
        self.runtime
            .get_or_init(|| async {
                let probe = match tokio::task::spawn_blocking(super::probe_cached).await {
                    Ok(probe) => probe,
                    Err(e) => return (Err(format!("the microVM probe failed: {e}")), None),
                };
                let outcome = crate::runtime::isolation::microvm_outcome(probe);
                let runtime = MicrovmRuntime::new(probe, &self.work_dir).ok();
                (outcome, runtime)
            })
            .await
    }

    async fn load(&self, spec: &WorkloadSpec) -> Result<Prepared, PrepareError> {
        let Artifact::Microvm(vm) = &spec.artifact else {
            return Err(PrepareError::new(
                "kind",
                "a microVM workload needs a kernel",
            ));
        };
        if let (Err(piece), _) = self.probed().await {
            return Err(PrepareError::new(
                "isolation",
                format!("\"microvm\" isolation needs {piece}"),
            ));
        }
        let (root_field, root) = match &vm.root {
            GuestRootRef::Initramfs(path) => ("initramfs", GuestRoot::Initramfs(path.clone())),
            GuestRootRef::Disk(path) => ("disk", GuestRoot::Disk(path.clone())),
        };
        let root_path = match &root {
            GuestRoot::Initramfs(p) | GuestRoot::Disk(p) => p.clone(),
        };
        for (field, path) in [("kernel", &vm.kernel), (root_field, &root_path)] {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(PrepareError::new(
                        field,
                        format!("{} is not a regular file", path.display()),
                    ));
                }
                Err(e) => {
                    return Err(PrepareError::new(
                        field,
                        format!("cannot read {}: {e}", path.display()),
                    ));
                }
            }
        }
        let mut qemu_spec = MicrovmSpec::new(&spec.name, vm.kernel.clone(), root);
        qemu_spec.vcpus = vm.vcpus;
        qemu_spec.memory_mib = spec.limits.memory_bytes.map_or(DEFAULT_MEMORY_MIB, |b| {
            u32::try_from(b >> 20).unwrap_or(u32::MAX)
        });
        qemu_spec.cmdline = vm.cmdline.clone();
        if let Some(marker) = &vm.ready_marker {
            qemu_spec.ready_marker = marker.clone();
        }
        if let Some(timeout) = vm.boot_timeout {
            qemu_spec.boot_timeout = timeout;
        }
        qemu_spec
            .validate()
            .map_err(|e| PrepareError::new("kernel", e.to_string()))?;
        let (kernel, root) = (vm.kernel.clone(), root_path);
        let digest = tokio::task::spawn_blocking(move || fingerprint(&[&kernel, &root]))
            .await
            .map_err(|e| PrepareError::new("kernel", format!("cannot hash the files: {e}")))?
            .map_err(|e| PrepareError::new("kernel", e.to_string()))?;
        Ok(Prepared::Microvm(Arc::new(PreparedMicrovm {
            digest,
            spec: qemu_spec,
        })))
    }
}

/// Why a microVM's files cannot be hashed.
#[derive(Debug, thiserror::Error)]
enum FingerprintError {
    /// A file is not a regular file, or cannot be opened.
    #[error(transparent)]
    Open(#[from] crate::files::ReadError),
    /// A file cannot be read to its end.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// sha256 over the files' bytes in order (a change to any of them is a new version).
fn fingerprint(files: &[&Path]) -> Result<String, FingerprintError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    for path in files {
        // A regular file only, opened without blocking (a FIFO swapped in after the check in
        // `load` would otherwise hang the deploy); disks may be large, so no size bound.
        let (mut file, _) = crate::files::open_regular(path)?;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|source| FingerprintError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Ends the QEMU processes that an agent killed without stopping its microVMs left behind:
/// each still listens on its QMP socket in `work_dir`, so it is asked to `quit` there (the
/// restored deployment boots a fresh VM). Stale sockets nobody listens on are removed. Returns
/// the names of the VMs that were ended.
async fn end_leftover_vms(work_dir: &Path) -> Vec<String> {
    let mut ended = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(work_dir).await else {
        return ended;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "qmp") {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        if let Ok(qmp) = super::qmp::Qmp::connect(&path, deadline).await {
            // `quit` may close the socket before it replies; the exit is what counts.
            let _ = qmp.execute("quit").await;
            if let Some(name) = path.file_stem() {
                ended.push(name.to_string_lossy().into_owned());
            }
        }
        let _ = tokio::fs::remove_file(&path).await;
    }
    ended
}

impl Runtime for MicrovmTier {
    fn tier(&self) -> Tier {
        Tier::Microvm
    }

    fn probe<'a>(&'a self) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { self.probed().await.0.clone() })
    }

    fn recover<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ended = end_leftover_vms(&self.work_dir).await;
            if !ended.is_empty() {
                tracing::warn!(
                    microvms = ?ended,
                    "ended QEMU processes left running by an agent that did not stop them"
                );
            }
        })
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a WorkloadSpec,
        _stored_digest: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Prepared, PrepareError>> {
        Box::pin(self.load(spec))
    }

    fn start(&self, prepared: Prepared, spec: WorkloadSpec, info: StartInfo) -> Box<dyn Workload> {
        let Prepared::Microvm(prepared) = prepared else {
            unreachable!("the supervisor starts a workload with the runtime that prepared it")
        };
        let runtime = self.runtime.get().and_then(|(_, r)| r.clone());
        let shared = Arc::new(Shared::default());
        shared.with(|s| {
            s.state = WorkloadState::Starting;
            s.digest = prepared.digest.clone();
            s.version = info.version;
            s.accelerator = runtime.as_ref().map(|r| r.accelerator().name().to_string());
        });
        let handle = TierHandle {
            runtime,
            logs: self.logs.clone(),
        };
        let digest = prepared.digest.clone();
        Box::new(ProcessWorkload::start(
            handle, shared, prepared, digest, spec,
        ))
    }
}

/// What a workload needs of its tier to boot (again, after an update).
#[derive(Clone)]
struct TierHandle {
    runtime: Option<MicrovmRuntime>,
    logs: Arc<LogHub>,
}

impl ProcessKind for TierHandle {
    type Artifact = PreparedMicrovm;
    const KIND: &'static str = "microvm";

    fn runner(&self) -> Option<String> {
        self.runtime
            .as_ref()
            .map(|r| r.machine().binary.to_string())
    }

    fn unpack(prepared: Prepared) -> Result<(Arc<PreparedMicrovm>, String), UpdateError> {
        match prepared {
            Prepared::Microvm(prepared) => {
                let digest = prepared.digest.clone();
                Ok((prepared, digest))
            }
            _ => Err(UpdateError::OtherKind {
                kind: "microVM",
                wanted: "microVM",
            }),
        }
    }

    fn supervise(
        &self,
        shared: &Arc<Shared>,
        prepared: Arc<PreparedMicrovm>,
        spec: &WorkloadSpec,
    ) -> Supervised {
        let (runtime, logs, state) = (self.runtime.clone(), self.logs.clone(), shared.clone());
        let run: RunOnce = Box::new(move |stop| {
            Box::pin(run_once(
                runtime.clone(),
                logs.clone(),
                state.clone(),
                prepared.spec.clone(),
                stop,
            ))
        });
        Supervised::spawn(
            "microVM",
            spec.name.clone(),
            self.logs.clone(),
            shared.clone(),
            spec.restart,
            run,
        )
    }
}

impl LiveUsage for Microvm {
    fn usage(&self) -> Usage {
        let usage = Microvm::usage(self);
        Usage {
            memory_bytes: usage.pss_bytes.or(usage.rss_bytes),
            pids: None,
        }
    }
}

fn ended(reason: &ExitReason) -> RunEnd {
    RunEnd::Ended {
        success: matches!(
            reason,
            ExitReason::PoweredOff { .. } | ExitReason::Exited { code: 0 }
        ),
        info: exit_info(reason),
    }
}

fn exit_info(reason: &ExitReason) -> ExitInfo {
    ExitInfo {
        reason: reason.to_string(),
        code: match reason {
            ExitReason::Exited { code } => Some(*code),
            ExitReason::Signaled { signal } => Some(128 + signal),
            _ => None,
        },
        oom_killed: false,
    }
}

/// One run of a microVM: boot it, wait for its ready marker, then for its end or a stop.
async fn run_once(
    runtime: Option<MicrovmRuntime>,
    logs: Arc<LogHub>,
    shared: Arc<Shared>,
    spec: MicrovmSpec,
    mut stop: watch::Receiver<bool>,
) -> RunEnd {
    let Some(runtime) = runtime else {
        return ended(&ExitReason::StartFailed {
            message: "microVMs cannot run on this host".into(),
        });
    };
    let sink: super::LogSink = {
        let logs = logs.clone();
        Arc::new(move |line| {
            let (level, context) = match line.stream {
                LogStream::Console => (LogLevel::Info, "console"),
                LogStream::Qemu => (LogLevel::Warn, "qemu"),
            };
            logs.log(&line.vm, level, context, &line.text);
        })
    };
    let vm = match runtime.start(&spec, sink).await {
        Ok(vm) => Arc::new(vm),
        Err(err) => {
            return ended(&ExitReason::StartFailed {
                message: err.to_string(),
            });
        }
    };
    shared.with(|s| {
        s.live = Some(vm.clone());
        s.accelerator = Some(vm.accelerator().name().to_string());
    });
    let stopped = |reason: Result<ExitReason, super::MicrovmError>| {
        let reason = reason.unwrap_or_else(|e| ExitReason::StartFailed {
            message: e.to_string(),
        });
        RunEnd::Stopped(exit_info(&reason))
    };
    tokio::select! {
        ready = vm.wait_ready() => match ready {
            Ok(boot) => {
                shared.with(|s| {
                    s.state = WorkloadState::Running;
                    s.started_at = Some(Instant::now());
                });
                logs.agent_line(
                    &spec.name,
                    LogLevel::Info,
                    &format!("microVM ready after {} ms under {}", boot.as_millis(), vm.accelerator().name()),
                );
            }
            Err(reason) => return ended(&reason),
        },
        _ = stop_asked(&mut stop) => return stopped(vm.stop(STOP_GRACE).await),
    }
    tokio::select! {
        reason = vm.wait() => ended(&reason),
        _ = stop_asked(&mut stop) => stopped(vm.stop(STOP_GRACE).await),
    }
}
