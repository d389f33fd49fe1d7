//! The runtime state of a workload, one enum for every runtime (Wasm, containers, microVMs,
//! pods), the local API, the stored status rows and the tools that read them.
//!
//! The wire name of each state (JSON, the `workloads.state` column, `lichen ps`, events) is the
//! kebab-case name of its variant, the same strings the agent wrote before the enum existed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a workload is in its life; written `pending`, `starting`, `running`, `backoff`,
/// `completed`, `failed` or `stopped`.
///
/// A name this agent does not know (a row or a reply written by a newer agent) reads as
/// [`WorkloadState::Unknown`] instead of failing the whole read, as an unknown API error code
/// reads as `internal`; `Unknown` is written back as `unknown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadState {
    /// Deployed and stored, not started yet (what a new status row says).
    #[default]
    Pending,
    /// Being compiled, instantiated, created or booted.
    Starting,
    /// Running (and, for a microVM, past its ready marker).
    Running,
    /// Failed and waiting for its restart.
    Backoff,
    /// Ran to the end with success (exit code 0); it is not restarted.
    Completed,
    /// Failed with no restart left, or its restart policy allows none.
    Failed,
    /// Stopped by a request (`lichen stop`, removal, shutdown).
    Stopped,
    /// A state this agent does not know.
    #[serde(other)]
    Unknown,
}

impl WorkloadState {
    /// Every state, in the order of their life (`Unknown` last).
    pub const ALL: [WorkloadState; 8] = [
        WorkloadState::Pending,
        WorkloadState::Starting,
        WorkloadState::Running,
        WorkloadState::Backoff,
        WorkloadState::Completed,
        WorkloadState::Failed,
        WorkloadState::Stopped,
        WorkloadState::Unknown,
    ];

    /// The state's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadState::Pending => "pending",
            WorkloadState::Starting => "starting",
            WorkloadState::Running => "running",
            WorkloadState::Backoff => "backoff",
            WorkloadState::Completed => "completed",
            WorkloadState::Failed => "failed",
            WorkloadState::Stopped => "stopped",
            WorkloadState::Unknown => "unknown",
        }
    }

    /// The state named `name`; a name this agent does not know is [`WorkloadState::Unknown`].
    pub fn from_name(name: &str) -> WorkloadState {
        WorkloadState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .unwrap_or(WorkloadState::Unknown)
    }

    /// Whether it runs now.
    pub fn is_running(self) -> bool {
        self == WorkloadState::Running
    }

    /// Whether the workload ended on its own and will not run again unless redeployed or
    /// restarted by hand: `completed` or `failed`.
    pub fn is_finished(self) -> bool {
        matches!(self, WorkloadState::Completed | WorkloadState::Failed)
    }

    /// Whether nothing runs and nothing will without a request: `completed`, `failed` or
    /// `stopped`.
    pub fn is_terminal(self) -> bool {
        self.is_finished() || self == WorkloadState::Stopped
    }
}

impl fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::WorkloadState;

    #[test]
    fn every_state_keeps_its_wire_name() {
        let names = [
            "pending",
            "starting",
            "running",
            "backoff",
            "completed",
            "failed",
            "stopped",
            "unknown",
        ];
        assert_eq!(WorkloadState::ALL.len(), names.len());
        for (state, name) in WorkloadState::ALL.into_iter().zip(names) {
            assert_eq!(state.as_str(), name);
            assert_eq!(state.to_string(), name);
            let json = serde_json::to_string(&state).expect("a state serializes");
            assert_eq!(json, format!("\"{name}\""));
            let back: WorkloadState = serde_json::from_str(&json).expect("a state reads back");
            assert_eq!(back, state);
            assert_eq!(WorkloadState::from_name(name), state);
        }
    }

    #[test]
    fn an_unknown_name_reads_as_unknown() {
        for name in ["paused", "", "Running", "running "] {
            assert_eq!(
                WorkloadState::from_name(name),
                WorkloadState::Unknown,
                "{name:?}"
            );
            let json = serde_json::to_string(name).expect("a string serializes");
            let read: WorkloadState = serde_json::from_str(&json).expect("an unknown state reads");
            assert_eq!(read, WorkloadState::Unknown, "{name:?}");
        }
    }

    #[test]
    fn predicates_name_the_sets_the_agent_compares() {
        use WorkloadState::*;
        let finished: Vec<_> = WorkloadState::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .collect();
        assert_eq!(finished, [Completed, Failed]);
        let terminal: Vec<_> = WorkloadState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, [Completed, Failed, Stopped]);
        assert!(Running.is_running() && !Starting.is_running());
    }
}
