//! The report queue of the mapper's tests: the real `SqliteQueue` (a real SQLite file), moving
//! a change counter (the fake agent's) on every push and ack, for the tests to wait on with a
//! deadline.

use std::path::Path;
use std::sync::Arc;

use lichen_kubeedge::queue::{QueueError, Queued, Report, ReportQueue, SqliteQueue};
use tokio::sync::watch;

/// A `SqliteQueue` that says when it changed.
pub struct WatchedQueue {
    inner: SqliteQueue,
    changes: Arc<watch::Sender<u64>>,
}

impl WatchedQueue {
    /// Opens the queue file at `path`, bounded to `capacity` reports, moving `changes`.
    pub fn open(
        path: &Path,
        capacity: u64,
        changes: Arc<watch::Sender<u64>>,
    ) -> Result<Self, QueueError> {
        Ok(Self {
            inner: SqliteQueue::open(path, capacity)?,
            changes,
        })
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

impl ReportQueue for WatchedQueue {
    fn push(&self, report: &Report) -> Result<u64, QueueError> {
        let id = self.inner.push(report)?;
        self.changed();
        Ok(id)
    }

    fn oldest(&self, limit: usize) -> Result<Vec<Queued>, QueueError> {
        self.inner.oldest(limit)
    }

    fn ack(&self, id: u64) -> Result<(), QueueError> {
        self.inner.ack(id)?;
        self.changed();
        Ok(())
    }

    fn ack_many(&self, ids: &[u64]) -> Result<(), QueueError> {
        self.inner.ack_many(ids)?;
        self.changed();
        Ok(())
    }

    fn len(&self) -> Result<u64, QueueError> {
        self.inner.len()
    }

    fn dropped(&self) -> Result<u64, QueueError> {
        self.inner.dropped()
    }
}
