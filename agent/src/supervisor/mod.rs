//! The supervisor: owns every workload's worker, applies deployments atomically (validate
//! everything, commit, then start, reload or stop), restores the last deployment at start
//! (`restore`), and answers the local API (`control`).
//!
//! Its parts: `wiring` opens the stores, the engine, the runtimes and the probes; `plan` is the
//! pure reconcile plan (desired against running: start, reload, stop or leave each workload);
//! `apply` validates, prepares and commits an operator deployment and carries out its plan;
//! `sources` does the same one workload at a time for the pods and devices sources; `restore`
//! starts the stored state at boot; `control` answers the API verbs; `status` builds `ps` rows.
//!
//! Two locks: `deploying` serialises deploys, restores and source changes for their whole
//! length (validation, compiles, commit, switch); `workloads` is taken only to read or switch
//! the running set, never across a compile, so `ps`, `send`, `kv`, `logs` and the hub's reads
//! answer while a deploy is still preparing its artifacts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::api::types::{DoctorCheck, WorkloadStatus};

/// A `doctor` check of a part started beside the agent, run with the agent on a blocking
/// thread each time `doctor` is asked ([`Agent::add_doctor_check`]).
pub type DoctorHook = Arc<dyn Fn(&Agent) -> DoctorCheck + Send + Sync>;
use crate::logs::LogOptions;
use crate::runtime::isolation::IsolationProbe;
use crate::runtime::wasm::{ArtifactStore, EngineOptions, WorkerContext};
use crate::runtime::{Runtime, Tier, Workload};

mod apply;
mod control;
mod imports;
mod plan;
mod restore;
mod sources;
mod status;
mod wiring;

pub use imports::ImportRoute;
pub(crate) use imports::{ImportJob, ImportReply};
pub use sources::{CommittedTelemetry, Labels, Refusal, Source, StatusChange, WorkloadEnd};

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

/// A running workload, the tier (runtime) that runs it, and the source it belongs to.
struct Running {
    tier: Tier,
    workload: Box<dyn Workload>,
    source: Source,
    labels: Labels,
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
    /// Checks `doctor` adds for parts started beside the agent (the KubeEdge mapper's), so the
    /// supervisor knows nothing of them.
    doctor_checks: std::sync::Mutex<Vec<DoctorHook>>,
    /// Where `lichen import` goes: this agent's hub link, once it started.
    imports: ImportRoute,
    /// A test's hold on the next deploy's prepare step (see [`PrepareHook`]).
    #[cfg(test)]
    prepare_hook: std::sync::Mutex<Option<Arc<PrepareHook>>>,
}

/// Test-only: holds the next deploy inside its prepare step (deploy lock held, workloads
/// lock free) until the test releases it, so a test can check what answers meanwhile
/// without sleeps. `entered` is notified once prepare starts; prepare then waits on `release`.
/// `Notify` keeps one permit, so neither side can miss the other's signal.
#[cfg(test)]
#[derive(Default)]
struct PrepareHook {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

/// The running agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[cfg(test)]
mod sources_tests;
#[cfg(test)]
mod tests;
