//! The outbox table as `lichen-sync` sees it: [`SqliteOutbox`] implements
//! [`lichen_sync::Outbox`]. Rows are read on the read connection and deleted through the
//! writer thread, so a delete never races a commit. Row ids are the table's `AUTOINCREMENT`
//! ids, never reused, so they serve as the sequence of the node's message ids.
//!
//! Payloads are JSON in the envelope. Telemetry payloads are whatever bytes the guest
//! published: bytes that parse as JSON go as that JSON value; anything else goes as one JSON
//! string (the bytes read as UTF-8, invalid sequences replaced by U+FFFD).

use lichen_sync::{Outbox, OutboxError, Row, RowId, RowKind};

use super::{OutboxRow, StateStore};

/// The state store's outbox, for a [`lichen_sync::SyncSession`].
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    store: StateStore,
}

impl SqliteOutbox {
    /// The outbox of `store`.
    pub fn new(store: StateStore) -> Self {
        Self { store }
    }
}

/// The JSON value a stored payload travels as (see the module docs).
pub fn payload_json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn to_row(r: OutboxRow) -> Result<Row, OutboxError> {
    let kind = RowKind::parse(&r.kind).ok_or_else(|| OutboxError {
        op: "read",
        reason: format!("outbox row {} has unknown kind {:?}", r.id, r.kind),
    })?;
    let id = u64::try_from(r.id).map_err(|_| OutboxError {
        op: "read",
        reason: format!("outbox row id {} is negative", r.id),
    })?;
    Ok(Row {
        id: RowId(id),
        workload: r.workload,
        stream: r.stream,
        kind,
        created_ms: r.created_at_ms,
        payload: payload_json(&r.payload),
    })
}

impl Outbox for SqliteOutbox {
    fn next_rows(&self, after: RowId, limit: usize) -> Result<Vec<Row>, OutboxError> {
        let after = i64::try_from(after.0).unwrap_or(i64::MAX);
        let rows = self
            .store
            .outbox_after(after, limit)
            .map_err(|e| OutboxError {
                op: "read",
                reason: format!("{e:#}"),
            })?;
        rows.into_iter().map(to_row).collect()
    }

    fn delete(&self, ids: &[RowId]) -> Result<(), OutboxError> {
        let ids = ids
            .iter()
            .filter_map(|id| i64::try_from(id.0).ok())
            .collect();
        self.store
            .delete_outbox_blocking(ids)
            .map(drop)
            .map_err(|e| OutboxError {
                op: "delete",
                reason: format!("{e:#}"),
            })
    }
}
