//! Kubernetes pods on the resident agent: the agent's side of containerd's Task API.
//!
//! The task service (`lichen_shim::TaskService`, served on the socket from `[containerd]
//! task-socket` by [`server`]) reads each pod container's bundle and hands its program here
//! through the [`PodAgent`] trait. [`PodRuntime`] compiles the `.wasm` bytes into an artifact
//! (compiled once, cached on disk like any module) and, at `Start`, hands the pod to the
//! supervisor as a workload of its `pods` source: the same naming, union checks and clash
//! rules as every source (a name another source owns is refused naming `name`), the same
//! `ps` rows (labels `namespace`, `pod`, `container`), logs and metrics. Two kinds of program:
//!
//! - a WASI command (`wasi:cli/run` component or preview-1 module): `process.args` after the
//!   first become its arguments (its `argv[0]` is the workload name, as for every command
//!   workload), `process.env` its environment, the OCI memory limit (checked against the
//!   engine's instance slot) its memory limit. It runs in the supervisor's command runner in
//!   its streaming, unsliced mode: its stdout and stderr stream to containerd's FIFOs and to
//!   the workload's log as it writes ([`output`]), and it runs until it returns, traps or is
//!   stopped (containerd's `Kill`), with no time slice: Kubernetes programs are long-running;
//! - a component of Lichen's world, run with no device grants ([`lichen`]).
//!
//! Either never restarts on its own (containerd or the kubelet owns restarts). Its exit goes
//! to `Wait`: the program's code, 134 for a trap, 128 + the signal when it was killed.
//!
//! Nothing of a pod outlives the agent: its Wasm runs inside the agent's process, so when the
//! agent exits containerd sees the task connection close and reports every pod as exited
//! (the shim's `delete` unmounts the rootfs); a restarted agent starts with no pods (the
//! supervisor drops the `pods` rows a killed agent left in the state database).

pub mod control;
pub mod lichen;
pub mod output;
pub mod server;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lichen_host_apis::{LogLevel, LogSink};
use lichen_shim::io::OutputSink;
use lichen_shim::spec::PodIdentity;
use lichen_shim::{AgentError, Exit, PodAgent, PodWorkload, WorkloadStatus as PodStatus};
use tokio::sync::watch;

use crate::deployment::WorkloadState;
use crate::logs::LogHub;
use crate::runtime::wasm::ArtifactStore;
use crate::supervisor::{Agent, Labels, Source};
use output::{Destination, PodStreams, forward, pipe};

/// Most pods the agent holds at once (the task service's own bound on tasks).
pub const MAX_PODS: usize = lichen_shim::service::MAX_TASKS;
/// Programs of removed pods kept compiled (in memory and on disk) for the next pod of the
/// same image: a pod's workload leaves the supervisor at `Delete`, and its artifact would
/// otherwise be collected with it and compiled again by the next `ctr run` or restart.
pub const KEPT_PROGRAMS: usize = 16;

/// What a pod runs.
#[derive(Clone)]
enum PodProgram {
    /// A WASI command program (`wasi-command` or `wasi-cli`), run by the supervisor's command
    /// runner streaming its output to containerd's FIFOs.
    Command { kind: &'static str },
    /// A component of Lichen's world, run by the supervisor with no device grants
    /// ([`lichen`]), ticked every `interval` if set.
    Lichen { interval: Option<Duration> },
}

impl PodProgram {
    fn kind_name(&self) -> &'static str {
        match self {
            PodProgram::Command { kind } => kind,
            PodProgram::Lichen { .. } => "wasm",
        }
    }
}

/// Where a pod is in its life.
enum Phase {
    Created,
    Running,
    Ended,
}

struct Pod {
    id: String,
    /// Its workload name: what `ps` and `logs` know it by.
    name: String,
    namespace: String,
    identity: PodIdentity,
    digest: String,
    program: PodProgram,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The OCI spec's memory limit, if it set one.
    requested_memory: Option<u64>,
    stdout: Option<OutputSink>,
    stderr: Option<OutputSink>,
    phase: Mutex<Phase>,
    exit: watch::Sender<Option<Exit>>,
}

impl Pod {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the end once; later ends are ignored.
    fn end(&self, exit: Exit) {
        *self.phase() = Phase::Ended;
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
    }

    /// The labels `ps` and metrics show: `namespace` (Kubernetes', else containerd's), `pod`
    /// and `container` (Kubernetes' names, else the task id), `containerd-namespace`.
    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        labels.insert(
            "namespace".to_string(),
            self.identity
                .pod_namespace
                .clone()
                .unwrap_or_else(|| self.namespace.clone()),
        );
        if let Some(pod) = &self.identity.pod_name {
            labels.insert("pod".to_string(), pod.clone());
        }
        labels.insert(
            "container".to_string(),
            self.identity
                .container_name
                .clone()
                .unwrap_or_else(|| self.id.clone()),
        );
        labels.insert("containerd-namespace".to_string(), self.namespace.clone());
        labels
    }

    /// The labels as `key=value ...`, for log lines.
    fn labels_text(&self) -> String {
        self.labels()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Counters of the pods run since the agent started.
#[derive(Debug, Default)]
pub struct PodCounters {
    /// Pods started.
    pub started: AtomicU64,
    /// Pods whose program trapped.
    pub trapped: AtomicU64,
    /// Pods stopped by containerd.
    pub stopped: AtomicU64,
    /// Creates refused (bad program, memory limit, full).
    pub refused: AtomicU64,
}

/// A pod as `/metrics` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    /// Its workload name.
    pub workload: String,
    /// `starting`, `running`, `completed`, `failed` or `stopped`.
    pub state: WorkloadState,
    /// Its `ps` labels.
    pub labels: BTreeMap<String, String>,
}

/// The agent's pods: implements [`PodAgent`] for the task service.
pub struct PodRuntime {
    artifacts: Arc<ArtifactStore>,
    slot_bytes: u64,
    pods: Mutex<HashMap<String, Arc<Pod>>>,
    counters: Arc<PodCounters>,
    /// The supervisor that runs every pod as a workload of its `pods` source.
    agent: Agent,
    /// Digests of removed pods' programs kept in the artifact store, oldest first (at most
    /// [`KEPT_PROGRAMS`]).
    kept: Mutex<std::collections::VecDeque<String>>,
}

impl PodRuntime {
    /// Pods run by `agent`'s supervisor, compiled through its artifact store (and so its
    /// engine, whose memory slot bounds every pod's limit).
    pub fn new(agent: Agent) -> Self {
        let artifacts = agent.artifacts().clone();
        let slot_bytes = artifacts.engine().options().max_memory_bytes;
        Self {
            artifacts,
            slot_bytes,
            pods: Mutex::new(HashMap::new()),
            counters: Arc::new(PodCounters::default()),
            agent,
            kept: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<Pod>>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pod(&self, id: &str) -> Result<Arc<Pod>, AgentError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(id.to_string()))
    }

    /// The log hub pods' lines go to (the agent's).
    fn logs(&self) -> &Arc<LogHub> {
        self.agent.log_hub()
    }

    /// Counters since the agent started.
    pub fn counters(&self) -> &PodCounters {
        &self.counters
    }

    /// Each pod's workload name, state (`starting`, `running`, `completed`, `failed`,
    /// `stopped`) and labels, sorted by name: what `/metrics` counts.
    pub fn states(&self) -> Vec<PodState> {
        let mut rows: Vec<PodState> = self
            .table()
            .values()
            .map(|pod| {
                let state = match (&*pod.exit.borrow(), &*pod.phase()) {
                    (Some(Exit::Code(0)), _) => WorkloadState::Completed,
                    (Some(Exit::Stopped), _) => WorkloadState::Stopped,
                    (Some(_), _) => WorkloadState::Failed,
                    (None, Phase::Running) => WorkloadState::Running,
                    (None, _) => WorkloadState::Starting,
                };
                PodState {
                    workload: pod.name.clone(),
                    state,
                    labels: pod.labels(),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.workload.cmp(&b.workload));
        rows
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no pod is held.
    pub fn is_empty(&self) -> bool {
        self.table().is_empty()
    }

    /// A component of Lichen's world as a pod program: refused when it imports a device
    /// interface (a pod has no grants) or when its interval is bad.
    fn lichen_program(
        &self,
        entry: &str,
        artifact: &crate::runtime::wasm::Artifact,
        env: &[(String, String)],
    ) -> Result<PodProgram, AgentError> {
        if let Some(import) = lichen::device_import(artifact, self.artifacts.engine().engine()) {
            return Err(self.refuse(format!(
                "entrypoint {entry:?}: imports {import}, but a pod gets no device grants (pods of Lichen's world have key-value, config, logs, clocks, telemetry and ticks only); deploy device functions that need pins or buses with `lichen deploy`"
            )));
        }
        let interval = lichen::interval(env).map_err(|message| self.refuse(message))?;
        Ok(PodProgram::Lichen { interval })
    }

    /// Starts a pod of Lichen's world in the supervisor, then waits for its end beside it.
    async fn start_lichen(
        &self,
        pod: Arc<Pod>,
        interval: Option<Duration>,
    ) -> Result<(), AgentError> {
        let spec = lichen::spec(
            &pod.name,
            &pod.digest,
            &pod.env,
            interval,
            pod.requested_memory,
        );
        let lines = lichen::start(&self.agent, spec, Labels(pod.labels())).await?;
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let forwarder = tokio::spawn(lichen::forward_lines(lines, pod.stdout.clone(), end_rx));
        let agent = self.agent.clone();
        let waiter_pod = pod.clone();
        let counters = self.counters.clone();
        let waiter = tokio::spawn(async move {
            let pod = waiter_pod;
            let exit = lichen::wait(&agent, &pod.name).await;
            let _ = end_tx.send(());
            let _ = forwarder.await;
            if let Exit::Trapped(reason) = &exit {
                if let Some(stderr) = &pod.stderr {
                    stderr.write(format!("{reason}\n").as_bytes()).await;
                }
                counters.trapped.fetch_add(1, Ordering::Relaxed);
            }
            pod.end(exit);
        });
        drop(waiter);
        *pod.phase() = Phase::Running;
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Starts a WASI command pod in the supervisor with its output streamed: two bounded
    /// pipes whose program ends the command runner takes (through the sink registered under
    /// the workload's name) and whose reading ends are forwarded to containerd's FIFOs and
    /// the log; then waits for its end beside it.
    async fn start_command(&self, pod: Arc<Pod>) -> Result<(), AgentError> {
        let (out, out_reader) = pipe();
        let (err, err_reader) = pipe();
        let streams = Arc::new(PodStreams::new(out, err));
        let outputs = self.agent.command_outputs().clone();
        outputs
            .register(&pod.name, streams.clone())
            .map_err(|e| AgentError::Unavailable(e.to_string()))?;
        let log: Arc<dyn LogSink + Send + Sync> = self.logs().clone();
        let destination = |sink: &Option<OutputSink>, stream, level| Destination {
            sink: sink.clone(),
            log: log.clone(),
            workload: pod.name.clone(),
            stream,
            level,
        };
        let forward_out = tokio::spawn(forward(
            out_reader,
            destination(&pod.stdout, "stdout", LogLevel::Info),
        ));
        let forward_err = tokio::spawn(forward(
            err_reader,
            destination(&pod.stderr, "stderr", LogLevel::Warn),
        ));
        let memory = pod.requested_memory.unwrap_or(self.slot_bytes);
        let spec = lichen::command_spec(&pod.name, &pod.digest, &pod.args, &pod.env, memory);
        if let Err(e) = self
            .agent
            .upsert_workload(Source::Pods, spec, Labels(pod.labels()))
            .await
        {
            // Nothing runs: the pipes close and the forwarders end with no bytes.
            outputs.unregister(&pod.name);
            streams.close();
            return Err(AgentError::Invalid(e.error));
        }
        let agent = self.agent.clone();
        let logs = self.logs().clone();
        let waiter_pod = pod.clone();
        let counters = self.counters.clone();
        let waiter = tokio::spawn(async move {
            let pod = waiter_pod;
            let exit = lichen::wait(&agent, &pod.name).await;
            // The run's store is gone, and with it the pipes' program ends it took; a run
            // that never started leaves them here. Either way the forwarders finish with the
            // last bytes, before the exit is reported.
            outputs.unregister(&pod.name);
            streams.close();
            let _ = forward_out.await;
            let _ = forward_err.await;
            if let Exit::Trapped(reason) = &exit {
                if let Some(stderr) = &pod.stderr {
                    stderr
                        .write(format!("wasm trap: {reason}\n").as_bytes())
                        .await;
                }
                counters.trapped.fetch_add(1, Ordering::Relaxed);
            }
            // containerd's reader may not have opened the FIFO yet (a short program on a
            // busy node): report the exit once it has taken the output, or after the stall
            // bound.
            for sink in [&pod.stdout, &pod.stderr].into_iter().flatten() {
                sink.drained(lichen_shim::io::OUTPUT_STALL).await;
            }
            logs.agent_line(&pod.name, LogLevel::Info, &format!("pod ended: {exit:?}"));
            pod.end(exit);
        });
        drop(waiter);
        *pod.phase() = Phase::Running;
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Keeps a removed pod's program compiled for the next pod of its image; the oldest of
    /// more than [`KEPT_PROGRAMS`] is let go.
    fn keep_program(&self, digest: &str) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|d| d != digest);
        kept.push_back(digest.to_string());
        self.artifacts.keep(digest);
        while kept.len() > KEPT_PROGRAMS {
            if let Some(old) = kept.pop_front() {
                self.artifacts.unkeep(&old);
            }
        }
    }

    fn refuse(&self, message: String) -> AgentError {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        AgentError::Invalid(message)
    }
}

#[async_trait]
impl PodAgent for PodRuntime {
    async fn create(&self, workload: PodWorkload) -> Result<(), AgentError> {
        if let Some(limit) = workload.memory_limit.filter(|&l| l > self.slot_bytes) {
            return Err(self.refuse(format!(
                "linux.resources.memory.limit: {limit} bytes is more than the agent's Wasm instance slot of {} bytes (wasm.max-memory)",
                self.slot_bytes
            )));
        }
        {
            let table = self.table();
            if table.contains_key(&workload.id) {
                return Err(AgentError::State(format!(
                    "a pod with task id {} exists",
                    workload.id
                )));
            }
            if table.len() >= MAX_PODS {
                return Err(AgentError::Unavailable(format!(
                    "this agent already runs {MAX_PODS} pods"
                )));
            }
        }
        let entry = workload.entrypoint.display().to_string();
        let clock = Instant::now();
        let cached = self
            .artifacts
            .contains(&crate::runtime::wasm::sha256_hex(&workload.wasm));
        let artifact = self
            .artifacts
            .add(workload.wasm)
            .await
            .map_err(|e| self.refuse(format!("entrypoint {entry:?}: {e:#}")))?;
        // The compile-cache part of the task path (`lichen bench pods` reads it back).
        tracing::info!(
            task = %workload.id,
            artifact_us = clock.elapsed().as_micros(),
            cached,
            "pod program ready"
        );
        let program = match artifact.command() {
            Some(program) => PodProgram::Command {
                kind: program.kind_name(),
            },
            None => self.lichen_program(&entry, &artifact, &workload.env)?,
        };
        let mut table = self.table();
        if table.contains_key(&workload.id) {
            return Err(AgentError::State(format!(
                "a pod with task id {} exists",
                workload.id
            )));
        }
        let name = lichen::workload_name(&workload.id, &workload.identity, |name| {
            table.values().any(|p| p.name == name)
        });
        let pod = Arc::new(Pod {
            id: workload.id.clone(),
            name,
            namespace: workload.namespace,
            identity: workload.identity,
            digest: artifact.digest().to_string(),
            program,
            args: workload.args,
            env: workload.env,
            requested_memory: workload.memory_limit,
            stdout: workload.stdout,
            stderr: workload.stderr,
            phase: Mutex::new(Phase::Created),
            exit: watch::Sender::new(None),
        });
        self.logs().agent_line(
            &pod.name,
            LogLevel::Info,
            &format!(
                "pod created: task {} ({}), {} from {entry}",
                pod.id,
                pod.labels_text(),
                pod.program.kind_name()
            ),
        );
        table.insert(workload.id, pod);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), AgentError> {
        let pod = self.pod(id)?;
        if !matches!(*pod.phase(), Phase::Created) {
            return Err(AgentError::State(format!("pod {id} was already started")));
        }
        match pod.program.clone() {
            PodProgram::Command { .. } => self.start_command(pod).await,
            PodProgram::Lichen { interval } => self.start_lichen(pod, interval).await,
        }
    }

    async fn wait(&self, id: &str) -> Result<Exit, AgentError> {
        let mut rx = self.pod(id)?.exit.subscribe();
        loop {
            if let Some(exit) = rx.borrow_and_update().clone() {
                return Ok(exit);
            }
            if rx.changed().await.is_err() {
                return Err(AgentError::NotFound(id.to_string()));
            }
        }
    }

    async fn stop(&self, id: &str) -> Result<(), AgentError> {
        let pod = self.pod(id)?;
        let running = matches!(*pod.phase(), Phase::Running);
        if !running {
            if matches!(*pod.phase(), Phase::Created) {
                *pod.phase() = Phase::Ended;
                pod.end(Exit::Stopped);
            }
            return Ok(());
        }
        // The end is recorded by the pod's waiter once the workload has stopped and its
        // output is forwarded; until then the phase reads running.
        if let Err(e) = lichen::stop(&self.agent, &pod.name).await
            && pod.exit.borrow().is_none()
        {
            return Err(AgentError::NotFound(e.error));
        }
        self.counters.stopped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn status(&self, id: &str) -> Result<PodStatus, AgentError> {
        let pod = self.pod(id)?;
        if let Some(exit) = pod.exit.borrow().clone() {
            return Ok(PodStatus::Exited(exit));
        }
        Ok(match &*pod.phase() {
            Phase::Created => PodStatus::Created,
            _ => PodStatus::Running,
        })
    }

    async fn remove(&self, id: &str) -> Result<(), AgentError> {
        let pod = self.pod(id)?;
        if matches!(*pod.phase(), Phase::Running) && pod.exit.borrow().is_none() {
            return Err(AgentError::State(format!("pod {id} is running")));
        }
        if !matches!(*pod.phase(), Phase::Created) {
            // Kept before the removal collects unused artifacts.
            self.keep_program(&pod.digest);
            lichen::remove(&self.agent, &pod.name).await;
        }
        self.table().remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
