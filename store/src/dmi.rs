//! The KubeEdge mapper's durable report queue (`lichen_kubeedge::queue::ReportQueue`) in the
//! state store: table `dmi_reports` (schema in `docs/kubeedge.md`, migration 3), drops counted
//! in `dmi_counters`. Pushes and acknowledgements go through the store's writer thread, so
//! they share its group commit (one fsync per batch) and are durable when they return; reads
//! use the read connection.

use lichen_kubeedge::queue::{
    DROP_WINDOW, QueueError, Queued, Report, ReportQueue, RowInfo, choose_drop,
};
use rusqlite::{Connection, OptionalExtension, params};

use super::writer::{Op, Output};
use super::{SqlContext, StateStore, StoreError, now_ms};

/// A report to queue, encoded, with the bound of the queue.
#[derive(Debug, Clone)]
pub(crate) struct DmiPush {
    kind: &'static str,
    device: String,
    properties: String,
    body: Vec<u8>,
    max: u64,
}

/// The report queue on the agent's state store, bounded to `max_reports`.
#[derive(Debug, Clone)]
pub struct DmiQueue {
    store: StateStore,
    max: u64,
}

impl DmiQueue {
    /// The queue in `store`, holding at most `max_reports` (at least 1).
    pub fn new(store: StateStore, max_reports: u64) -> Self {
        Self {
            store,
            max: max_reports.max(1),
        }
    }
}

fn queue_error(e: StoreError) -> QueueError {
    QueueError(e.to_string())
}

/// In the writer: drops one report first if the queue is full, then appends.
pub(crate) fn push(conn: &Connection, p: &DmiPush) -> Result<Output, StoreError> {
    let ctx = || "queueing a report for EdgeCore".to_owned();
    let len: i64 = conn
        .query_row("SELECT COUNT(*) FROM dmi_reports", [], |r| r.get(0))
        .context(ctx)?;
    if u64::try_from(len).unwrap_or(0) >= p.max {
        let rows: Vec<RowInfo> = conn
            .prepare_cached(
                "SELECT id, device, kind, properties FROM dmi_reports ORDER BY id LIMIT ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_map([i64::try_from(DROP_WINDOW).unwrap_or(i64::MAX)], |r| {
                    let properties: String = r.get(3)?;
                    Ok(RowInfo {
                        id: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        device: r.get(1)?,
                        kind: r.get(2)?,
                        properties: properties
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    })
                })?
                .collect()
            })
            .context(ctx)?;
        if let Some(id) = choose_drop(&rows) {
            conn.execute(
                "DELETE FROM dmi_reports WHERE id = ?1",
                [i64::try_from(id).unwrap_or(i64::MAX)],
            )
            .context(ctx)?;
            conn.execute(
                "INSERT INTO dmi_counters (key, value) VALUES ('dropped', 1)
                 ON CONFLICT (key) DO UPDATE SET value = value + 1",
                [],
            )
            .context(ctx)?;
        }
    }
    conn.execute(
        "INSERT INTO dmi_reports (kind, device, properties, body, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![p.kind, p.device, p.properties, p.body, now_ms()],
    )
    .context(ctx)?;
    Ok(Output::RowId(conn.last_insert_rowid()))
}

/// In the writer: removes acknowledged reports.
pub(crate) fn ack(conn: &Connection, ids: &[u64]) -> Result<Output, StoreError> {
    let mut stmt = conn
        .prepare_cached("DELETE FROM dmi_reports WHERE id = ?1")
        .context(|| "acknowledging reports".to_owned())?;
    let mut removed = 0u64;
    for id in ids {
        removed += stmt
            .execute([i64::try_from(*id).unwrap_or(i64::MAX)])
            .context(|| "acknowledging reports".to_owned())? as u64;
    }
    Ok(Output::Count(removed))
}

impl ReportQueue for DmiQueue {
    fn push(&self, report: &Report) -> Result<u64, QueueError> {
        let op = Op::DmiPush(DmiPush {
            kind: report.kind(),
            device: report.device(),
            properties: report.properties().join(","),
            body: report.encode(),
            max: self.max,
        });
        match self.store.submit_blocking(op).map_err(queue_error)? {
            Output::RowId(id) => Ok(u64::try_from(id).unwrap_or(0)),
            other => Err(QueueError(format!(
                "unexpected answer to a push: {other:?}"
            ))),
        }
    }

    fn oldest(&self, limit: usize) -> Result<Vec<Queued>, QueueError> {
        let rows: Vec<(i64, String, Vec<u8>)> = {
            let conn = self.store.reader();
            conn.prepare_cached("SELECT id, kind, body FROM dmi_reports ORDER BY id LIMIT ?1")
                .and_then(|mut stmt| {
                    stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect()
                })
                .map_err(|e| QueueError(format!("reading reports: {e}")))?
        };
        rows.into_iter()
            .map(|(id, kind, body)| {
                Ok(Queued {
                    id: u64::try_from(id).unwrap_or(0),
                    report: Report::decode(&kind, &body)?,
                })
            })
            .collect()
    }

    fn ack(&self, id: u64) -> Result<(), QueueError> {
        self.ack_many(&[id])
    }

    fn ack_many(&self, ids: &[u64]) -> Result<(), QueueError> {
        self.store
            .submit_blocking(Op::DmiAck(ids.to_vec()))
            .map(drop)
            .map_err(queue_error)
    }

    fn len(&self) -> Result<u64, QueueError> {
        self.store
            .reader()
            .query_row("SELECT COUNT(*) FROM dmi_reports", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| QueueError(format!("counting reports: {e}")))
    }

    fn dropped(&self) -> Result<u64, QueueError> {
        self.store
            .reader()
            .query_row(
                "SELECT value FROM dmi_counters WHERE key = 'dropped'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|n| n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
            .map_err(|e| QueueError(format!("reading the drop count: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use lichen_kubeedge::proto::v1beta1 as pb;
    use lichen_kubeedge::queue::{Report, ReportQueue};

    use super::DmiQueue;
    use crate::{StateStore, StoreOptions};

    fn state(device: &str, state: &str) -> Report {
        Report::State(pb::ReportDeviceStatesRequest {
            device_name: device.into(),
            device_namespace: "default".into(),
            state: state.into(),
        })
    }

    #[test]
    fn the_report_queue_in_the_state_store_is_ordered_bounded_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lichen.db");
        let (a, b) = {
            let q = DmiQueue::new(StateStore::open(&path, StoreOptions::default()).unwrap(), 2);
            let a = q.push(&state("a", "online")).unwrap();
            let b = q.push(&state("a", "offline")).unwrap();
            assert!(a < b);
            (a, b)
        };
        let q = DmiQueue::new(StateStore::open(&path, StoreOptions::default()).unwrap(), 2);
        let kept: Vec<u64> = q.oldest(10).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(kept, vec![a, b], "survives reopening, in order");
        // Full: pushing a third drops the oldest (no twin report to drop first), counted.
        let c = q.push(&state("a", "unknown")).unwrap();
        assert_eq!(q.len().unwrap(), 2);
        assert_eq!(q.dropped().unwrap(), 1);
        assert_eq!(q.oldest(10).unwrap()[1].report, state("a", "unknown"));
        q.ack_many(&[b, c]).unwrap();
        assert!(q.is_empty().unwrap());
        // Ids are never reused.
        assert!(q.push(&state("a", "online")).unwrap() > c);
    }
}
