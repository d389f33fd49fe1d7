//! What the sync task reads from the agent's outbox, and the trait the agent implements.
//!
//! The agent owns the outbox table (SQLite, written in the same transaction as the state change
//! that made each record). The sync task only reads rows in id order and deletes those the broker
//! acknowledged. Row ids must never be reused or go backwards (`INTEGER PRIMARY KEY
//! AUTOINCREMENT` in SQLite): they are the sequence of the node's [`MessageId`]s.
//!
//! [`MessageId`]: crate::MessageId

use thiserror::Error;

/// An outbox row id: the sequence number of the record's message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RowId(pub u64);

/// What a row is, which decides its topic and whether the quota may drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowKind {
    /// A telemetry record: `telemetry/<workload>/<stream>`, droppable under the quota.
    Telemetry,
    /// A reported-state document: `reported`, retained, never dropped.
    State,
    /// A command result: `cmd-result/<workload>`, never dropped.
    CmdResult,
    /// An event-log entry: `events`, never dropped.
    Event,
}

impl RowKind {
    /// The name the agent may store in its table.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Telemetry => "telemetry",
            RowKind::State => "state",
            RowKind::CmdResult => "cmd-result",
            RowKind::Event => "event",
        }
    }

    /// Parses [`RowKind::as_str`] back.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "telemetry" => RowKind::Telemetry,
            "state" => RowKind::State,
            "cmd-result" => RowKind::CmdResult,
            "event" => RowKind::Event,
            _ => return None,
        })
    }
}

/// One outbox record.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Its id, also the sequence of its message id.
    pub id: RowId,
    /// The workload that made it (empty for node-level state and events).
    pub workload: String,
    /// The telemetry stream (empty for other kinds).
    pub stream: String,
    /// What it is.
    pub kind: RowKind,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The content, put under `payload` in the envelope.
    pub payload: serde_json::Value,
}

/// The outbox could not be read or written.
#[derive(Debug, Error)]
#[error("outbox {op} failed: {reason}")]
pub struct OutboxError {
    /// What was being done: `read` or `delete`.
    pub op: &'static str,
    /// Why it failed, from the store.
    pub reason: String,
}

/// The agent's outbox as the sync task sees it. Calls block (SQLite); the session runs them on
/// tokio's blocking pool.
pub trait Outbox: Send + Sync + 'static {
    /// Up to `limit` rows with an id greater than `after`, in increasing id order.
    fn next_rows(&self, after: RowId, limit: usize) -> Result<Vec<Row>, OutboxError>;

    /// Deletes these rows (all acknowledged by the broker). Ids already gone are ignored.
    fn delete(&self, ids: &[RowId]) -> Result<(), OutboxError>;
}
