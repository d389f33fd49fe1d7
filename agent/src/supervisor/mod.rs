//! The supervisor: owns every workload's worker, applies deployments atomically (validate
//! everything, commit, then start, reload or stop), restores the last deployment at start
//! (`restore`), and answers the local API (`control`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Mutex;

use crate::api::types::{ApiError, DeployReport, WorkloadFailure, WorkloadStatus};
use crate::deployment::{self, ParsedDeployment, WorkloadSpec};
use crate::logs::{LogHub, LogOptions};
use crate::metrics::{Gauges, Metrics};
use crate::runtime::container::{ContainerRuntime, ContainerTier, ImageStore};
use crate::runtime::isolation::IsolationProbe;
use crate::runtime::microvm::MicrovmTier;
use crate::runtime::wasm::{
    ArtifactStore, Delivery, EngineOptions, EventSender, WasmEngine, WasmRuntime, WorkerContext,
};
use crate::runtime::{Prepared, Runtime, RuntimeStatus, StartInfo, Tier, Workload};
use crate::store::{NewDeployment, NewWorkload, StateStore, StoreOptions};
use crate::util::process_rss_bytes;

mod control;
mod restore;

/// How long `send` waits for a workload's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings the supervisor is built from.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Directory of the state database and the artifact store.
    pub state_dir: PathBuf,
    /// Sizing of the Wasm engine.
    pub engine: EngineOptions,
    /// Guest log settings.
    pub logs: LogOptions,
    /// Guest log lines persisted per workload.
    pub persisted_log_lines: usize,
    /// Name of the board profile.
    pub board: String,
    /// Bounds on OCI images of container workloads.
    pub images: crate::runtime::container::ImageLimits,
}

/// A workload that does not run, kept for `ps` until the next deploy: stopped by `lichen stop`,
/// or failed before it could start when the stored deployment was restored.
struct Parked {
    status: WorkloadStatus,
}

/// A running workload and the tier (runtime) that runs it.
struct Running {
    tier: Tier,
    workload: Box<dyn Workload>,
}

struct Workloads {
    running: BTreeMap<String, Running>,
    stopped: BTreeMap<String, Parked>,
}

struct Inner {
    ctx: WorkerContext,
    artifacts: Arc<ArtifactStore>,
    /// One runtime per tier this agent has.
    runtimes: BTreeMap<Tier, Arc<dyn Runtime>>,
    /// What this board and host can run: Wasm and containers probed at start, microVMs when a
    /// deployment first needs them (their probe may boot a trial guest).
    isolation: std::sync::Mutex<IsolationProbe>,
    /// Held for a whole deploy or restore, so they happen one at a time; `workloads` is held
    /// only while workloads are switched, so `ps` and the other verbs never wait for a deploy
    /// that is still reading and compiling its artifacts.
    deploying: Mutex<()>,
    workloads: Mutex<Workloads>,
    board: String,
    next_command: AtomicU64,
}

/// The running agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// Opens the state store and artifact store under the state directory and builds the
    /// engine. Starts nothing; call [`Agent::restore`].
    pub async fn open(options: AgentOptions) -> Result<Self> {
        crate::state_dir::create_private(&options.state_dir)?;
        let store = StateStore::open(
            &options.state_dir.join("lichen.db"),
            StoreOptions {
                max_log_lines_per_workload: options.persisted_log_lines,
            },
        )
        .context("cannot open the state store")?;
        let engine = Arc::new(WasmEngine::new(options.engine)?);
        let artifacts = Arc::new(ArtifactStore::open(
            &options.state_dir.join("artifacts"),
            engine.clone(),
        )?);
        let devices = Arc::new(crate::grants::DeviceHub::open(&options.board)?);
        let logs = Arc::new(LogHub::new(options.logs));
        logs.spawn_persister(store.clone());
        let ctx = WorkerContext {
            engine,
            store,
            logs: logs.clone(),
            metrics: Arc::new(Metrics::default()),
            max_memory_bytes: options.engine.max_memory_bytes,
            devices: devices.clone(),
        };
        // The probe runs trial containers: off the async workers, once per process.
        let host = tokio::task::spawn_blocking(crate::runtime::container::probe_cached)
            .await
            .context("the isolation probe failed")?;
        let mut isolation = IsolationProbe::new(devices.profile(), host.cgroup.controllers.clone());
        isolation.record(
            Tier::Container,
            crate::runtime::isolation::container_outcome(host),
        );
        let state_hash =
            crate::runtime::wasm::sha256_hex(options.state_dir.display().to_string().as_bytes());
        let oci = host.usable_runtime().map(|oci| {
            // One cgroup parent per state directory, so two agents never share a cgroup.
            ContainerRuntime::new(
                oci.clone(),
                host.cgroup.clone(),
                crate::runtime::container::work_dir(&options.state_dir),
            )
            .with_cgroup_parent(&format!("lichen/{}", &state_hash[..12]))
        });
        let mut runtimes: BTreeMap<Tier, Arc<dyn Runtime>> = BTreeMap::new();
        runtimes.insert(
            Tier::Wasm,
            Arc::new(WasmRuntime::new(ctx.clone(), artifacts.clone())),
        );
        runtimes.insert(
            Tier::Container,
            Arc::new(ContainerTier::new(
                oci,
                ImageStore::new(options.state_dir.join("images"))
                    .with_limits(options.images.clone()),
                logs.clone(),
                devices.profile().clone(),
            )),
        );
        runtimes.insert(
            Tier::Microvm,
            Arc::new(MicrovmTier::new(options.state_dir.join("microvm"), logs)),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                artifacts,
                runtimes,
                isolation: std::sync::Mutex::new(isolation),
                deploying: Mutex::new(()),
                workloads: Mutex::new(Workloads {
                    running: BTreeMap::new(),
                    stopped: BTreeMap::new(),
                }),
                board: options.board,
                next_command: AtomicU64::new(1),
            }),
        })
    }

    /// The artifact store.
    pub fn artifacts(&self) -> &Arc<ArtifactStore> {
        &self.inner.artifacts
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.inner.ctx.store
    }

    /// The board's devices (on a `sim` board, tests drive and observe them here).
    pub fn devices(&self) -> &Arc<crate::grants::DeviceHub> {
        &self.inner.ctx.devices
    }

    /// Agent metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.ctx.metrics
    }

    /// The event queue of `workload`, if it takes commands now: an unknown, stopped, failed or
    /// completed workload, or one of a kind that takes no events, is an error naming it. The
    /// hub link queues its commands here, waiting for room rather than failing when full.
    pub async fn command_queue(&self, workload: &str) -> Result<EventSender, ApiError> {
        let workloads = self.inner.workloads.lock().await;
        let Some(running) = workloads.running.get(workload) else {
            return Err(if workloads.stopped.contains_key(workload) {
                ApiError::unavailable(format!("workload {workload:?} is stopped"))
            } else {
                ApiError::not_found(format!("no workload named {workload:?}"))
            });
        };
        let status = running.workload.status();
        if status.state == "failed" || status.state == "completed" {
            return Err(ApiError::unavailable(format!(
                "workload {workload:?} is {} and takes no commands until it is deployed again",
                status.state
            )));
        }
        running.workload.event_sender().ok_or_else(|| {
            ApiError::unavailable(format!(
                "workload {workload:?} is a {}: it takes no commands",
                status.kind
            ))
        })
    }

    /// The runtime of a tier, or why this agent has none.
    fn runtime(&self, tier: Tier) -> Result<&Arc<dyn Runtime>, String> {
        self.inner
            .runtimes
            .get(&tier)
            .ok_or_else(|| format!("this agent has no {tier} runtime"))
    }

    /// Validates a deployment file and applies it atomically. Whether it is applied or
    /// refused, the artifacts no workload of the applied deployment uses are removed afterwards,
    /// so refused deploys leave nothing behind.
    pub async fn deploy_text(
        &self,
        file_name: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<DeployReport, ApiError> {
        // One deploy at a time; validation (reading and compiling artifacts) happens before
        // anything changes, without holding the workloads (`ps` keeps answering).
        let _deploying = self.inner.deploying.lock().await;
        let result = self.deploy_locked(file_name, text, base_dir).await;
        self.collect_garbage().await;
        result
    }

    async fn deploy_locked(
        &self,
        file_name: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<DeployReport, ApiError> {
        let parsed = deployment::parse(file_name, text, base_dir)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        crate::grants::check(&parsed, self.inner.ctx.devices.profile())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        self.check_pool(&parsed, 0)?;
        let artifacts = self.prepare_all(&parsed).await?;
        let mut workloads = self.inner.workloads.lock().await;
        let reloads = parsed
            .spec
            .workloads
            .iter()
            .zip(&artifacts)
            .filter(|(spec, (tier, artifact))| {
                *tier == Tier::Wasm
                    && workloads.running.get(&spec.name).is_some_and(|current| {
                        current.tier == Tier::Wasm
                            && !current.workload.is_finished()
                            && (current.workload.spec() != *spec
                                || current.workload.digest() != artifact.digest())
                    })
            })
            .count();
        self.check_pool(&parsed, reloads)?;

        let mut new_workloads = Vec::with_capacity(parsed.spec.workloads.len());
        for (spec, (_, artifact)) in parsed.spec.workloads.iter().zip(&artifacts) {
            new_workloads.push(NewWorkload {
                name: spec.name.clone(),
                spec_json: serde_json::to_string(spec)
                    .map_err(|e| ApiError::internal(format!("cannot encode spec: {e}")))?,
                module_digest: artifact.digest().to_string(),
            });
        }
        let version = self
            .store()
            .apply_deployment(NewDeployment {
                source_name: file_name.to_string(),
                source_text: text.to_string(),
                digest: crate::runtime::wasm::sha256_hex(text.as_bytes()),
                description: parsed.spec.description.clone(),
                workloads: new_workloads,
            })
            .await
            .map_err(|e| ApiError::internal(format!("cannot record the deployment: {e}")))?;

        let mut report = DeployReport {
            version,
            ..DeployReport::default()
        };
        // Stop what the deployment no longer lists.
        let listed: Vec<&str> = parsed
            .spec
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        let gone: Vec<String> = workloads
            .running
            .keys()
            .filter(|name| !listed.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = workloads.running.remove(&name) {
                old.workload.stop().await;
            }
            self.inner.ctx.logs.remove(&name);
            report.stopped.push(name);
        }
        workloads
            .stopped
            .retain(|name, _| listed.contains(&name.as_str()));

        for (spec, (tier, artifact)) in parsed.spec.workloads.into_iter().zip(artifacts) {
            let name = spec.name.clone();
            workloads.stopped.remove(&name);
            match workloads.running.get_mut(&name) {
                Some(current) if current.tier == tier && !current.workload.is_finished() => {
                    let handle = &mut current.workload;
                    if *handle.spec() == spec && handle.digest() == artifact.digest() {
                        report.unchanged.push(name);
                        continue;
                    }
                    match handle.update(artifact, spec, version).await {
                        Ok(()) => report.reloaded.push(name),
                        Err(message) => {
                            self.inner
                                .ctx
                                .metrics
                                .reload_failures
                                .fetch_add(1, Ordering::Relaxed);
                            let text = format!(
                                "reload to version {version} failed: {message}; the previous version keeps running"
                            );
                            handle.note_error(text.clone());
                            self.inner.ctx.logs.agent_line(
                                &name,
                                lichen_host_apis::LogLevel::Error,
                                &text,
                            );
                            let _ = self
                                .store()
                                .log_event(Some(&name), "reload-failed", &text)
                                .await;
                            report.failures.push(WorkloadFailure {
                                workload: name,
                                message: text,
                            });
                        }
                    }
                }
                _ => {
                    if let Some(old) = workloads.running.remove(&name) {
                        old.workload.stop().await;
                    }
                    let kv = self.store().load_kv(&name).map_err(|e| {
                        ApiError::internal(format!("cannot read state of {name:?}: {e}"))
                    })?;
                    let runtime = self.runtime(tier).map_err(ApiError::internal)?;
                    let workload = runtime.start(
                        artifact,
                        spec,
                        StartInfo {
                            version,
                            kv,
                            events_handled: 0,
                        },
                    );
                    workloads
                        .running
                        .insert(name.clone(), Running { tier, workload });
                    report.started.push(name);
                }
            }
        }
        tracing::info!(
            version,
            started = ?report.started,
            reloaded = ?report.reloaded,
            stopped = ?report.stopped,
            "deployment applied"
        );
        Ok(report)
    }

    /// Refuses a deployment whose Wasm workloads, with `reloads` of them holding a second
    /// instance during their hot reload, do not fit the engine's instance slots
    /// (`wasm.max-instances`): beyond them, workloads would sit in back-off forever.
    fn check_pool(&self, parsed: &ParsedDeployment, reloads: usize) -> Result<(), ApiError> {
        let wasm = parsed
            .spec
            .workloads
            .iter()
            .filter(|w| w.kind == deployment::WorkloadKind::Wasm)
            .count();
        let slots = self.inner.ctx.engine.options().max_instances;
        let needed = wasm.saturating_add(reloads);
        if u32::try_from(needed).is_ok_and(|needed| needed <= slots) {
            return Ok(());
        }
        let what = if reloads == 0 {
            format!("{wasm} Wasm workloads need {wasm} instance slots")
        } else {
            format!(
                "{wasm} Wasm workloads and {reloads} hot reloads (a reloaded workload holds a \
                 second slot until its new version has handled an event) need {needed} \
                 instance slots"
            )
        };
        Err(ApiError::invalid(format!(
            "{}: workloads: {what}, but this agent's engine has {slots} \
             (`wasm.max-instances` in the agent config): raise wasm.max-instances or deploy \
             fewer Wasm workloads",
            parsed.file_name()
        )))
    }

    /// Removes the stored artifacts (compiled modules, imported images) that no workload of
    /// the applied deployment uses; each runtime sweeps its own. Called after every deploy
    /// and at start, with the deploy lock held.
    async fn collect_garbage(&self) {
        let in_use: BTreeSet<String> = match self.store().current_deployment() {
            Ok(Some(record)) => record
                .workloads
                .into_iter()
                .map(|w| w.module_digest)
                .collect(),
            Ok(None) => BTreeSet::new(),
            Err(err) => {
                tracing::warn!(
                    "not collecting unused artifacts: cannot read the deployment: {err}"
                );
                return;
            }
        };
        for runtime in self.inner.runtimes.values() {
            runtime.collect_garbage(&in_use).await;
        }
    }

    /// Picks every workload's tier and prepares its artifact (compiles a module, imports an
    /// image); the first failure rejects the whole deployment with the file, line and field of
    /// the workload that failed, before anything changes.
    async fn prepare_all(
        &self,
        parsed: &ParsedDeployment,
    ) -> Result<Vec<(Tier, Prepared)>, ApiError> {
        let mut out = Vec::with_capacity(parsed.spec.workloads.len());
        let isolation = self.isolation_for(&parsed.spec.workloads).await;
        for (index, spec) in parsed.spec.workloads.iter().enumerate() {
            let invalid = |field: &str, message: String| {
                ApiError::invalid(parsed.error_at(index, field, message).to_string())
            };
            let tier = isolation
                .select(spec)
                .map_err(|message| invalid("isolation", message))?;
            let runtime = self
                .runtime(tier)
                .map_err(|message| invalid("isolation", message))?;
            let prepared = runtime
                .prepare(spec, None)
                .await
                .map_err(|e| invalid(&e.field, e.message))?;
            out.push((tier, prepared));
        }
        Ok(out)
    }

    /// What this agent's board and host can run, with every tier that `specs` may run in
    /// probed (each tier once per agent).
    async fn isolation_for(&self, specs: &[WorkloadSpec]) -> IsolationProbe {
        let mut wanted: Vec<Tier> = specs
            .iter()
            .flat_map(crate::runtime::isolation::wanted)
            .collect();
        wanted.sort();
        wanted.dedup();
        for tier in wanted {
            if self.isolation().probed(tier) {
                continue;
            }
            let outcome = match self.runtime(tier) {
                Ok(runtime) => runtime.probe().await,
                Err(message) => Err(message),
            };
            self.inner
                .isolation
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(tier, outcome);
        }
        self.isolation()
    }

    /// What this agent's board and host can run, as probed so far.
    pub fn isolation(&self) -> IsolationProbe {
        self.inner
            .isolation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops every workload (delivering `stop`).
    pub async fn shutdown(&self) {
        let mut workloads = self.inner.workloads.lock().await;
        let running = std::mem::take(&mut workloads.running);
        for (_, old) in running {
            old.workload.stop().await;
        }
        for runtime in self.inner.runtimes.values() {
            runtime.release().await;
        }
        let lines = self.inner.ctx.logs.take_unpersisted();
        if !lines.is_empty() {
            let _ = self.store().append_logs(lines).await;
        }
    }

    /// Queues an event for a workload without waiting for a reply (benchmarks, tests).
    pub async fn inject(&self, workload: &str, delivery: Delivery) -> Result<(), ApiError> {
        let workloads = self.inner.workloads.lock().await;
        let running = workloads
            .running
            .get(workload)
            .ok_or_else(|| ApiError::not_found(format!("no workload named {workload:?}")))?;
        running
            .workload
            .deliver(delivery, None)
            .await
            .map_err(ApiError::unavailable)
    }

    /// Direct event queues of running workloads, in the order of `names` (benchmarks).
    pub async fn event_senders(&self, names: &[String]) -> Result<Vec<EventSender>, ApiError> {
        let workloads = self.inner.workloads.lock().await;
        names
            .iter()
            .map(|name| {
                workloads
                    .running
                    .get(name)
                    .and_then(|r| r.workload.event_sender())
                    .ok_or_else(|| ApiError::not_found(format!("no wasm workload named {name:?}")))
            })
            .collect()
    }

    fn status_of(running: &Running) -> WorkloadStatus {
        let tier = running.tier;
        to_api_status(running.workload.name(), tier, running.workload.status())
    }

    async fn knows(&self, workload: &str) -> bool {
        let workloads = self.inner.workloads.lock().await;
        workloads.running.contains_key(workload) || workloads.stopped.contains_key(workload)
    }

    fn gauges(&self, statuses: &[WorkloadStatus]) -> Gauges {
        Gauges {
            instances: statuses
                .iter()
                .filter(|s| s.kind == "wasm" && s.state == "running")
                .count() as u64,
            queue_depth: statuses.iter().map(|s| s.queue_depth).sum(),
            rss_bytes: process_rss_bytes().unwrap_or(0),
            outbox_rows: self.store().outbox_len().unwrap_or(0),
        }
    }
}

/// A runtime's status as a `ps` row.
fn to_api_status(name: &str, tier: Tier, s: RuntimeStatus) -> WorkloadStatus {
    WorkloadStatus {
        name: name.to_string(),
        kind: s.kind,
        state: s.state,
        module_digest: format!("sha256:{}", s.digest),
        deployment_version: s.version,
        restarts: s.restarts,
        traps: s.traps,
        events_handled: s.events_handled,
        queue_depth: s.queue_depth,
        memory_bytes: s.usage.memory_bytes.unwrap_or(0),
        uptime_ms: s.uptime.map(crate::util::millis),
        last_error: s.last_error,
        isolation: tier.as_str().to_string(),
        pids: s.usage.pids,
        exit_code: s.exit.as_ref().and_then(|e| e.code),
        oom_killed: s.exit.as_ref().is_some_and(|e| e.oom_killed),
        exit_reason: s.exit.map(|e| e.reason),
        runner: s.runner,
        accelerator: s.accelerator,
    }
}

#[cfg(test)]
mod tests;
