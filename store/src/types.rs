//! The records the state store takes and hands back.

use lichen_deployment::WorkloadState;
use serde::{Deserialize, Serialize};

/// How a [`StateStore`](super::StateStore) behaves beyond what the database file itself holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreOptions {
    /// How many guest log lines are kept per workload; older lines are trimmed on append.
    pub max_log_lines_per_workload: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_log_lines_per_workload: 1000,
        }
    }
}

/// A deployment to apply: the document as submitted and the workloads it lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDeployment {
    /// Where the deployment came from (a file name, `api`, ...).
    pub source_name: String,
    /// The deployment document exactly as submitted.
    pub source_text: String,
    /// SHA-256 of `source_text`, lowercase hex, computed by the caller.
    pub digest: String,
    /// A free-form note about this deployment.
    pub description: Option<String>,
    /// Every workload of the deployment; workloads not listed are removed with their state.
    pub workloads: Vec<NewWorkload>,
}

/// One workload listed by a [`NewDeployment`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewWorkload {
    /// The workload name, unique within the deployment.
    pub name: String,
    /// The workload specification as JSON; the store does not look inside it.
    pub spec_json: String,
    /// Digest of the module or image the workload runs.
    pub module_digest: String,
}

/// The durable effects of one handled event, committed atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCommit {
    /// The workload that handled the event.
    pub workload: String,
    /// Key-value writes, applied in order.
    pub kv: Vec<KvWrite>,
    /// Telemetry to queue in the outbox.
    pub telemetry: Vec<TelemetryRecord>,
    /// How many events this commit covers; added to the workload's counter.
    pub events_handled: u64,
    /// The hub command this event handled, recorded in the same transaction as its writes
    /// (so a command redelivered after a crash finds either all of it done or none of it).
    pub command: Option<CommandRecord>,
}

/// A hub command handled by an event: its id for the inbox and its result for the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// The command's message id (the inbox key).
    pub inbox_id: String,
    /// Its `cmd-result` record.
    pub result: OutboxRecord,
}

/// One key-value write of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvWrite {
    /// The bucket the key lives in.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete the key.
    pub value: Option<Vec<u8>>,
}

/// One telemetry message for the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// The stream (topic suffix) the message belongs to.
    pub stream: String,
    /// The message bytes.
    pub payload: Vec<u8>,
    /// When the guest produced the message, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// The runtime status of a workload, as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The workload the status is about.
    pub workload: String,
    /// The new state (stored as its wire name, `running`, `failed`, ...).
    pub state: WorkloadState,
    /// The last error, or `None` to clear it.
    pub last_error: Option<String>,
    /// Total restarts so far.
    pub restarts: u64,
    /// Total traps so far.
    pub traps: u64,
    /// An event-log entry `(kind, detail)` to append in the same transaction.
    pub event: Option<(String, String)>,
}

/// A deployment with its document and its workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The deployment version: 1, 2, 3, ...
    pub version: u64,
    /// When it was applied, in milliseconds since the Unix epoch.
    pub applied_at_ms: u64,
    /// Where the deployment came from.
    pub source_name: String,
    /// The deployment document as submitted.
    pub source_text: String,
    /// SHA-256 of `source_text`, lowercase hex.
    pub digest: String,
    /// The note given with the deployment.
    pub description: Option<String>,
    /// The workloads of the deployment, by name.
    pub workloads: Vec<WorkloadRow>,
}

/// One line of the deployment history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSummary {
    /// The deployment version.
    pub version: u64,
    /// When it was applied, in milliseconds since the Unix epoch.
    pub applied_at_ms: u64,
    /// Where the deployment came from.
    pub source_name: String,
    /// SHA-256 of the document, lowercase hex.
    pub digest: String,
    /// How many workloads the deployment listed.
    pub workload_count: usize,
}

/// A workload of the applied deployment with its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRow {
    /// The workload name.
    pub name: String,
    /// The deployment that last listed the workload.
    pub deployment_version: u64,
    /// The workload specification as JSON.
    pub spec_json: String,
    /// Digest of the module or image the workload runs.
    pub module_digest: String,
    /// The last recorded state (a name this agent does not know reads as
    /// [`WorkloadState::Unknown`]).
    pub state: WorkloadState,
    /// The last recorded error, if any.
    pub last_error: Option<String>,
    /// Total restarts.
    pub restarts: u64,
    /// Total traps.
    pub traps: u64,
    /// Total events handled.
    pub events_handled: u64,
}

/// One entry of the agent's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    /// Increasing id; use it as the cursor for [`StateStore::events`](super::StateStore::events).
    pub id: i64,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The workload it is about, if any.
    pub workload: Option<String>,
    /// What happened (`deployed`, `started`, `trapped`, ...).
    pub kind: String,
    /// Human-readable detail.
    pub detail: String,
}

/// One log line written by a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLogLine {
    /// The workload that wrote it.
    pub workload: String,
    /// When it was written, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The level (`trace` ... `critical`).
    pub level: String,
    /// The context the guest gave.
    pub context: String,
    /// The message.
    pub message: String,
}

/// One queued outbox message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// Increasing id, in queue order.
    pub id: i64,
    /// What it is: `telemetry`, `state`, `cmd-result` or `event` (lichen-sync's `RowKind`).
    pub kind: String,
    /// The workload that produced it.
    pub workload: String,
    /// The stream it belongs to.
    pub stream: String,
    /// The message bytes.
    pub payload: Vec<u8>,
    /// When the guest produced it, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// Counters of the writer thread, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Write transactions committed.
    pub transactions: u64,
    /// Write requests processed (committed or failed).
    pub requests: u64,
    /// Write batches of nothing but status rows, committed without an fsync of their own
    /// (the next synced commit makes them durable).
    #[serde(default)]
    pub unsynced_batches: u64,
    /// Nanoseconds the writer thread spent on batches, from the first request taken to the
    /// last answer sent (statements, commits and answers; not the wait for requests).
    #[serde(default)]
    pub busy_ns: u64,
    /// Nanoseconds of that spent in COMMIT: the WAL write and, when synced, its fsync.
    #[serde(default)]
    pub commit_ns: u64,
}

/// A record for the hub queued by the agent itself rather than by a guest event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// What it is: `state`, `cmd-result`, `event` or `telemetry`.
    pub kind: String,
    /// The workload it is about (empty for node-level records).
    pub workload: String,
    /// The telemetry stream (empty for other kinds).
    pub stream: String,
    /// The payload, JSON text.
    pub payload: Vec<u8>,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// What the quota needs to know of one outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRowSize {
    /// The row id.
    pub id: i64,
    /// Its workload.
    pub workload: String,
    /// Its kind.
    pub kind: String,
    /// Bytes it takes: payload plus a fixed per-row overhead.
    pub bytes: u64,
}
