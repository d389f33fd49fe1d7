//! The writer thread: the only connection that writes, with group commit.
//!
//! The thread blocks for one request, drains whatever else is queued (up to [`MAX_BATCH`]), runs
//! each request under its own SAVEPOINT inside one transaction, COMMITs once (one fsync for the
//! whole batch) and only then answers every request. A request that fails rolls back its own
//! savepoint and gets its own error; the others in the batch still commit.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::batch::{BatchRows, KvPut};
use super::{
    EventCommit, GuestLogLine, NewDeployment, OutboxRecord, SqlContext, StatusUpdate, StoreError,
    StoreShared, now_ms, to_i64,
};

/// The most requests one transaction carries.
const MAX_BATCH: usize = 512;

/// One write operation.
#[derive(Debug)]
pub(crate) enum Op {
    Deploy(NewDeployment),
    Commit(EventCommit),
    Status(StatusUpdate),
    LogEvent {
        workload: Option<String>,
        kind: String,
        detail: String,
    },
    AppendLogs(Vec<GuestLogLine>),
    /// A record for the hub that no guest event made (reported state, an event).
    OutboxPush(OutboxRecord),
    /// Rows the broker acknowledged, or the quota dropped.
    OutboxDelete(Vec<i64>),
    /// A hub command handled: its id into the inbox and its result into the outbox, together.
    CommandDone {
        inbox_id: String,
        result: OutboxRecord,
    },
    /// A fact about the hub link.
    HubState {
        key: String,
        value: String,
    },
    /// One workload of a source other than the operator, added or replaced.
    SourceUpsert(super::sources::SourceWorkload),
    /// One workload of a source other than the operator, removed with its state.
    SourceRemove {
        source: String,
        name: String,
    },
    /// A report queued for KubeEdge's EdgeCore.
    #[cfg(feature = "kubeedge")]
    DmiPush(super::dmi::DmiPush),
    /// Reports EdgeCore took.
    #[cfg(feature = "kubeedge")]
    DmiAck(Vec<u64>),
}

/// Inbound command ids kept in the inbox table; older ones are forgotten (the hub resends only
/// recent messages).
pub(crate) const INBOX_KEEP: i64 = 10_000;

/// What a successful write produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// The version of the new deployment.
    Version(u64),
    /// The id of a new event-log row.
    EventId(i64),
    /// The id of a new outbox row.
    RowId(i64),
    /// How many rows a statement touched.
    Count(u64),
    /// Nothing beyond success.
    Done,
}

/// A write with the channel its result goes back on.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Output, StoreError>>,
}

/// Runs the writer loop until every sender is gone.
pub(crate) fn run(
    mut conn: Connection,
    mut requests: mpsc::Receiver<Request>,
    shared: Arc<StoreShared>,
) {
    // `configure` opened the connection with synchronous=FULL.
    let mut synced = true;
    while let Some(first) = requests.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|request| request.op.needs_fsync());
        if durable != synced {
            let level = if durable { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", level) {
                Ok(()) => synced = durable,
                // Without FULL nothing durable may commit; NORMAL failing only costs an fsync.
                Err(e) if durable => {
                    let e = Arc::new(e);
                    tracing::warn!(error = %e, "cannot set synchronous=FULL for a write");
                    for request in batch {
                        shared.stats_requests.fetch_add(1, Ordering::Relaxed);
                        let _ = request.reply.send(Err(StoreError::Begin(Arc::clone(&e))));
                    }
                    continue;
                }
                Err(_) => {}
            }
        }
        if !synced {
            shared
                .stats_unsynced_batches
                .fetch_add(1, Ordering::Relaxed);
        }
        if batch.len() > 1 {
            batch = run_fast_round(&mut conn, batch, &shared);
        }
        while !batch.is_empty() {
            batch = run_round(&mut conn, batch, &shared);
        }
    }
    tracing::debug!(path = %shared.path.display(), "state store writer stopped");
}

impl Op {
    /// Whether the transaction that carries this write must be fsynced before it is answered.
    ///
    /// Every write someone relies on once it is acknowledged must: deployments, event commits
    /// (key-value state, telemetry, handled commands), the outbox, sources, logs, hub state.
    /// A status row (a workload's runtime state and restart/trap counts, with the event-log
    /// row it carries) need not: nothing acknowledges it to anyone, restore starts every
    /// stored workload whatever its stored state, and the next synced commit makes it durable
    /// with everything before it (the WAL is one file, written in order). A power cut can
    /// lose the last few status changes, never anything else; a crash of the agent alone
    /// loses nothing (the WAL is written before the answer).
    fn needs_fsync(&self) -> bool {
        !matches!(self, Op::Status(_))
    }
}

/// The common case: every request of the batch succeeds. Runs them all in one transaction
/// without a savepoint each (a savepoint costs two statements per request); if any fails, rolls
/// the whole transaction back and returns the batch for [`run_round`], which isolates failures
/// with savepoints. Returns nothing when the batch was committed and answered.
fn run_fast_round(
    conn: &mut Connection,
    batch: Vec<Request>,
    shared: &StoreShared,
) -> Vec<Request> {
    let Ok(tx) = conn.transaction_with_behavior(TransactionBehavior::Immediate) else {
        return batch;
    };
    let mut outputs = Vec::with_capacity(batch.len());
    // The rows of plain event commits go in a few multi-row statements; anything else
    // writes what is queued first, so outbox ids and writes keep the order of the batch.
    let mut rows = BatchRows::default();
    for request in &batch {
        let result = match &request.op {
            Op::Commit(c) if c.command.is_none() => commit_event(&tx, c, Some(&mut rows)),
            op => rows.flush(&tx).and_then(|()| run_op(&tx, op, shared)),
        };
        match result {
            Ok(output) => outputs.push(output),
            Err(_) => {
                // Dropping `tx` rolls everything back; the slow path sorts it out.
                drop(rows);
                drop(tx);
                return batch;
            }
        }
    }
    if rows.flush(&tx).is_err() {
        drop(rows);
        drop(tx);
        return batch;
    }
    drop(rows);
    if tx.commit().is_err() {
        return batch;
    }
    shared.stats_transactions.fetch_add(1, Ordering::Relaxed);
    for (request, output) in batch.into_iter().zip(outputs) {
        shared.stats_requests.fetch_add(1, Ordering::Relaxed);
        let _ = request.reply.send(Ok(output));
    }
    Vec::new()
}

/// Runs `batch` in one transaction and answers it; returns the requests to run again.
///
/// Requests come back only when SQLite rolled the whole transaction back on its own (disk full,
/// I/O error): the request that caused it is answered with its error, the ones before it lost
/// their work through no fault of theirs and are returned to run in a fresh transaction.
fn run_round(conn: &mut Connection, batch: Vec<Request>, shared: &StoreShared) -> Vec<Request> {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let e = Arc::new(e);
            tracing::warn!(error = %e, "cannot begin a state store write transaction");
            for request in batch {
                shared.stats_requests.fetch_add(1, Ordering::Relaxed);
                let _ = request.reply.send(Err(StoreError::Begin(Arc::clone(&e))));
            }
            return Vec::new();
        }
    };
    let mut done: Vec<(Request, Result<Output, StoreError>)> = Vec::with_capacity(batch.len());
    let mut pending = batch.into_iter();
    while let Some(request) = pending.next() {
        let result = run_in_savepoint(&mut tx, &request.op, shared);
        if result.is_err() && tx.is_autocommit() {
            shared.stats_requests.fetch_add(1, Ordering::Relaxed);
            let _ = request.reply.send(result);
            let mut again: Vec<Request> = done.into_iter().map(|(r, _)| r).collect();
            again.extend(pending);
            return again;
        }
        done.push((request, result));
    }
    let committed = tx.commit().map_err(Arc::new);
    match &committed {
        Ok(()) => {
            shared.stats_transactions.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "state store write transaction failed to commit"),
    }
    for (request, result) in done {
        shared.stats_requests.fetch_add(1, Ordering::Relaxed);
        let result = match &committed {
            Ok(()) => result,
            Err(e) => Err(StoreError::Commit(Arc::clone(e))),
        };
        // The caller may have stopped waiting; the write stands either way.
        let _ = request.reply.send(result);
    }
    Vec::new()
}

/// Runs one operation under its own savepoint, rolling only it back if it fails.
fn run_in_savepoint(
    tx: &mut Transaction<'_>,
    op: &Op,
    shared: &StoreShared,
) -> Result<Output, StoreError> {
    let sp = tx
        .savepoint()
        .context(|| "opening a savepoint for a write".to_owned())?;
    let output = run_op(&sp, op, shared)?;
    // On an error above, dropping `sp` rolls the savepoint back.
    sp.commit()
        .context(|| "releasing the savepoint of a write".to_owned())?;
    Ok(output)
}

/// Runs one operation on `conn` (a transaction or a savepoint).
fn run_op(conn: &Connection, op: &Op, shared: &StoreShared) -> Result<Output, StoreError> {
    match op {
        Op::Deploy(d) => apply_deployment(conn, d),
        Op::Commit(c) => commit_event(conn, c, None),
        Op::Status(s) => record_status(conn, s),
        Op::SourceUpsert(w) => super::sources::upsert(conn, w),
        Op::SourceRemove { source, name } => super::sources::remove(conn, source, name),
        #[cfg(feature = "kubeedge")]
        Op::DmiPush(p) => super::dmi::push(conn, p),
        #[cfg(feature = "kubeedge")]
        Op::DmiAck(ids) => super::dmi::ack(conn, ids),
        Op::LogEvent {
            workload,
            kind,
            detail,
        } => log_event(conn, workload.as_deref(), kind, detail).map(Output::EventId),
        Op::AppendLogs(lines) => {
            append_logs(conn, lines, shared.options.max_log_lines_per_workload)
        }
        Op::OutboxPush(record) => outbox_push(conn, record).map(Output::RowId),
        Op::OutboxDelete(ids) => outbox_delete(conn, ids),
        Op::CommandDone { inbox_id, result } => command_done(conn, inbox_id, result),
        Op::HubState { key, value } => conn
            .prepare_cached(
                "INSERT INTO hub_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut stmt| stmt.execute(params![key, value]))
            .map(|_| Output::Done)
            .context(|| format!("recording hub state {key:?}")),
    }
}

/// Fails with [`StoreError::UnknownWorkload`] unless `workload` exists.
fn require_workload(conn: &Connection, workload: &str) -> Result<(), StoreError> {
    let found = conn
        .prepare_cached("SELECT 1 FROM workloads WHERE name = ?1")
        .and_then(|mut stmt| stmt.query_row([workload], |_| Ok(())).optional())
        .context(|| format!("looking up workload {workload:?}"))?;
    found.ok_or_else(|| StoreError::UnknownWorkload(workload.to_owned()))
}

fn apply_deployment(conn: &Connection, d: &NewDeployment) -> Result<Output, StoreError> {
    let mut listed = HashSet::with_capacity(d.workloads.len());
    for w in &d.workloads {
        if !listed.insert(w.name.as_str()) {
            return Err(StoreError::DuplicateWorkload(w.name.clone()));
        }
    }
    let now = now_ms();
    let version: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM deployments",
            [],
            |row| row.get(0),
        )
        .context(|| "choosing the next deployment version".to_owned())?;
    let ctx = || format!("applying deployment version {version}");
    let count = i64::try_from(d.workloads.len()).map_err(|_| StoreError::OutOfRange {
        field: "workload count",
        value: d.workloads.len() as u64,
    })?;
    conn.execute(
        "INSERT INTO deployments
             (version, applied_at_ms, source_name, source_text, digest, description, workload_count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            version,
            now,
            d.source_name,
            d.source_text,
            d.digest,
            d.description,
            count
        ],
    )
    .context(ctx)?;

    let mut upsert = conn
        .prepare_cached(
            "INSERT INTO workloads
                 (name, deployment_version, spec_json, module_digest, state, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5)
             ON CONFLICT (name) DO UPDATE SET
                 source = 'operator',
                 labels_json = '{}',
                 deployment_version = excluded.deployment_version,
                 spec_json = excluded.spec_json,
                 module_digest = excluded.module_digest,
                 updated_at_ms = excluded.updated_at_ms",
        )
        .context(ctx)?;
    for w in &d.workloads {
        upsert
            .execute(params![w.name, version, w.spec_json, w.module_digest, now])
            .context(|| {
                format!(
                    "applying deployment version {version}: workload {:?}",
                    w.name
                )
            })?;
    }

    // Removing a workload removes its key-value data and logs too (ON DELETE CASCADE).
    let existing: BTreeSet<String> = conn
        .prepare_cached("SELECT name FROM workloads WHERE source = 'operator'")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .context(ctx)?;
    let mut delete = conn
        .prepare_cached("DELETE FROM workloads WHERE name = ?1")
        .context(ctx)?;
    for name in existing.iter().filter(|n| !listed.contains(n.as_str())) {
        delete
            .execute([name])
            .context(|| format!("applying deployment version {version}: removing {name:?}"))?;
    }
    super::sources::prune(conn).context(ctx)?;

    let names: Vec<&str> = d.workloads.iter().map(|w| w.name.as_str()).collect();
    let detail = if names.is_empty() {
        format!("version {version}: no workloads")
    } else {
        format!("version {version}: {}", names.join(", "))
    };
    log_event(conn, None, "deployed", &detail)?;
    let version = u64::try_from(version).expect("deployment versions start at 1");
    Ok(Output::Version(version))
}

/// Commits one event's writes. With `batch` (a plain event of the fast round) its counter
/// addition, key-value puts and telemetry are queued there, and the caller writes them before
/// the transaction commits; without, they are written here.
fn commit_event<'a>(
    conn: &Connection,
    c: &'a EventCommit,
    batch: Option<&mut BatchRows<'a>>,
) -> Result<Output, StoreError> {
    let ctx = || format!("committing an event of workload {:?}", c.workload);
    let now = now_ms();
    let events = to_i64("events_handled", c.events_handled)?;
    if let Some(batch) = batch {
        // A plain event of the fast round: its rows go in the batch's multi-row statements
        // (batch.rs), except that a delete runs in order after everything queued before it.
        batch.count(&c.workload, events);
        if c.kv.iter().all(|w| w.value.is_some()) {
            for write in &c.kv {
                if let Some(value) = &write.value {
                    batch.put(KvPut {
                        workload: &c.workload,
                        bucket: &write.bucket,
                        key: &write.key,
                        value,
                        updated_at_ms: now,
                    });
                }
            }
        } else {
            batch.flush(conn)?;
            write_kv(conn, c, now)?;
        }
        for t in &c.telemetry {
            batch.push(&c.workload, t);
        }
        return Ok(Output::Done);
    }
    // The count goes to the narrow `workload_counters` table (migration 4): rewriting the wide
    // `workloads` row instead dirtied most of its pages in every group commit. The counter's
    // foreign key doubles as the existence check: an unknown workload fails it.
    let counted = conn
        .prepare_cached(
            "INSERT INTO workload_counters (name, events_handled) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET
                 events_handled = events_handled + excluded.events_handled",
        )
        .and_then(|mut stmt| stmt.execute(params![c.workload, events]));
    match counted {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            return Err(StoreError::UnknownWorkload(c.workload.clone()));
        }
        counted => counted.context(ctx)?,
    };
    if let Some(command) = &c.command {
        // First, so that a command already handled writes nothing (the error rolls the
        // request back).
        if !record_command(conn, &command.inbox_id, &command.result)? {
            return Err(StoreError::CommandHandled(command.inbox_id.clone()));
        }
    }
    write_kv(conn, c, now)?;
    if !c.telemetry.is_empty() {
        let mut insert = conn
            .prepare_cached(
                "INSERT INTO outbox (workload, stream, payload, created_at_ms, kind)
                 VALUES (?1, ?2, ?3, ?4, 'telemetry')",
            )
            .context(ctx)?;
        for t in &c.telemetry {
            let created = to_i64("created_at_ms", t.created_at_ms)?;
            insert
                .execute(params![c.workload, t.stream, t.payload, created])
                .context(ctx)?;
        }
    }
    Ok(Output::Done)
}

/// Applies an event's key-value writes in order, one statement each.
fn write_kv(conn: &Connection, c: &EventCommit, now: i64) -> Result<(), StoreError> {
    if c.kv.is_empty() {
        return Ok(());
    }
    let ctx = || format!("committing an event of workload {:?}", c.workload);
    let mut put = conn
        .prepare_cached(
            "INSERT INTO kv (workload, bucket, key, value, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (workload, bucket, key) DO UPDATE SET
                 value = excluded.value, updated_at_ms = excluded.updated_at_ms",
        )
        .context(ctx)?;
    let mut delete = conn
        .prepare_cached("DELETE FROM kv WHERE workload = ?1 AND bucket = ?2 AND key = ?3")
        .context(ctx)?;
    for write in &c.kv {
        match &write.value {
            Some(value) => put.execute(params![c.workload, write.bucket, write.key, value, now]),
            None => delete.execute(params![c.workload, write.bucket, write.key]),
        }
        .context(ctx)?;
    }
    Ok(())
}

fn record_status(conn: &Connection, s: &StatusUpdate) -> Result<Output, StoreError> {
    let restarts = to_i64("restarts", s.restarts)?;
    let traps = to_i64("traps", s.traps)?;
    let changed = conn
        .prepare_cached(
            "UPDATE workloads
             SET state = ?2, last_error = ?3, restarts = ?4, traps = ?5, updated_at_ms = ?6
             WHERE name = ?1",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                s.workload,
                s.state.as_str(),
                s.last_error,
                restarts,
                traps,
                now_ms()
            ])
        })
        .context(|| format!("recording the status of workload {:?}", s.workload))?;
    if changed == 0 {
        return Err(StoreError::UnknownWorkload(s.workload.clone()));
    }
    if let Some((kind, detail)) = &s.event {
        log_event(conn, Some(&s.workload), kind, detail)?;
    }
    Ok(Output::Done)
}

pub(super) fn log_event(
    conn: &Connection,
    workload: Option<&str>,
    kind: &str,
    detail: &str,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO event_log (at_ms, workload, kind, detail) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut stmt| stmt.insert(params![now_ms(), workload, kind, detail]))
    .context(|| format!("appending a {kind:?} event to the event log"))
}

fn append_logs(
    conn: &Connection,
    lines: &[GuestLogLine],
    max_per_workload: usize,
) -> Result<Output, StoreError> {
    // Lines of a workload that is gone are dropped: its logs went with it.
    let mut workloads = BTreeSet::new();
    for workload in lines.iter().map(|l| l.workload.as_str()) {
        if workloads.contains(workload) {
            continue;
        }
        match require_workload(conn, workload) {
            Ok(()) => {
                workloads.insert(workload);
            }
            Err(StoreError::UnknownWorkload(_)) => {
                tracing::debug!(workload, "dropping log lines of a removed workload");
            }
            Err(e) => return Err(e),
        }
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO guest_logs (workload, at_ms, level, context, message)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .context(|| "appending guest log lines".to_owned())?;
    for line in lines
        .iter()
        .filter(|l| workloads.contains(l.workload.as_str()))
    {
        let at = to_i64("at_ms", line.at_ms)?;
        insert
            .execute(params![
                line.workload,
                at,
                line.level,
                line.context,
                line.message
            ])
            .context(|| format!("appending a log line of workload {:?}", line.workload))?;
    }
    let keep = i64::try_from(max_per_workload).unwrap_or(i64::MAX);
    let mut trim = conn
        .prepare_cached(
            "DELETE FROM guest_logs WHERE workload = ?1 AND id <= (
                 SELECT id FROM guest_logs WHERE workload = ?1
                 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )
        .context(|| "trimming guest log lines".to_owned())?;
    for workload in workloads {
        trim.execute(params![workload, keep])
            .context(|| format!("trimming the log lines of workload {workload:?}"))?;
    }
    Ok(Output::Done)
}

/// Queues one record. A reported-state record replaces any older one still queued: only the
/// newest reported state matters (it is retained), and offline the queue must not fill with
/// superseded copies.
fn outbox_push(conn: &Connection, r: &OutboxRecord) -> Result<i64, StoreError> {
    let created = to_i64("created_at_ms", r.created_at_ms)?;
    if r.kind == "state" {
        conn.prepare_cached("DELETE FROM outbox WHERE kind = 'state'")
            .and_then(|mut stmt| stmt.execute([]))
            .context(|| "replacing queued reported state".to_owned())?;
    }
    conn.prepare_cached(
        "INSERT INTO outbox (workload, stream, payload, created_at_ms, kind)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| stmt.insert(params![r.workload, r.stream, r.payload, created, r.kind]))
    .context(|| format!("queueing a {} record in the outbox", r.kind))
}

fn outbox_delete(conn: &Connection, ids: &[i64]) -> Result<Output, StoreError> {
    let mut delete = conn
        .prepare_cached("DELETE FROM outbox WHERE id = ?1")
        .context(|| "deleting outbox rows".to_owned())?;
    let mut count = 0;
    for id in ids {
        count += delete
            .execute([id])
            .context(|| format!("deleting outbox row {id}"))? as u64;
    }
    Ok(Output::Count(count))
}

/// Records a handled command; `Count(0)` (and no result row) if its id was already there.
fn command_done(
    conn: &Connection,
    inbox_id: &str,
    result: &OutboxRecord,
) -> Result<Output, StoreError> {
    Ok(Output::Count(u64::from(record_command(
        conn, inbox_id, result,
    )?)))
}

/// Puts a command's id in the inbox and its result in the outbox; `false` (and nothing
/// written) if the id was there already.
fn record_command(
    conn: &Connection,
    inbox_id: &str,
    result: &OutboxRecord,
) -> Result<bool, StoreError> {
    let ctx = || format!("recording the result of hub command {inbox_id:?}");
    let inserted = conn
        .prepare_cached("INSERT OR IGNORE INTO inbox (id, received_at_ms) VALUES (?1, ?2)")
        .and_then(|mut stmt| stmt.execute(params![inbox_id, now_ms()]))
        .context(ctx)?;
    if inserted == 0 {
        return Ok(false);
    }
    outbox_push(conn, result)?;
    conn.prepare_cached("DELETE FROM inbox WHERE rowid <= (SELECT MAX(rowid) FROM inbox) - ?1")
        .and_then(|mut stmt| stmt.execute([INBOX_KEEP]))
        .context(ctx)?;
    Ok(true)
}
