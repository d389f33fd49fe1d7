//! Messages of the local JSON API, shared by the daemon and the CLI.

use serde::{Deserialize, Serialize};

/// `POST /v1/deploy`: a deployment file to validate and apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRequest {
    /// File name as the user gave it, used in error messages (`deploy.toml:12:5: ...`).
    pub file_name: String,
    /// The file's text (TOML, or JSON when the name ends in `.json`).
    pub text: String,
    /// Directory that relative module paths in the file are resolved against.
    pub base_dir: String,
}

/// What `deploy` did, workload by workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeployReport {
    /// Version number the state store gave the applied deployment.
    pub version: u64,
    /// Workloads that were not running before and were started.
    pub started: Vec<String>,
    /// Running workloads switched to a new version or configuration.
    pub reloaded: Vec<String>,
    /// Workloads that the new deployment no longer lists, stopped.
    pub stopped: Vec<String>,
    /// Workloads whose module and settings did not change.
    pub unchanged: Vec<String>,
    /// Workloads that failed to start or reload (the deployment itself was applied).
    pub failures: Vec<WorkloadFailure>,
}

/// A workload that failed to start or reload during a deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadFailure {
    /// The workload's name.
    pub workload: String,
    /// Why it failed; for a reload, the previous version keeps running.
    pub message: String,
}

/// One row of `ps`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// The workload's name.
    pub name: String,
    /// What runs: `wasm` (component), `wasi-command` (preview-1 command module), `container`
    /// or `microvm`.
    pub kind: String,
    /// Where it is in its life, written by its wire name (`running`, `failed`, ...).
    pub state: WorkloadState,
    /// sha256 digest of the module that runs, as `sha256:<hex>`.
    pub module_digest: String,
    /// Deployment version the running instance belongs to.
    pub deployment_version: u64,
    /// Restarts after traps since the workload was deployed.
    pub restarts: u64,
    /// Traps since the workload was deployed.
    pub traps: u64,
    /// Events handled successfully since the workload was deployed.
    pub events_handled: u64,
    /// Events waiting in the workload's queue.
    pub queue_depth: u64,
    /// Linear memory of the running instance, in bytes.
    pub memory_bytes: u64,
    /// Milliseconds since the running instance started, if one runs.
    pub uptime_ms: Option<u64>,
    /// The last failure (trap, init error, failed reload, container exit), if any.
    pub last_error: Option<String>,
    /// The isolation tier it runs in: `wasm`, `container` or `microvm`.
    #[serde(default)]
    pub isolation: String,
    /// Processes and threads in it now (containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Exit code of its last run, when it ended with one (containers, microVMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Whether its last run was killed by the OOM killer at its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// Why its last run ended, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
    /// The program that runs it (`runc`, `crun`, `qemu-system-x86_64`), for non-Wasm kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// MicroVMs: the accelerator in use (`kvm` or `tcg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// Which source of the node's desired state it belongs to: `operator` (deployment files,
    /// the hub, bundles), `pods` (containerd) or `devices` (KubeEdge).
    #[serde(default = "operator")]
    pub source: String,
    /// What its source says it is (`namespace`, `pod`, `container`, `device`); empty for the
    /// operator's workloads.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn operator() -> String {
    "operator".into()
}

pub use crate::logs::LogLine;
/// A workload's state in `ps` rows (the deployment crate's enum, re-exported for clients).
pub use lichen_deployment::WorkloadState;

/// One key-value entry of a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvEntry {
    /// Bucket name (`default` for the default bucket).
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The value as UTF-8 text (lossy for binary values).
    pub value: String,
    /// Size of the value in bytes.
    pub size: u64,
}

/// One row of the lifecycle event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    /// Sequence number of the row; later rows have larger ids.
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The workload concerned, if any.
    pub workload: Option<String>,
    /// What happened: `deployed`, `started`, `reloaded`, `reload-failed`, `trapped`, ...
    pub kind: String,
    /// Details in words.
    pub detail: String,
}

/// `POST /v1/workloads/{name}/send`: a command for a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// Command name.
    pub command: String,
    /// Command payload (text; JSON by convention).
    pub payload: String,
}

/// The workload's answer to a command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendReply {
    /// Identifier the agent gave the command.
    pub id: String,
    /// The reply payload, if the function returned one.
    pub reply: Option<String>,
}

/// What this host can run, as `doctor` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoctorReport {
    /// Lichen's version.
    pub version: String,
    /// The board profile in use.
    pub board: String,
    /// Each check with its outcome.
    pub checks: Vec<DoctorCheck>,
}

/// One line of `doctor`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoctorCheck {
    /// What was checked, for example `wasm runtime` or `kvm`.
    pub name: String,
    /// `ok`, `warn` (works with limits) or `missing`.
    pub status: String,
    /// Why, in words: what was found, what is missing and what follows.
    pub detail: String,
}

/// What kind of failure an [`ApiError`] is; written `invalid`, `not-found`, `unavailable` or
/// `internal` (a code this agent does not know reads as `internal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Bad input; nothing was changed.
    Invalid,
    /// No workload (or other named thing) by that name.
    NotFound,
    /// The target exists but cannot take the request now (stopped, backing off, busy).
    Unavailable,
    /// A failure inside the agent.
    #[serde(other)]
    Internal,
}

impl ErrorCode {
    /// The code's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// The error chain in words, outermost first.
    pub error: String,
}

impl ApiError {
    /// Bad input; nothing was changed.
    pub fn invalid(error: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Invalid,
            error: escaped(error.into()),
        }
    }
    /// No workload (or other named thing) by that name.
    pub fn not_found(error: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::NotFound,
            error: escaped(error.into()),
        }
    }
    /// The target exists but cannot take the request now (stopped, backing off, busy).
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unavailable,
            error: escaped(error.into()),
        }
    }
    /// A failure inside the agent.
    pub fn internal(error: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Internal,
            error: escaped(error.into()),
        }
    }
}

/// An error text with what it echoes made safe to print (see
/// [`escape_unprintable`](crate::util::escape_unprintable)).
fn escaped(error: String) -> String {
    match crate::util::escape_unprintable(&error) {
        std::borrow::Cow::Borrowed(_) => error,
        std::borrow::Cow::Owned(escaped) => escaped,
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for ApiError {}

/// Body of `POST /v1/import`: a bundle on the node's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// Absolute path of the bundle (directory or `.tar`).
    pub path: String,
}

/// Answer of `POST /v1/import`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportReport {
    /// The node.
    pub node: String,
    /// The hub version of the desired state applied.
    pub version: u64,
    /// Id of the key that signed it.
    pub signer: String,
    /// Artifacts added to the store from the bundle.
    pub artifacts: Vec<String>,
    /// What the deployment did.
    pub deployment: DeployReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_keep_their_wire_names_and_an_unknown_one_reads_as_internal() {
        for (code, name) in [
            (ErrorCode::Invalid, "invalid"),
            (ErrorCode::NotFound, "not-found"),
            (ErrorCode::Unavailable, "unavailable"),
            (ErrorCode::Internal, "internal"),
        ] {
            let body = serde_json::to_string(&ApiError {
                code,
                error: "x".into(),
            })
            .unwrap();
            assert_eq!(body, format!(r#"{{"code":"{name}","error":"x"}}"#));
            let back: ApiError = serde_json::from_str(&body).unwrap();
            assert_eq!((back.code, back.code.as_str()), (code, name));
        }
        // A newer agent's code is still an error the client can show.
        let newer: ApiError = serde_json::from_str(r#"{"code":"throttled","error":"y"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Internal);
    }

    #[test]
    fn ps_rows_keep_each_states_wire_name_and_a_newer_agents_state_reads_as_unknown() {
        for (state, name) in [
            (WorkloadState::Pending, "pending"),
            (WorkloadState::Starting, "starting"),
            (WorkloadState::Running, "running"),
            (WorkloadState::Backoff, "backoff"),
            (WorkloadState::Completed, "completed"),
            (WorkloadState::Failed, "failed"),
            (WorkloadState::Stopped, "stopped"),
        ] {
            let row = WorkloadStatus {
                name: "door".into(),
                state,
                ..WorkloadStatus::default()
            };
            let json = serde_json::to_value(&row).unwrap();
            assert_eq!(json["state"], name);
            let back: WorkloadStatus = serde_json::from_value(json).unwrap();
            assert_eq!(back.state, state);
        }
        let mut newer = serde_json::to_value(WorkloadStatus::default()).unwrap();
        newer["state"] = "hibernating".into();
        let read: WorkloadStatus = serde_json::from_value(newer).unwrap();
        assert_eq!(
            (read.state, read.state.as_str()),
            (WorkloadState::Unknown, "unknown")
        );
    }
}
