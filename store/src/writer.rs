//! The writer thread: the only connection that writes, with group commit.
//!
//! The thread blocks for one request, drains whatever else is queued (up to [`MAX_BATCH`]), runs
//! each request under its own SAVEPOINT inside one transaction, COMMITs once (one fsync for the
//! whole batch) and only then answers every request. A request that fails rolls back its own
//! savepoint and gets its own error; the others in the batch still commit.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::batch::{BatchRows, KvPut};
use super::{
    EventCommit, GuestLogLine, NewDeployment, OutboxRecord, SqlContext, StatusUpdate, StoreError,
    StoreShared, now_ms, to_i64,
};

mod ops;
pub(crate) use ops::log_event;
use ops::{
    append_logs, apply_deployment, command_done, commit_event, outbox_delete, outbox_push,
    record_status,
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
        let started = Instant::now();
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
        add_ns(&shared.stats_busy_ns, started);
    }
    tracing::debug!(path = %shared.path.display(), "state store writer stopped");
}

/// Adds the time since `since` to a nanosecond counter of [`StoreShared`].
fn add_ns(counter: &std::sync::atomic::AtomicU64, since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Ordering::Relaxed);
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
    let committing = Instant::now();
    let committed = tx.commit();
    add_ns(&shared.stats_commit_ns, committing);
    if committed.is_err() {
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
    let committing = Instant::now();
    let committed = tx.commit().map_err(Arc::new);
    add_ns(&shared.stats_commit_ns, committing);
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
