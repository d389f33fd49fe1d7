//! Reads, on the store's read connection. Each is one short query (or one read transaction),
//! and WAL lets it run while the writer commits (the reader is opened on the same WAL file,
//! `query_only`). Each read that returns rows takes a limit, or reads what a bound on writes
//! keeps small (a workload's key-value data, the deployment of at most
//! `DeploymentSpec::MAX_WORKLOADS`).
//!
//! The functions on [`StateStore`] block on SQLite: threads and blocking tasks call them.
//! Async code reads through [`StateStore::reads`], whose [`Reader`] runs the same reads on
//! Tokio's blocking pool, so a slow disk never stalls an async worker.

use std::collections::BTreeMap;

use lichen_deployment::WorkloadState;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    DeploymentRecord, DeploymentSummary, EventRow, GuestLogLine, OutboxRow, OutboxRowSize,
    SqlContext, StateStore, StoreError, WorkloadRow,
};

/// A caller's row limit as SQLite's `LIMIT` operand.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Reads a column that holds a non-negative integer as `u64`.
fn get_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, value))
}

/// Reads a column that holds a non-negative integer as `usize`.
fn get_usize(row: &Row<'_>, index: usize) -> rusqlite::Result<usize> {
    let value: i64 = row.get(index)?;
    usize::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, value))
}

/// The columns [`workload_row`] reads, for a query over `workloads`.
const WORKLOAD_COLUMNS: &str = "name, deployment_version, spec_json, module_digest, state, \
     last_error, restarts, traps, workloads.events_handled + COALESCE((SELECT c.events_handled \
     FROM workload_counters c WHERE c.name = workloads.name), 0)";

/// A workload's event count, for a query over `workloads`: the row's own column (what it
/// had before migration 4) plus its `workload_counters` row, which is where commits count.
pub(super) const EVENTS_HANDLED: &str = "workloads.events_handled + COALESCE((SELECT \
     c.events_handled FROM workload_counters c WHERE c.name = workloads.name), 0)";

pub(super) fn workload_row(row: &Row<'_>) -> rusqlite::Result<WorkloadRow> {
    Ok(WorkloadRow {
        name: row.get(0)?,
        deployment_version: get_u64(row, 1)?,
        spec_json: row.get(2)?,
        module_digest: row.get(3)?,
        state: WorkloadState::from_name(&row.get::<_, String>(4)?),
        last_error: row.get(5)?,
        restarts: get_u64(row, 6)?,
        traps: get_u64(row, 7)?,
        events_handled: get_u64(row, 8)?,
    })
}

fn workloads_of(conn: &Connection, version: u64) -> rusqlite::Result<Vec<WorkloadRow>> {
    let version = i64::try_from(version).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE deployment_version = ?1 \
         AND source = 'operator' ORDER BY name"
    ))?;
    stmt.query_map([version], workload_row)?.collect()
}

impl StateStore {
    /// The applied deployment (the newest one) with its workloads, or `None` before the first.
    pub fn current_deployment(&self) -> Result<Option<DeploymentRecord>, StoreError> {
        let ctx = || "reading the current deployment".to_owned();
        let mut conn = self.reader();
        // One read transaction, so the deployment and its workloads come from one snapshot.
        let tx = conn.transaction().context(ctx)?;
        let record = tx
            .query_row(
                "SELECT version, applied_at_ms, source_name, source_text, digest, description
                 FROM deployments WHERE source = 'operator' ORDER BY version DESC LIMIT 1",
                [],
                |row| {
                    Ok(DeploymentRecord {
                        version: get_u64(row, 0)?,
                        applied_at_ms: get_u64(row, 1)?,
                        source_name: row.get(2)?,
                        source_text: row.get(3)?,
                        digest: row.get(4)?,
                        description: row.get(5)?,
                        workloads: Vec::new(),
                    })
                },
            )
            .optional()
            .context(ctx)?;
        let Some(mut record) = record else {
            return Ok(None);
        };
        record.workloads = workloads_of(&tx, record.version).context(ctx)?;
        tx.commit().context(ctx)?;
        Ok(Some(record))
    }

    /// The newest `limit` deployments, newest first.
    pub fn deployment_history(&self, limit: usize) -> Result<Vec<DeploymentSummary>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(
            "SELECT version, applied_at_ms, source_name, digest, workload_count
             FROM deployments WHERE source = 'operator' ORDER BY version DESC LIMIT ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_map([sql_limit(limit)], |row| {
                Ok(DeploymentSummary {
                    version: get_u64(row, 0)?,
                    applied_at_ms: get_u64(row, 1)?,
                    source_name: row.get(2)?,
                    digest: row.get(3)?,
                    workload_count: get_usize(row, 4)?,
                })
            })?
            .collect()
        })
        .context(|| "reading the deployment history".to_owned())
    }

    /// Every workload of the applied deployment with its status, by name.
    pub fn workloads(&self) -> Result<Vec<WorkloadRow>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads ORDER BY name"
        ))
        .and_then(|mut stmt| stmt.query_map([], workload_row)?.collect())
        .context(|| "reading the workloads".to_owned())
    }

    /// All key-value data of `workload`, keyed by `(bucket, key)`; empty for an unknown workload.
    pub fn load_kv(
        &self,
        workload: &str,
    ) -> Result<BTreeMap<(String, String), Vec<u8>>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached("SELECT bucket, key, value FROM kv WHERE workload = ?1")
            .and_then(|mut stmt| {
                stmt.query_map([workload], |row| {
                    Ok(((row.get(0)?, row.get(1)?), row.get(2)?))
                })?
                .collect()
            })
            .context(|| format!("reading the key-value data of workload {workload:?}"))
    }

    /// Up to `limit` event-log entries with an id above `after_id`, oldest first.
    pub fn events(&self, after_id: i64, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(
            "SELECT id, at_ms, workload, kind, detail FROM event_log
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![after_id, sql_limit(limit)], |row| {
                Ok(EventRow {
                    id: row.get(0)?,
                    at_ms: get_u64(row, 1)?,
                    workload: row.get(2)?,
                    kind: row.get(3)?,
                    detail: row.get(4)?,
                })
            })?
            .collect()
        })
        .context(|| "reading the event log".to_owned())
    }

    /// The newest `limit` log lines of `workload`, oldest first.
    pub fn recent_logs(
        &self,
        workload: &str,
        limit: usize,
    ) -> Result<Vec<GuestLogLine>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(
            "SELECT workload, at_ms, level, context, message FROM (
                 SELECT id, workload, at_ms, level, context, message FROM guest_logs
                 WHERE workload = ?1 ORDER BY id DESC LIMIT ?2)
             ORDER BY id",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![workload, sql_limit(limit)], |row| {
                Ok(GuestLogLine {
                    workload: row.get(0)?,
                    at_ms: get_u64(row, 1)?,
                    level: row.get(2)?,
                    context: row.get(3)?,
                    message: row.get(4)?,
                })
            })?
            .collect()
        })
        .context(|| format!("reading the log lines of workload {workload:?}"))
    }

    /// How many telemetry messages wait in the outbox.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let conn = self.reader();
        conn.query_row("SELECT COUNT(*) FROM outbox", [], |row| get_u64(row, 0))
            .context(|| "counting the outbox".to_owned())
    }

    /// The oldest `limit` messages of the outbox, in queue order, without removing them.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(
            "SELECT id, workload, stream, payload, created_at_ms, kind FROM outbox
             ORDER BY id LIMIT ?1",
        )
        .and_then(|mut stmt| stmt.query_map([sql_limit(limit)], outbox_row)?.collect())
        .context(|| "reading the outbox".to_owned())
    }

    /// Up to `limit` outbox rows with an id above `after`, in id order.
    pub fn outbox_after(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(
            "SELECT id, workload, stream, payload, created_at_ms, kind FROM outbox
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![after, sql_limit(limit)], outbox_row)?
                .collect()
        })
        .context(|| format!("reading the outbox after row {after}"))
    }

    /// Bytes the outbox takes by the quota's measure: payloads plus
    /// [`OUTBOX_ROW_OVERHEAD`] per row.
    pub fn outbox_bytes(&self) -> Result<u64, StoreError> {
        let conn = self.reader();
        conn.query_row(
            "SELECT COALESCE(SUM(length(payload)), 0) + ?1 * COUNT(*) FROM outbox",
            [OUTBOX_ROW_OVERHEAD_SQL],
            |row| get_u64(row, 0),
        )
        .context(|| "measuring the outbox".to_owned())
    }

    /// The oldest telemetry rows, oldest first, until they add up to at least `bytes`.
    pub fn oldest_telemetry(&self, bytes: u64) -> Result<Vec<OutboxRowSize>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, workload, length(payload) + ?1 FROM outbox
                 WHERE kind = 'telemetry' ORDER BY id",
            )
            .context(|| "reading outbox sizes".to_owned())?;
        let mut rows = stmt
            .query([OUTBOX_ROW_OVERHEAD_SQL])
            .context(|| "reading outbox sizes".to_owned())?;
        let mut out = Vec::new();
        let mut total = 0;
        while total < bytes
            && let Some(row) = rows.next().context(|| "reading outbox sizes".to_owned())?
        {
            let size = OutboxRowSize {
                id: row.get(0).context(|| "reading outbox sizes".to_owned())?,
                workload: row.get(1).context(|| "reading outbox sizes".to_owned())?,
                kind: "telemetry".to_owned(),
                bytes: get_u64(row, 2).context(|| "reading outbox sizes".to_owned())?,
            };
            total += size.bytes;
            out.push(size);
        }
        Ok(out)
    }

    /// Whether an inbound command id is in the inbox (handled before, maybe before a restart).
    pub fn inbox_contains(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.reader();
        conn.prepare_cached("SELECT 1 FROM inbox WHERE id = ?1")
            .and_then(|mut stmt| stmt.query_row([id], |_| Ok(())).optional())
            .map(|found| found.is_some())
            .context(|| format!("looking up hub command {id:?} in the inbox"))
    }

    /// A fact about the hub link recorded with [`StateStore::set_hub_state`].
    pub fn hub_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached("SELECT value FROM hub_state WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |row| row.get(0)).optional())
            .context(|| format!("reading hub state {key:?}"))
    }
}

/// Bytes counted per outbox row on top of its payload (ids, names, index entries), so that many
/// tiny records still fill the quota.
pub const OUTBOX_ROW_OVERHEAD: u64 = 64;
/// [`OUTBOX_ROW_OVERHEAD`] as the SQLite integer the queries bind.
const OUTBOX_ROW_OVERHEAD_SQL: i64 = 64;
const _: () = assert!(OUTBOX_ROW_OVERHEAD_SQL.unsigned_abs() == OUTBOX_ROW_OVERHEAD);

fn outbox_row(row: &Row<'_>) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        id: row.get(0)?,
        workload: row.get(1)?,
        stream: row.get(2)?,
        payload: row.get(3)?,
        created_at_ms: get_u64(row, 4)?,
        kind: row.get(5)?,
    })
}

/// The store's reads for async callers: each runs on Tokio's blocking pool (one read
/// connection, so reads queue on it, beside the writer thanks to WAL) and returns what the
/// blocking read returns, within the same limits. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reader {
    store: StateStore,
}

impl StateStore {
    /// The async face of this store's reads.
    pub fn reads(&self) -> Reader {
        Reader {
            store: self.clone(),
        }
    }
}

impl Reader {
    /// Runs `read` on a blocking thread.
    pub async fn run<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&StateStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|e| StoreError::ReadTask(e.to_string()))?
    }

    /// [`StateStore::current_deployment`].
    pub async fn current_deployment(&self) -> Result<Option<DeploymentRecord>, StoreError> {
        self.run(StateStore::current_deployment).await
    }

    /// [`StateStore::all_workloads`].
    pub async fn all_workloads(&self) -> Result<Vec<(WorkloadRow, String, String)>, StoreError> {
        self.run(StateStore::all_workloads).await
    }

    /// [`StateStore::load_kv`].
    pub async fn load_kv(
        &self,
        workload: &str,
    ) -> Result<BTreeMap<(String, String), Vec<u8>>, StoreError> {
        let workload = workload.to_owned();
        self.run(move |store| store.load_kv(&workload)).await
    }

    /// [`StateStore::events`]: at most `limit` rows.
    pub async fn events(&self, after_id: i64, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.run(move |store| store.events(after_id, limit)).await
    }

    /// [`StateStore::recent_logs`]: at most `limit` lines.
    pub async fn recent_logs(
        &self,
        workload: &str,
        limit: usize,
    ) -> Result<Vec<GuestLogLine>, StoreError> {
        let workload = workload.to_owned();
        self.run(move |store| store.recent_logs(&workload, limit))
            .await
    }

    /// [`StateStore::outbox_len`].
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.run(StateStore::outbox_len).await
    }

    /// [`StateStore::outbox_peek`]: at most `limit` rows.
    pub async fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.run(move |store| store.outbox_peek(limit)).await
    }

    /// [`StateStore::outbox_bytes`].
    pub async fn outbox_bytes(&self) -> Result<u64, StoreError> {
        self.run(StateStore::outbox_bytes).await
    }

    /// [`StateStore::oldest_telemetry`].
    pub async fn oldest_telemetry(&self, bytes: u64) -> Result<Vec<OutboxRowSize>, StoreError> {
        self.run(move |store| store.oldest_telemetry(bytes)).await
    }

    /// [`StateStore::inbox_contains`].
    pub async fn inbox_contains(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run(move |store| store.inbox_contains(&id)).await
    }

    /// [`StateStore::hub_state`].
    pub async fn hub_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.run(move |store| store.hub_state(&key)).await
    }
}
