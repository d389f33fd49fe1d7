//! Test double for the agent's outbox.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::outbox::{Outbox, OutboxError, Row, RowId, RowKind};

/// An in-memory [`Outbox`]: a test double standing in for the agent's SQLite table. Row ids
/// start at 1 and are never reused, like `AUTOINCREMENT`. Tests wait on its row count with
/// [`FakeOutbox::wait_rows`], woken by each push and delete.
#[derive(Debug)]
pub struct FakeOutbox {
    inner: Mutex<Inner>,
    /// The row count after each change.
    rows: watch::Sender<usize>,
}

impl Default for FakeOutbox {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            rows: watch::Sender::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    rows: BTreeMap<RowId, Row>,
    last_id: u64,
    deleted: u64,
}

impl FakeOutbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock has failed already; its data is still fine.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a row stamped with the current time; returns its id.
    pub fn push(
        &self,
        kind: RowKind,
        workload: &str,
        stream: &str,
        payload: serde_json::Value,
    ) -> RowId {
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut inner = self.lock();
        inner.last_id += 1;
        let id = RowId(inner.last_id);
        inner.rows.insert(
            id,
            Row {
                id,
                workload: workload.to_owned(),
                stream: stream.to_owned(),
                kind,
                created_ms,
                payload,
            },
        );
        self.rows.send_replace(inner.rows.len());
        id
    }

    /// Waits until the row count satisfies `done`, woken by each change, for at most `within`.
    /// Returns the count that satisfied it, or the count at the deadline.
    pub async fn wait_rows(
        &self,
        within: Duration,
        mut done: impl FnMut(usize) -> bool,
    ) -> Result<usize, usize> {
        let mut counts = self.rows.subscribe();
        match tokio::time::timeout(within, counts.wait_for(|n| done(*n))).await {
            Ok(Ok(n)) => Ok(*n),
            _ => Err(self.len()),
        }
    }

    /// Rows still in the outbox.
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// Whether the outbox is empty.
    pub fn is_empty(&self) -> bool {
        self.lock().rows.is_empty()
    }

    /// Rows deleted so far.
    pub fn deleted(&self) -> u64 {
        self.lock().deleted
    }
}

impl Outbox for FakeOutbox {
    fn next_rows(&self, after: RowId, limit: usize) -> Result<Vec<Row>, OutboxError> {
        let inner = self.lock();
        Ok(inner
            .rows
            .range(RowId(after.0 + 1)..)
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn delete(&self, ids: &[RowId]) -> Result<(), OutboxError> {
        let mut inner = self.lock();
        for id in ids {
            if inner.rows.remove(id).is_some() {
                inner.deleted += 1;
            }
        }
        self.rows.send_replace(inner.rows.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_after_a_cursor_and_deletes() {
        let o = FakeOutbox::new();
        for i in 0..5 {
            o.push(RowKind::Telemetry, "w", "s", json!(i));
        }
        let ids: Vec<_> = o
            .next_rows(RowId(2), 2)
            .unwrap()
            .iter()
            .map(|r| r.id.0)
            .collect();
        assert_eq!(ids, [3, 4]);
        o.delete(&[RowId(1), RowId(1), RowId(9)]).unwrap();
        assert_eq!((o.len(), o.deleted()), (4, 1));
        assert_eq!(
            o.push(RowKind::State, "", "", json!({})),
            RowId(6),
            "ids are never reused"
        );
    }
}
