//! One task per workload: it owns the live instance, takes events one at a time from the
//! workload's bounded queue and its interval trigger, commits what each event wrote, swaps in
//! a new version between two events, and restarts a trapped instance with back-off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lichen_host_apis::{KvMap, PendingWrites};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::artifacts::{Artifact, ArtifactKind};
use super::engine::WasmEngine;
use super::instance::{CallOutcome, Instance, InstanceSetup};
use crate::deployment::{Limits, WorkloadSpec, WorkloadState};
use crate::logs::LogHub;
use crate::metrics::Metrics;
use crate::runtime::{DeliveryError, UpdateError};
use crate::store::{
    CommandRecord, EventCommit, KvWrite, OutboxRecord, StateStore, StoreError, TelemetryRecord,
};

/// Defaults for limits a workload does not set.
pub const DEFAULT_MEMORY_LIMIT: u64 = 16 << 20;
/// Default longest call into a guest.
pub const DEFAULT_TIME_SLICE: Duration = Duration::from_millis(100);
/// Default number of queued events per workload.
pub const DEFAULT_QUEUE: usize = 64;

/// First restart delay; it doubles after each failure in a row.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What workers share: engine, state store, logs, metrics.
#[derive(Clone)]
pub struct WorkerContext {
    /// The Wasm engine.
    pub engine: Arc<WasmEngine>,
    /// The state store.
    pub store: StateStore,
    /// Guest and agent log lines.
    pub logs: Arc<LogHub>,
    /// Agent metrics.
    pub metrics: Arc<Metrics>,
    /// Largest memory limit a workload may ask for (the engine's slot size).
    pub max_memory_bytes: u64,
    /// The board's devices, opened for workloads' grants.
    pub devices: Arc<crate::grants::DeviceHub>,
    /// Output sinks of WASI commands that run streaming and unsliced (containerd's pods).
    pub outputs: Arc<super::command::CommandOutputs>,
}

/// An event for a workload, from the CLI or a trigger.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An interval tick (also injectable, for tests and benchmarks).
    Tick,
    /// A command with an id, a name and a payload.
    Command {
        /// Identifier of the command (a hub command's message id, which the guest sees too).
        id: String,
        /// Command name.
        name: String,
        /// Payload bytes.
        payload: Vec<u8>,
        /// For a hub command: what to record with the event's writes.
        hub: Option<HubCommand>,
    },
    /// An edge on an input watched by a `gpio-edge` trigger.
    GpioEdge {
        /// Logical name of the input.
        input: String,
        /// The edge and its timestamp.
        event: lichen_devices::EdgeEvent,
    },
}

/// The answer to a delivery: the guest's reply, or why there is none.
pub type Reply = Result<Option<Vec<u8>>, String>;

/// A hub command's bookkeeping: once the guest has answered, the worker commits the event's
/// key-value writes and telemetry, the command's id into the inbox and its result into the
/// outbox in one transaction, so a redelivery after a crash finds all of it done or none.
#[derive(Clone)]
pub struct HubCommand {
    /// Makes the command's `cmd-result` record from the guest's answer.
    pub result: Arc<dyn Fn(&Reply) -> OutboxRecord + Send + Sync>,
    /// Set by the worker when the commit is made (or found made by an earlier copy); left
    /// empty when nothing was committed (the guest trapped, the workload stopped, the
    /// commit failed).
    pub done: Arc<OnceLock<CommandCommitted>>,
}

impl std::fmt::Debug for HubCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCommand")
            .field("done", &self.done.get())
            .finish_non_exhaustive()
    }
}

/// What the commit of a hub command found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandCommitted {
    /// This event's writes, the inbox id and the result were committed.
    Now,
    /// The inbox held the id already: nothing of this event was written.
    Before,
}

/// An event in a workload's queue, with where to send the reply.
pub struct EventRequest {
    /// The event.
    pub delivery: Delivery,
    /// Gets the reply once the event is handled (and committed).
    pub reply: Option<oneshot::Sender<Reply>>,
}

/// Instructions for a worker, handled between two events.
pub enum WorkerCommand {
    /// Switch to an instance that is already instantiated and initialised.
    Swap {
        /// The new version, ready.
        next: Box<Prepared>,
        /// Told when the switch happened.
        done: oneshot::Sender<()>,
    },
    /// Deliver `stop` to the instance and end.
    Stop {
        /// Told when the worker has stopped.
        done: oneshot::Sender<()>,
    },
}

/// A version of a workload: artifact, spec and deployment version, with its instance if one
/// is ready.
pub struct Prepared {
    artifact: Arc<Artifact>,
    spec: WorkloadSpec,
    version: u64,
    instance: Option<Instance>,
}

/// Live counters of a worker, read by `ps` and metrics.
#[derive(Default)]
pub struct WorkerStats {
    /// Events handled.
    pub events_handled: AtomicU64,
    /// Traps.
    pub traps: AtomicU64,
    /// Restarts.
    pub restarts: AtomicU64,
    /// Linear memory of the live instance.
    pub memory_bytes: AtomicU64,
    /// Mutable status.
    pub status: Mutex<WorkerStatus>,
}

/// The parts of a worker's status that are not counters.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// `starting` (also before the worker's task has said anything), `running`, `backoff`,
    /// `failed`, `stopped`, `completed`.
    pub state: WorkloadState,
    /// Last failure in words.
    pub last_error: Option<String>,
    /// Digest of the module that runs.
    pub digest: String,
    /// Kind of the artifact that runs.
    pub kind: String,
    /// Deployment version of what runs.
    pub version: u64,
    /// When the live instance started.
    pub started_at: Option<Instant>,
    /// The exit code of the last run of a WASI command program (`None` for components with
    /// handlers, and while the first run goes).
    pub exit_code: Option<i32>,
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            state: WorkloadState::Starting,
            last_error: None,
            digest: String::new(),
            kind: String::new(),
            version: 0,
            started_at: None,
            exit_code: None,
        }
    }
}

/// Why a run of a worker's instance failed, passed to the worker's `failed`: its text is the
/// kind of the event-log entry (`start-failed`, `trapped`, `exited`, as before the enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The instance could not be made (compile, instantiate, `start` handler).
    StartFailed,
    /// A handler trapped (or ran past its time slice).
    Trapped,
    /// A WASI command program exited with a non-zero code.
    Exited,
}

impl Failure {
    /// Its event kind: `start-failed`, `trapped` or `exited`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Failure::StartFailed => "start-failed",
            Failure::Trapped => "trapped",
            Failure::Exited => "exited",
        }
    }
}

impl WorkerStats {
    /// A copy of the status.
    pub fn status(&self) -> WorkerStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, f: impl FnOnce(&mut WorkerStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Queues events for one worker (cheap to clone).
#[derive(Clone)]
pub struct EventSender(mpsc::Sender<Queued>);

/// What a workload's event queue holds: a queued event is boxed, so that the queue's
/// buffer, which tokio allocates 32 slots at a time when the queue is made, costs a pointer
/// per slot instead of a whole event (~3 KiB less per workload).
pub(super) type Queued = Box<EventRequest>;

impl EventSender {
    /// Queues an event whose reply goes to `reply`, waiting up to `within` for room in the
    /// queue (a workload in back-off takes nothing until it restarts).
    pub async fn deliver_within(
        &self,
        delivery: Delivery,
        reply: oneshot::Sender<Reply>,
        within: Duration,
    ) -> Result<(), DeliveryError> {
        let request = Box::new(EventRequest {
            delivery,
            reply: Some(reply),
        });
        match tokio::time::timeout(within, self.0.send(request)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(DeliveryError::QueueClosed),
            Err(_) => Err(DeliveryError::StayedFull {
                capacity: self.0.max_capacity(),
                within,
            }),
        }
    }

    /// Queues an event without a reply, waiting for room in the queue.
    pub async fn deliver(&self, delivery: Delivery) -> Result<(), DeliveryError> {
        self.0
            .send(Box::new(EventRequest {
                delivery,
                reply: None,
            }))
            .await
            .map_err(|_| DeliveryError::QueueClosed)
    }
}

/// The supervisor's end of a worker.
pub struct WorkerHandle {
    /// The workload's name.
    pub name: Arc<str>,
    /// The spec the worker was last given.
    pub spec: WorkloadSpec,
    /// Digest of the module the worker was last given.
    pub digest: String,
    events: mpsc::Sender<Queued>,
    control: mpsc::UnboundedSender<WorkerCommand>,
    /// Counters and status.
    pub stats: Arc<WorkerStats>,
    task: JoinHandle<()>,
    kv: Arc<Mutex<KvMap>>,
}

impl WorkerHandle {
    /// Queues an event; fails at once when the queue is full or the worker has ended.
    pub fn try_deliver(
        &self,
        delivery: Delivery,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> Result<(), DeliveryError> {
        self.events
            .try_send(Box::new(EventRequest { delivery, reply }))
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => DeliveryError::QueueFull {
                    name: self.name.to_string(),
                    capacity: self.events.max_capacity(),
                },
                mpsc::error::TrySendError::Closed(_) => {
                    DeliveryError::NotRunning(self.name.to_string())
                }
            })
    }

    /// Queues an event, waiting for room in the queue.
    pub async fn deliver(
        &self,
        delivery: Delivery,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> Result<(), DeliveryError> {
        self.events
            .send(Box::new(EventRequest { delivery, reply }))
            .await
            .map_err(|_| DeliveryError::NotRunning(self.name.to_string()))
    }

    /// A handle that queues events for this worker without going through the supervisor.
    pub fn sender(&self) -> EventSender {
        EventSender(self.events.clone())
    }

    /// Events waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.events.max_capacity() - self.events.capacity()
    }

    /// Tells whether the worker task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Prepares a new version beside the running one (compile is already done: instantiate
    /// and `init`), then switches to it between two events. On failure the running version
    /// stays and the error is returned.
    pub async fn reload(
        &mut self,
        ctx: &WorkerContext,
        artifact: Arc<Artifact>,
        spec: WorkloadSpec,
        version: u64,
    ) -> Result<(), UpdateError> {
        let instance = if artifact.kind() == ArtifactKind::Component {
            let mut setup = setup_for(ctx, &spec, self.kv.clone());
            let started = match open_devices(ctx, &spec).await {
                Ok(devices) => {
                    setup.devices = devices;
                    let started = start_instance(ctx, &artifact, &setup).await;
                    release_devices(std::mem::take(&mut setup.devices)).await;
                    started.map_err(UpdateError::Start)
                }
                Err(message) => Err(UpdateError::Devices(message)),
            };
            match started {
                Ok(instance) => Some(instance),
                Err(message) => {
                    restore_devices(ctx, &self.spec).await;
                    return Err(message);
                }
            }
        } else {
            None
        };
        let digest = artifact.digest().to_string();
        let next = Box::new(Prepared {
            artifact,
            spec: spec.clone(),
            version,
            instance,
        });
        let (done, switched) = oneshot::channel();
        self.control
            .send(WorkerCommand::Swap { next, done })
            .map_err(|_| UpdateError::NotRunning {
                name: self.name.to_string(),
            })?;
        switched.await.map_err(|_| UpdateError::EndedDuringReload {
            name: self.name.to_string(),
        })?;
        self.spec = spec;
        self.digest = digest;
        Ok(())
    }

    /// Delivers `stop`, waits for the worker to end.
    pub async fn stop(self) {
        let (done, stopped) = oneshot::channel();
        if self.control.send(WorkerCommand::Stop { done }).is_ok() {
            let _ = stopped.await;
        }
        let _ = self.task.await;
    }
}

fn setup_for(ctx: &WorkerContext, spec: &WorkloadSpec, kv: Arc<Mutex<KvMap>>) -> InstanceSetup {
    let memory = spec
        .limits
        .memory_bytes
        .unwrap_or(DEFAULT_MEMORY_LIMIT)
        .min(ctx.max_memory_bytes);
    InstanceSetup {
        workload: Arc::from(spec.name.as_str()),
        config: Arc::new(spec.config.clone()),
        kv,
        log: ctx.logs.clone(),
        memory_limit: usize::try_from(memory).unwrap_or(usize::MAX),
        // Specs are checked against their bounds before they get here; clamping keeps the
        // tick arithmetic sound whatever the spec says.
        time_slice: spec
            .limits
            .time_slice
            .unwrap_or(DEFAULT_TIME_SLICE)
            .clamp(Limits::MIN_TIME_SLICE, Limits::MAX_TIME_SLICE),
        devices: Arc::default(),
    }
}

/// Why a component instance did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The artifact is a core module.
    #[error("artifact is not a component")]
    NotComponent,
    /// Instantiation failed (in words: Wasmtime's chain, cut to its first lines).
    #[error("instantiation failed: {0}")]
    Instantiate(String),
    /// `init` returned an error: the guest's own words.
    #[error("init failed: {0}")]
    InitFailed(String),
    /// `init` trapped (in words, as the trap is recorded).
    #[error("init trapped: {0}")]
    InitTrapped(String),
    /// `init` ended without handing its instance back.
    #[error("init lost its instance")]
    InitLost,
    /// `init`'s writes did not commit.
    #[error("cannot commit to the state store: {0}")]
    Commit(#[source] StoreError),
}

/// Instantiates a component and runs `init`, committing init's writes.
async fn start_instance(
    ctx: &WorkerContext,
    artifact: &Artifact,
    setup: &InstanceSetup,
) -> Result<Instance, StartError> {
    let pre = artifact.component().ok_or(StartError::NotComponent)?;
    let started = Instant::now();
    let instance = Instance::instantiate(ctx.engine.engine(), pre, setup)
        .await
        .map_err(StartError::Instantiate)?;
    let (instance, outcome) = instance.init_off_workers().await;
    let failure = match outcome {
        CallOutcome::Ok(_) => None,
        CallOutcome::GuestError(message) => Some(StartError::InitFailed(message)),
        CallOutcome::Trap(message) => Some(StartError::InitTrapped(message)),
    };
    let mut instance = match (instance, failure) {
        (Some(instance), None) => instance,
        (instance, failure) => {
            if let Some(instance) = instance {
                instance.release().await;
            }
            return Err(failure.unwrap_or(StartError::InitLost));
        }
    };
    let writes = instance.take_pending();
    if let Err(error) = commit(ctx, &setup.workload, &writes, 0, None).await {
        instance.release().await;
        return Err(StartError::Commit(error));
    }
    instance.apply_committed(&writes);
    ctx.metrics.instantiate.observe(started.elapsed());
    Ok(instance)
}

/// The words for a failed commit.
fn commit_error(error: &StoreError) -> String {
    format!("cannot commit to the state store: {error}")
}

async fn commit(
    ctx: &WorkerContext,
    workload: &str,
    writes: &PendingWrites,
    events: u64,
    command: Option<CommandRecord>,
) -> Result<(), StoreError> {
    if writes.is_empty() && events == 0 && command.is_none() {
        return Ok(());
    }
    let commit = EventCommit {
        workload: workload.to_string(),
        kv: writes
            .kv
            .iter()
            .map(|((bucket, key), value)| KvWrite {
                bucket: bucket.clone(),
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        telemetry: writes
            .telemetry
            .iter()
            .map(|t| TelemetryRecord {
                stream: t.stream.clone(),
                payload: t.payload.clone(),
                created_at_ms: t.created_at_ms,
            })
            .collect(),
        events_handled: events,
        command,
    };
    ctx.store.commit_event(commit).await
}

/// Starts a worker for a workload. The first instance is created by the worker itself, so a
/// failing `init` shows as the workload's state (with restarts per its policy) rather than
/// failing the deploy.
pub fn spawn_worker(
    ctx: WorkerContext,
    artifact: Arc<Artifact>,
    spec: WorkloadSpec,
    version: u64,
    kv: KvMap,
    initial_events: u64,
) -> WorkerHandle {
    let name: Arc<str> = Arc::from(spec.name.as_str());
    // Bounded at validation; clamped again because tokio panics on a capacity of 0 or past
    // its semaphore's limit.
    let queue = spec
        .limits
        .queue
        .unwrap_or(DEFAULT_QUEUE)
        .clamp(1, Limits::MAX_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(queue);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(WorkerStats::default());
    stats
        .events_handled
        .store(initial_events, Ordering::Relaxed);
    let kv = Arc::new(Mutex::new(kv));
    let digest = artifact.digest().to_string();
    let worker = Worker {
        ctx,
        name: name.clone(),
        current: Prepared {
            artifact,
            spec: spec.clone(),
            version,
            instance: None,
        },
        fallback: None,
        kv: kv.clone(),
        stats: stats.clone(),
        events: events_rx,
        edge_queue: events_tx.downgrade(),
        control: control_rx,
        tick_sequence: 0,
        failures_in_a_row: 0,
        uncounted_events: 0,
        stop_during_run: None,
    };
    let task = tokio::spawn(Box::new(worker).run());
    WorkerHandle {
        name,
        spec,
        digest,
        events: events_tx,
        control: control_tx,
        stats,
        task,
        kv,
    }
}

mod devices;
mod dispatch;
mod edges;
mod run;

use devices::{open_devices, release_devices, restore_devices};

use run::Worker;
