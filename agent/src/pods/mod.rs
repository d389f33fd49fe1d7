//! Kubernetes pods on the resident agent: the agent's side of containerd's Task API.
//!
//! The task service (`lichen_shim::TaskService`, served on the socket from `[containerd]
//! task-socket` by [`server`]) reads each pod container's bundle and hands its program here
//! through the [`PodAgent`] trait. [`PodRuntime`] runs it as a WASI command workload of the
//! agent's engine: the `.wasm` bytes become an artifact (compiled once, cached on disk like
//! any module), `process.args` and `process.env` become its argv and environment, the OCI
//! memory limit (checked against the engine's instance slot) its linear memory limit, and
//! its stdout and stderr stream to containerd's FIFOs and to the pod's log as it writes
//! ([`output`]). `ps` (source `pods`, labels `namespace`, `pod`, `container`), logs and
//! metrics show pods beside the deployment's workloads ([`control`]). A pod runs until its
//! program returns, traps or is stopped (containerd's `Kill`), with no time slice: Kubernetes
//! programs are long-running. A component of Lichen's world is not run here but handed to the
//! supervisor as a `pods` workload with no device grants ([`lichen`]).
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
use wasmtime_wasi::WasiCtxBuilder;

use crate::api::types::WorkloadStatus;
use crate::logs::LogHub;
use crate::runtime::wasm::{ArtifactStore, CommandProgram, run_program};
use crate::supervisor::{Agent, Labels};
use output::{Destination, forward, pipe};

/// Most pods the agent holds at once (the task service's own bound on tasks).
pub const MAX_PODS: usize = lichen_shim::service::MAX_TASKS;
/// A pod program's time slice: none (it runs until it returns, traps or is stopped). The
/// engine still preempts it every epoch tick so other workloads get the CPU.
const POD_TIME_SLICE: Duration = Duration::MAX;

/// What a pod runs.
#[derive(Clone)]
enum PodProgram {
    /// A WASI command program, run here with its output to containerd's FIFOs.
    Command(CommandProgram),
    /// A component of Lichen's world, run by the supervisor as a `pods` workload with no
    /// device grants ([`lichen`]), ticked every `interval` if set.
    Lichen { interval: Option<Duration> },
}

impl PodProgram {
    fn kind_name(&self) -> &'static str {
        match self {
            PodProgram::Command(program) => program.kind_name(),
            PodProgram::Lichen { .. } => "wasm",
        }
    }

    fn is_lichen(&self) -> bool {
        matches!(self, PodProgram::Lichen { .. })
    }
}

/// Where a pod is in its life.
enum Phase {
    Created,
    Running {
        abort: tokio::task::AbortHandle,
        since: Instant,
    },
    Ended,
}

struct Pod {
    id: String,
    /// The name `ps` and `logs` know it by.
    name: String,
    namespace: String,
    identity: PodIdentity,
    digest: String,
    program: PodProgram,
    args: Vec<String>,
    env: Vec<(String, String)>,
    memory_limit: usize,
    /// The OCI spec's memory limit, if it set one.
    requested_memory: Option<u64>,
    stdout: Option<OutputSink>,
    stderr: Option<OutputSink>,
    phase: Mutex<Phase>,
    exit: watch::Sender<Option<Exit>>,
    output_bytes: AtomicU64,
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

/// The agent's pods: implements [`PodAgent`] for the task service.
pub struct PodRuntime {
    artifacts: Arc<ArtifactStore>,
    logs: Arc<LogHub>,
    slot_bytes: u64,
    pods: Mutex<HashMap<String, Arc<Pod>>>,
    counters: Arc<PodCounters>,
    /// The supervisor that runs pods of Lichen's world; without it they are refused.
    agent: Option<Agent>,
}

impl PodRuntime {
    /// Pods compiled through `artifacts` (and so its engine, whose memory slot bounds every
    /// pod's limit), logging to `logs`.
    pub fn new(artifacts: Arc<ArtifactStore>, logs: Arc<LogHub>) -> Self {
        let slot_bytes = artifacts.engine().options().max_memory_bytes;
        Self {
            artifacts,
            logs,
            slot_bytes,
            pods: Mutex::new(HashMap::new()),
            counters: Arc::new(PodCounters::default()),
            agent: None,
        }
    }

    /// Runs pods whose `.wasm` is a component of Lichen's world as `pods` workloads of
    /// `agent`, with no device grants ([`lichen`]).
    pub fn with_agent(mut self, agent: Agent) -> Self {
        self.agent = Some(agent);
        self
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

    /// The pods' log hub.
    pub fn logs(&self) -> &Arc<LogHub> {
        &self.logs
    }

    /// Counters since the agent started.
    pub fn counters(&self) -> &PodCounters {
        &self.counters
    }

    /// Whether `name` is the `ps` name of a pod this runtime runs itself (a WASI command; the
    /// supervisor answers for pods of Lichen's world).
    pub fn knows(&self, name: &str) -> bool {
        self.table()
            .values()
            .any(|p| p.name == name && !p.program.is_lichen())
    }

    /// The task id of the WASI command pod `ps` knows as `name`.
    pub fn id_of(&self, name: &str) -> Option<String> {
        self.table()
            .values()
            .find(|p| p.name == name && !p.program.is_lichen())
            .map(|p| p.id.clone())
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no pod is held.
    pub fn is_empty(&self) -> bool {
        self.table().is_empty()
    }

    /// A `ps` row per WASI command pod, sorted by name (the supervisor's `ps` lists the pods
    /// of Lichen's world).
    pub fn ps(&self) -> Vec<WorkloadStatus> {
        let pods: Vec<Arc<Pod>> = self
            .table()
            .values()
            .filter(|p| !p.program.is_lichen())
            .cloned()
            .collect();
        let mut rows: Vec<WorkloadStatus> = pods.iter().map(|p| status_row(p)).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// The `ps` name of a new pod: `<pod>.<container>` under Kubernetes, else the task id;
    /// the task id is appended when another pod already has the name.
    fn name_for(table: &HashMap<String, Arc<Pod>>, id: &str, identity: &PodIdentity) -> String {
        let base = match (&identity.pod_name, &identity.container_name) {
            (Some(pod), Some(container)) => format!("{pod}.{container}"),
            _ => return id.to_string(),
        };
        if table.values().any(|p| p.name == base) {
            format!("{base}.{id}")
        } else {
            base
        }
    }

    /// A component of Lichen's world as a pod program: refused without a supervisor, when it
    /// imports a device interface (a pod has no grants) or when its interval is bad.
    fn lichen_program(
        &self,
        entry: &str,
        artifact: &crate::runtime::wasm::Artifact,
        env: &[(String, String)],
    ) -> Result<PodProgram, AgentError> {
        if self.agent.is_none() {
            return Err(self.refuse(format!(
                "entrypoint {entry:?}: is a Lichen device function component, which this task server does not run; deploy it with `lichen deploy`"
            )));
        }
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
        agent: &Agent,
        interval: Option<Duration>,
    ) -> Result<(), AgentError> {
        let spec = lichen::spec(
            &pod.name,
            &pod.digest,
            &pod.env,
            interval,
            pod.requested_memory,
        );
        let lines = lichen::start(agent, spec, Labels(pod.labels())).await?;
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let forwarder = tokio::spawn(lichen::forward_lines(lines, pod.stdout.clone(), end_rx));
        let agent = agent.clone();
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
        *pod.phase() = Phase::Running {
            abort: waiter.abort_handle(),
            since: Instant::now(),
        };
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn refuse(&self, message: String) -> AgentError {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        AgentError::Invalid(message)
    }
}

fn status_row(pod: &Pod) -> WorkloadStatus {
    let exit = pod.exit.borrow().clone();
    let (state, uptime_ms) = match (&*pod.phase(), &exit) {
        (_, Some(Exit::Code(0))) => ("completed", None),
        (_, Some(Exit::Stopped)) => ("stopped", None),
        (_, Some(_)) => ("failed", None),
        (Phase::Running { since, .. }, None) => (
            "running",
            Some(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)),
        ),
        _ => ("starting", None),
    };
    let (exit_code, last_error, exit_reason) = match &exit {
        Some(Exit::Code(code)) => (
            Some(*code),
            None,
            Some(format!("the program exited with code {code}")),
        ),
        Some(Exit::Trapped(trap)) => (
            None,
            Some(trap.clone()),
            Some("the program trapped".to_string()),
        ),
        Some(Exit::Stopped) => (None, None, Some("stopped by containerd".to_string())),
        None => (None, None, None),
    };
    WorkloadStatus {
        name: pod.name.clone(),
        kind: pod.program.kind_name().to_string(),
        state: state.to_string(),
        module_digest: format!("sha256:{}", pod.digest),
        deployment_version: 0,
        restarts: 0,
        traps: u64::from(matches!(exit, Some(Exit::Trapped(_)))),
        events_handled: 0,
        queue_depth: 0,
        memory_bytes: 0,
        uptime_ms,
        last_error,
        isolation: "wasm".to_string(),
        pids: None,
        exit_code,
        oom_killed: false,
        exit_reason,
        runner: None,
        accelerator: None,
        source: "pods".to_string(),
        labels: pod.labels(),
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
            Some(program) => PodProgram::Command(program.clone()),
            None => self.lichen_program(&entry, &artifact, &workload.env)?,
        };
        let memory_limit =
            usize::try_from(workload.memory_limit.unwrap_or(self.slot_bytes)).unwrap_or(usize::MAX);
        let mut table = self.table();
        if table.contains_key(&workload.id) {
            return Err(AgentError::State(format!(
                "a pod with task id {} exists",
                workload.id
            )));
        }
        let name = if program.is_lichen() {
            lichen::workload_name(&workload.id, &workload.identity, |name| {
                table.values().any(|p| p.name == name)
            })
        } else {
            Self::name_for(&table, &workload.id, &workload.identity)
        };
        let pod = Arc::new(Pod {
            id: workload.id.clone(),
            name,
            namespace: workload.namespace,
            identity: workload.identity,
            digest: artifact.digest().to_string(),
            program,
            args: workload.args,
            env: workload.env,
            memory_limit,
            requested_memory: workload.memory_limit,
            stdout: workload.stdout,
            stderr: workload.stderr,
            phase: Mutex::new(Phase::Created),
            exit: watch::Sender::new(None),
            output_bytes: AtomicU64::new(0),
        });
        self.logs.agent_line(
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
        let program = match &pod.program {
            PodProgram::Command(program) => program.clone(),
            PodProgram::Lichen { interval } => {
                if !matches!(*pod.phase(), Phase::Created) {
                    return Err(AgentError::State(format!("pod {id} was already started")));
                }
                let agent = self.agent.clone().ok_or_else(|| {
                    AgentError::Invalid("this task server runs no Lichen components".into())
                })?;
                return self.start_lichen(pod.clone(), &agent, *interval).await;
            }
        };
        let mut phase = pod.phase();
        if !matches!(*phase, Phase::Created) {
            return Err(AgentError::State(format!("pod {id} was already started")));
        }
        let (out, out_reader) = pipe();
        let (err, err_reader) = pipe();
        let log: Arc<dyn LogSink + Send + Sync> = self.logs.clone();
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
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdout(out)
            .stderr(err)
            .args(&pod.args)
            .envs(&pod.env);
        let engine = self.artifacts.engine().engine().clone();
        let memory_limit = pod.memory_limit;
        let run = tokio::spawn(async move {
            run_program(&engine, program, builder, memory_limit, POD_TIME_SLICE).await
        });
        *phase = Phase::Running {
            abort: run.abort_handle(),
            since: Instant::now(),
        };
        drop(phase);
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        let logs = self.logs.clone();
        let pod = pod.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            let outcome = run.await;
            // The run's store is gone, and with it the pipes' writers: the forwarders finish
            // with the last bytes, before the exit is reported.
            let bytes = forward_out.await.unwrap_or(0) + forward_err.await.unwrap_or(0);
            pod.output_bytes.store(bytes, Ordering::Relaxed);
            let exit = match outcome {
                Ok(Ok(code)) => Exit::Code(code),
                Ok(Err(trap)) => {
                    let message = format!("wasm trap: {trap}\n");
                    if let Some(stderr) = &pod.stderr {
                        stderr.write(message.as_bytes()).await;
                    }
                    counters.trapped.fetch_add(1, Ordering::Relaxed);
                    Exit::Trapped(trap)
                }
                Err(_) => Exit::Stopped,
            };
            // containerd's reader may not have opened the FIFO yet (a short program on a busy
            // node): report the exit once it has taken the output, or after the stall bound.
            for sink in [&pod.stdout, &pod.stderr].into_iter().flatten() {
                sink.drained(lichen_shim::io::OUTPUT_STALL).await;
            }
            logs.agent_line(&pod.name, LogLevel::Info, &format!("pod ended: {exit:?}"));
            pod.end(exit);
        });
        Ok(())
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
        let phase = std::mem::replace(&mut *pod.phase(), Phase::Ended);
        match phase {
            Phase::Created => pod.end(Exit::Stopped),
            Phase::Running { abort, since } if pod.program.is_lichen() => {
                *pod.phase() = Phase::Running { abort, since };
                if let Some(agent) = &self.agent {
                    lichen::stop(agent, &pod.name)
                        .await
                        .map_err(|e| AgentError::NotFound(e.error))?;
                }
                self.counters.stopped.fetch_add(1, Ordering::Relaxed);
            }
            Phase::Running { abort, since } => {
                // The end is recorded by the run's own task once the run is dropped and the
                // output forwarded; until then the phase reads running.
                *pod.phase() = Phase::Running {
                    abort: abort.clone(),
                    since,
                };
                abort.abort();
                self.counters.stopped.fetch_add(1, Ordering::Relaxed);
            }
            Phase::Ended => {}
        }
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
        if matches!(*pod.phase(), Phase::Running { .. }) && pod.exit.borrow().is_none() {
            return Err(AgentError::State(format!("pod {id} is running")));
        }
        if pod.program.is_lichen()
            && let Some(agent) = &self.agent
        {
            lichen::remove(agent, &pod.name).await;
        }
        if let Some(pod) = self.table().remove(id)
            && !pod.program.is_lichen()
        {
            self.logs.remove(&pod.name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
