//! Runtimes that run workloads, one module per kind with the same shape behind one trait (as
//! Kuasar's `vm.rs` has one module per hypervisor): `wasm` (one Wasmtime engine in-process),
//! `container` (OCI bundles through crun/runc), `microvm` (QEMU). Containers and microVMs share
//! the restart loop of `supervise`.
//!
//! The supervisor knows only these traits:
//! - [`Runtime`]: one per kind. [`Runtime::prepare`] loads and checks a workload's artifact
//!   (compiles a module, imports an image) before anything of a deployment changes;
//!   [`Runtime::start`] starts a prepared workload.
//! - [`Workload`]: one running workload: status (with exit reason and resource usage), update
//!   to a new version, stop, and events for the kinds that take them.
//!
//! Logs: every runtime writes its workloads' lines into the agent's [`LogHub`] under the
//! workload's name (guest logs, container stdout/stderr, serial consoles), so `lichen logs`
//! reads them the same way whatever the kind. [`isolation`] decides which tier (runtime) a
//! workload runs in.
//!
//! [`LogHub`]: crate::logs::LogHub

pub mod container;
pub mod isolation;
mod lines;
pub mod microvm;
mod supervise;
pub mod wasm;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lichen_host_apis::KvMap;
use tokio::sync::oneshot;

use crate::deployment::{WorkloadSpec, WorkloadState};

pub use isolation::Tier;

/// Checks the name of a container or microVM (it names files, sockets and cgroups on the
/// host): 1-64 of `a-z`, `0-9`, `-`, `_`, `.`, not starting with `.`.
pub(crate) fn check_process_name(name: &str) -> Result<(), BadProcessName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !name.starts_with('.');
    if ok { Ok(()) } else { Err(BadProcessName) }
}

/// A container or microVM name that cannot name files, sockets and cgroups on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the name must be 1-64 of a-z, 0-9, '-', '_', '.', not starting with '.'")]
pub(crate) struct BadProcessName;

/// Why a workload did not switch to a new version (the old one keeps running).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The new version was prepared by another kind's runtime.
    #[error("a {kind} workload can only be updated to a {wanted}")]
    OtherKind {
        /// The running workload's kind (`wasm`, `container`, `microVM`).
        kind: &'static str,
        /// What it can be updated to (`wasm module`, `container`, `microVM`).
        wanted: &'static str,
    },
    /// The new version's devices did not open (in words: the grant, the device and why).
    #[error("{0}")]
    Devices(String),
    /// The new version did not start (instantiation, `init`, its first commit).
    #[error(transparent)]
    Start(crate::runtime::wasm::StartError),
    /// The workload's worker had already ended.
    #[error("workload {name:?} is not running")]
    NotRunning {
        /// The workload.
        name: String,
    },
    /// The worker ended before it switched to the new version.
    #[error("workload {name:?} ended during the reload")]
    EndedDuringReload {
        /// The workload.
        name: String,
    },
}

/// Why an event was not queued for a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// A kind without an event queue (a container, a microVM).
    #[error("workload {name:?} is a {kind}: it takes no commands")]
    NoCommands {
        /// The workload.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// The queue is full and the caller does not wait.
    #[error("the event queue of workload {name:?} is full ({capacity} events)")]
    QueueFull {
        /// The workload.
        name: String,
        /// The queue's size.
        capacity: usize,
    },
    /// The workload's worker has ended.
    #[error("workload {0:?} is not running")]
    NotRunning(String),
    /// The worker behind a direct event queue has ended.
    #[error("the workload is not running")]
    QueueClosed,
    /// The queue stayed full for as long as the caller waits.
    #[error("the workload's event queue ({capacity} events) stayed full for {within:?}")]
    StayedFull {
        /// The queue's size.
        capacity: usize,
        /// How long the caller waited.
        within: std::time::Duration,
    },
}

/// A boxed future, for the trait methods that run asynchronously (the traits are used as
/// `dyn`, which `async fn` in traits does not allow).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A workload's artifact, loaded and checked by its runtime, ready to start.
#[derive(Clone)]
pub enum Prepared {
    /// A compiled Wasm component or WASI command module.
    Wasm(Arc<wasm::Artifact>),
    /// An imported container image (or a plain rootfs) with its resolved devices.
    #[cfg(feature = "containers")]
    Container(Arc<container::PreparedContainer>),
    /// A checked kernel and root, with the QEMU spec to boot them.
    Microvm(Arc<microvm::PreparedMicrovm>),
}

impl Prepared {
    /// The artifact's sha256 digest (hex), stored with the deployment and shown in `ps`.
    pub fn digest(&self) -> &str {
        match self {
            Prepared::Wasm(artifact) => artifact.digest(),
            #[cfg(feature = "containers")]
            Prepared::Container(container) => &container.digest,
            Prepared::Microvm(vm) => &vm.digest,
        }
    }
}

/// Why a workload's artifact cannot be prepared: the field at fault, relative to the workload
/// (`module`, `image`, `limits.memory`, `gpio[0].pin`), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareError {
    /// The field, relative to the workload.
    pub field: String,
    /// What is wrong, lowercase.
    pub message: String,
}

impl PrepareError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        PrepareError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What a start needs besides the artifact and spec.
pub struct StartInfo {
    /// The deployment version the workload belongs to.
    pub version: u64,
    /// The workload's stored key-value state (kinds without state ignore it).
    pub kv: KvMap,
    /// Events handled before (a restored workload keeps counting).
    pub events_handled: u64,
}

/// Why a workload's last run ended, for `ps`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// The reason in words (`exited with code 3`, `killed by the OOM killer ...`).
    pub reason: String,
    /// The exit code, when there was one.
    pub code: Option<i32>,
    /// Whether the OOM killer ended it at its memory limit.
    pub oom_killed: bool,
}

/// Resources a workload uses now; `None` where the runtime cannot tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory in bytes (linear memory for Wasm, the cgroup's charge for containers).
    pub memory_bytes: Option<u64>,
    /// Processes and threads (containers).
    pub pids: Option<u64>,
}

/// A workload's status as its runtime sees it.
#[derive(Debug, Clone, Default)]
pub struct RuntimeStatus {
    /// What runs: `wasm`, `wasi-command`, `container`, `microvm`.
    pub kind: String,
    /// `starting`, `running`, `backoff`, `failed`, `stopped`, `completed`.
    pub state: WorkloadState,
    /// Digest of the artifact that runs (hex).
    pub digest: String,
    /// Deployment version of what runs.
    pub version: u64,
    /// Restarts since it was deployed.
    pub restarts: u64,
    /// Traps (Wasm) since it was deployed.
    pub traps: u64,
    /// Events handled (Wasm).
    pub events_handled: u64,
    /// Events waiting (Wasm).
    pub queue_depth: u64,
    /// How long the current run has lasted, if one runs.
    pub uptime: Option<Duration>,
    /// The last failure in words.
    pub last_error: Option<String>,
    /// Why the last run ended, if one ended.
    pub exit: Option<ExitInfo>,
    /// Resources used now.
    pub usage: Usage,
    /// The program that runs it (`runc`, `crun`, `qemu-system-x86_64`), for other kinds than
    /// Wasm.
    pub runner: Option<String>,
    /// MicroVMs: the accelerator in use (`kvm`, `tcg`).
    pub accelerator: Option<String>,
}

/// An event for a workload (Wasm workloads take them; other kinds refuse).
pub use wasm::{CommandCommitted, Delivery, EventSender, HubCommand, Reply};

/// One running workload, whatever runs it.
pub trait Workload: Send + Sync {
    /// The workload's name.
    fn name(&self) -> &str;

    /// The spec it was last given.
    fn spec(&self) -> &WorkloadSpec;

    /// Digest of the artifact it was last given.
    fn digest(&self) -> &str;

    /// Its status now, with exit reason and resource usage.
    fn status(&self) -> RuntimeStatus;

    /// Whether it has ended for good (its task is gone).
    fn is_finished(&self) -> bool;

    /// Records a failure the supervisor saw (a failed update) as its last error.
    fn note_error(&self, message: String);

    /// Queues an event without waiting; kinds that take no events refuse.
    fn try_deliver(
        &self,
        _delivery: Delivery,
        _reply: Option<oneshot::Sender<Reply>>,
    ) -> Result<(), DeliveryError> {
        Err(DeliveryError::NoCommands {
            name: self.name().to_string(),
            kind: self.status().kind.to_string(),
        })
    }

    /// Queues an event, waiting for room.
    fn deliver<'a>(
        &'a self,
        delivery: Delivery,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        let result = self.try_deliver(delivery, reply);
        Box::pin(async move { result })
    }

    /// A direct event queue, for the kinds that have one (benchmarks).
    fn event_sender(&self) -> Option<EventSender> {
        None
    }

    /// Switches to a new version or spec. Wasm swaps between two events and keeps the old
    /// version on failure; other kinds stop the old run and start the new one.
    fn update<'a>(
        &'a mut self,
        prepared: Prepared,
        spec: WorkloadSpec,
        version: u64,
    ) -> BoxFuture<'a, Result<(), UpdateError>>;

    /// Stops it (Wasm delivers `stop`; containers get SIGTERM, then SIGKILL) and waits.
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// The runtime of one kind.
pub trait Runtime: Send + Sync {
    /// The isolation tier it provides.
    fn tier(&self) -> Tier;

    /// Whether it can run workloads on this host: `Ok(what runs them)`, or `Err(the missing
    /// piece)`. Asked once, when a deployment first needs the tier (a microVM probe may boot a
    /// trial guest, so it is not done at start unless needed).
    // Both sides stay words, not an error type: the `Err` is a noun phrase (the piece),
    // recorded in `IsolationProbe` and shown as `needs {piece}` by doctor and in refusals.
    fn probe<'a>(&'a self) -> BoxFuture<'a, Result<String, String>>;

    /// Cleans up what an agent killed before it could stop its workloads left behind
    /// (containers still running). Called once at start, before the last deployment is
    /// restored.
    fn recover<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Releases what the runtime holds on the host once every workload is stopped (the agent
    /// is shutting down).
    fn release<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Removes the artifacts this runtime keeps on disk (compiled modules, imported images)
    /// that no workload of the applied deployment uses; `in_use` holds the digests the applied
    /// deployment records for its workloads ([`Prepared::digest`]). The agent calls it after
    /// every deploy, applied or refused, and at start, one call at a time and never during a
    /// deploy, so repeated refused deploys do not grow the store.
    fn collect_garbage<'a>(
        &'a self,
        _in_use: &'a std::collections::BTreeSet<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Loads and checks a workload's artifact; `stored_digest` is the digest recorded when it
    /// was deployed (a restore loads that one).
    fn prepare<'a>(
        &'a self,
        spec: &'a WorkloadSpec,
        stored_digest: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Prepared, PrepareError>>;

    /// Starts a prepared workload. Failures to run show in its status, not here.
    fn start(&self, prepared: Prepared, spec: WorkloadSpec, info: StartInfo) -> Box<dyn Workload>;
}
