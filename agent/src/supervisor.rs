//! The supervisor: owns every workload's worker, applies deployments atomically (validate
//! everything, commit, then start, reload or stop), restores the last deployment at start,
//! and answers the local API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Mutex, broadcast, oneshot};

use crate::api::control::Control;
use crate::api::types::{
    ApiError, DeployReport, DeployRequest, DoctorReport, EventRecord, KvEntry, LogLine, SendReply,
    SendRequest, WorkloadFailure, WorkloadStatus,
};
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
}

/// A workload stopped by `lichen stop`, kept for `ps` until the next deploy.
struct Stopped {
    status: WorkloadStatus,
}

/// A running workload and the tier (runtime) that runs it.
struct Running {
    tier: Tier,
    workload: Box<dyn Workload>,
}

struct Workloads {
    running: BTreeMap<String, Running>,
    stopped: BTreeMap<String, Stopped>,
}

struct Inner {
    ctx: WorkerContext,
    artifacts: Arc<ArtifactStore>,
    /// One runtime per tier this agent has.
    runtimes: BTreeMap<Tier, Arc<dyn Runtime>>,
    /// What this board and host can run: Wasm and containers probed at start, microVMs when a
    /// deployment first needs them (their probe may boot a trial guest).
    isolation: std::sync::Mutex<IsolationProbe>,
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
        std::fs::create_dir_all(&options.state_dir).with_context(|| {
            format!(
                "cannot create state directory {}",
                options.state_dir.display()
            )
        })?;
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
                ImageStore::new(options.state_dir.join("images")),
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

    /// Starts the workloads of the last applied deployment (after each runtime has cleaned up
    /// what a killed agent left behind). Returns whether there was one.
    pub async fn restore(&self) -> Result<bool> {
        for runtime in self.inner.runtimes.values() {
            runtime.recover().await;
        }
        let Some(record) = self.store().current_deployment()? else {
            return Ok(false);
        };
        let mut workloads = self.inner.workloads.lock().await;
        for row in record.workloads {
            let spec: WorkloadSpec = serde_json::from_str(&row.spec_json)
                .with_context(|| format!("stored spec of workload {:?} is unreadable", row.name))?;
            let isolation = self.isolation_for(std::slice::from_ref(&spec)).await;
            let prepared = match isolation.select(&spec) {
                Err(message) => Err((Tier::Wasm, message)),
                Ok(tier) => match self.runtime(tier) {
                    Ok(runtime) => runtime
                        .prepare(&spec, Some(&row.module_digest))
                        .await
                        .map(|p| (tier, p))
                        .map_err(|e| (tier, format!("cannot load its {}: {}", e.field, e.message))),
                    Err(message) => Err((tier, message)),
                },
            };
            let (tier, prepared) = match prepared {
                Ok(ready) => ready,
                Err((_, message)) => {
                    tracing::error!(workload = %row.name, "{message}");
                    let _ = self
                        .store()
                        .log_event(Some(&row.name), "start-failed", &message)
                        .await;
                    continue;
                }
            };
            let kv = self.store().load_kv(&row.name)?;
            let workload = self.runtime(tier).map_err(anyhow::Error::msg)?.start(
                prepared,
                spec,
                StartInfo {
                    version: record.version,
                    kv,
                    events_handled: row.events_handled,
                },
            );
            workloads
                .running
                .insert(row.name.clone(), Running { tier, workload });
        }
        tracing::info!(
            version = record.version,
            "restored the last applied deployment"
        );
        Ok(true)
    }

    /// The runtime of a tier, or why this agent has none.
    fn runtime(&self, tier: Tier) -> Result<&Arc<dyn Runtime>, String> {
        self.inner
            .runtimes
            .get(&tier)
            .ok_or_else(|| format!("this agent has no {tier} runtime"))
    }

    /// Validates a deployment file and applies it atomically.
    pub async fn deploy_text(
        &self,
        file_name: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<DeployReport, ApiError> {
        let parsed = deployment::parse(file_name, text, base_dir)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        crate::grants::check(&parsed, self.inner.ctx.devices.profile())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        // One deploy at a time; validation (compiling) happens before anything changes.
        let mut workloads = self.inner.workloads.lock().await;
        let artifacts = self.prepare_all(&parsed).await?;

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

impl Control for Agent {
    async fn deploy(&self, req: DeployRequest) -> Result<DeployReport, ApiError> {
        self.deploy_text(&req.file_name, &req.text, Path::new(&req.base_dir))
            .await
    }

    async fn ps(&self) -> Vec<WorkloadStatus> {
        let workloads = self.inner.workloads.lock().await;
        let mut rows: Vec<WorkloadStatus> =
            workloads.running.values().map(Self::status_of).collect();
        rows.extend(workloads.stopped.values().map(|s| s.status.clone()));
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    async fn logs(&self, workload: &str, tail: usize) -> Result<Vec<LogLine>, ApiError> {
        if !self.knows(workload).await {
            return Err(ApiError::not_found(format!(
                "no workload named {workload:?}"
            )));
        }
        self.inner
            .ctx
            .logs
            .lines(workload, tail, self.store())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    fn follow_logs(&self, workload: &str) -> Result<broadcast::Receiver<LogLine>, ApiError> {
        Ok(self.inner.ctx.logs.follow(workload))
    }

    async fn kv(&self, workload: &str, key: Option<&str>) -> Result<Vec<KvEntry>, ApiError> {
        if !self.knows(workload).await {
            return Err(ApiError::not_found(format!(
                "no workload named {workload:?}"
            )));
        }
        let data = self
            .store()
            .load_kv(workload)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(data
            .into_iter()
            .filter(|((bucket, k), _)| match key {
                Some(key) => bucket == "default" && k == key,
                None => true,
            })
            .map(|((bucket, key), value)| KvEntry {
                bucket,
                key,
                size: value.len() as u64,
                value: String::from_utf8_lossy(&value).into_owned(),
            })
            .collect())
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>, ApiError> {
        let rows = self
            .store()
            .events(after, limit)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|r| EventRecord {
                id: r.id,
                at_ms: r.at_ms,
                workload: r.workload,
                kind: r.kind,
                detail: r.detail,
            })
            .collect())
    }

    async fn send(&self, workload: &str, req: SendRequest) -> Result<SendReply, ApiError> {
        let id = format!(
            "cmd-{}",
            self.inner.next_command.fetch_add(1, Ordering::Relaxed)
        );
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let workloads = self.inner.workloads.lock().await;
            let Some(running) = workloads.running.get(workload) else {
                return Err(if workloads.stopped.contains_key(workload) {
                    ApiError::unavailable(format!("workload {workload:?} is stopped"))
                } else {
                    ApiError::not_found(format!("no workload named {workload:?}"))
                });
            };
            let state = running.workload.status().state;
            if state == "failed" || state == "completed" {
                return Err(ApiError::unavailable(format!(
                    "workload {workload:?} is {state} and takes no commands until it is deployed again"
                )));
            }
            running
                .workload
                .try_deliver(
                    Delivery::Command {
                        id: id.clone(),
                        name: req.command,
                        payload: req.payload.into_bytes(),
                    },
                    Some(reply_tx),
                )
                .map_err(ApiError::unavailable)?;
        }
        match tokio::time::timeout(REPLY_TIMEOUT, reply_rx).await {
            Ok(Ok(Ok(reply))) => Ok(SendReply {
                id,
                reply: reply.map(|r| String::from_utf8_lossy(&r).into_owned()),
            }),
            Ok(Ok(Err(message))) => Err(ApiError::unavailable(format!(
                "workload {workload:?} did not handle command {id}: {message}"
            ))),
            Ok(Err(_)) => Err(ApiError::unavailable(format!(
                "workload {workload:?} dropped command {id} (it stopped or restarted)"
            ))),
            Err(_) => Err(ApiError::unavailable(format!(
                "workload {workload:?} did not answer command {id} within {REPLY_TIMEOUT:?}"
            ))),
        }
    }

    async fn stop(&self, workload: &str) -> Result<(), ApiError> {
        let mut workloads = self.inner.workloads.lock().await;
        let Some(running) = workloads.running.remove(workload) else {
            return if workloads.stopped.contains_key(workload) {
                Ok(())
            } else {
                Err(ApiError::not_found(format!(
                    "no workload named {workload:?}"
                )))
            };
        };
        let tier = running.tier;
        let before = running.workload.status();
        running.workload.stop().await;
        let mut status = to_api_status(workload, tier, before);
        status.state = "stopped".into();
        status.memory_bytes = 0;
        status.pids = None;
        status.uptime_ms = None;
        workloads
            .stopped
            .insert(workload.to_string(), Stopped { status });
        Ok(())
    }

    async fn doctor(&self) -> DoctorReport {
        // The first report runs the probes (trial containers, a trial KVM boot of up to 5 s):
        // off the async workers.
        let board = self.inner.board.clone();
        let engine = *self.inner.ctx.engine.options();
        match tokio::task::spawn_blocking(move || crate::doctor::report(&board, Some(&engine)))
            .await
        {
            Ok(report) => report,
            Err(err) => DoctorReport {
                version: env!("CARGO_PKG_VERSION").into(),
                board: self.inner.board.clone(),
                checks: vec![crate::api::types::DoctorCheck {
                    name: "doctor".into(),
                    status: "warn".into(),
                    detail: format!("the probe task failed: {err}"),
                }],
            },
        }
    }

    fn metrics_text(&self) -> String {
        // Scrapes must not wait on a deploy: read what is available without blocking.
        let statuses: Vec<WorkloadStatus> = match self.inner.workloads.try_lock() {
            Ok(w) => w.running.values().map(Self::status_of).collect(),
            Err(_) => Vec::new(),
        };
        self.inner.ctx.metrics.render(&self.gauges(&statuses))
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
        uptime_ms: s.uptime.map(|t| t.as_millis() as u64),
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
