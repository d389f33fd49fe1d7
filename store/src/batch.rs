//! The rows of a group commit's plain events, written a chunk of rows per statement.
//!
//! A plain event commit (no hub command) adds to its workload's counter, puts its key-value
//! writes and queues its telemetry. One statement per row made the writer thread spend most of
//! a batch preparing, binding and stepping single-row statements (three per event); a
//! multi-row statement pays that once per chunk. Each telemetry record is an `outbox` row, and
//! a multi-row INSERT also rewrites the outbox's AUTOINCREMENT entry in `sqlite_sequence` once
//! per statement instead of once per row.
//!
//! Rows keep the order they were queued in: outbox ids follow the order of the batch, and two
//! puts of one key (or two counter additions of one workload) apply in order, as they did one
//! row at a time. The writer flushes everything queued before it runs any other operation,
//! so no other write of the batch can see the tables without them. A failure (an unknown
//! workload fails the counter's foreign key) fails the whole fast round, and the writer then
//! runs each request on its own under a savepoint.

use std::sync::OnceLock;

use rusqlite::{Connection, Statement};

use super::{SqlContext, StoreError, TelemetryRecord, to_i64};

/// Rows per multi-row statement (at most 5 parameters each: far below SQLite's 32766).
const CHUNK: usize = 32;

/// One table's multi-row INSERT: its single-row form and the columns a row binds.
struct Insert {
    /// `INSERT INTO table (columns) VALUES`, without the rows.
    head: &'static str,
    /// One row's placeholders, e.g. `(?, ?, 'telemetry')`.
    row: &'static str,
    /// What follows the rows (an upsert clause), or nothing.
    tail: &'static str,
}

impl Insert {
    fn sql(&self, rows: usize) -> String {
        format!(
            "{} {} {}",
            self.head,
            vec![self.row; rows].join(", "),
            self.tail
        )
    }
}

const TELEMETRY: Insert = Insert {
    head: "INSERT INTO outbox (workload, stream, payload, created_at_ms, kind) VALUES",
    row: "(?, ?, ?, ?, 'telemetry')",
    tail: "",
};

/// The count goes to the narrow `workload_counters` table (migration 4): rewriting the wide
/// `workloads` row instead dirtied most of its pages in every group commit. The counter's
/// foreign key doubles as the existence check: an unknown workload fails it.
const COUNTERS: Insert = Insert {
    head: "INSERT INTO workload_counters (name, events_handled) VALUES",
    row: "(?, ?)",
    tail: "ON CONFLICT (name) DO UPDATE SET
               events_handled = events_handled + excluded.events_handled",
};

const KV_PUTS: Insert = Insert {
    head: "INSERT INTO kv (workload, bucket, key, value, updated_at_ms) VALUES",
    row: "(?, ?, ?, ?, ?)",
    tail: "ON CONFLICT (workload, bucket, key) DO UPDATE SET
               value = excluded.value, updated_at_ms = excluded.updated_at_ms",
};

/// The SQL of `insert` for one row and for [`CHUNK`] rows, built once.
fn sql(insert: &Insert, cell: &'static OnceLock<(String, String)>) -> &'static (String, String) {
    cell.get_or_init(|| (insert.sql(1), insert.sql(CHUNK)))
}

/// Binds one row's values from parameter `index` on; returns the next free index.
type Bind<R> = fn(&mut Statement<'_>, usize, &R) -> Result<usize, StoreError>;

/// Inserts `rows` in order, [`CHUNK`] per statement, then the rest one by one.
fn insert_rows<R>(
    conn: &Connection,
    sql: &(String, String),
    rows: &[R],
    bind: Bind<R>,
    what: &'static str,
) -> Result<(), StoreError> {
    let ctx = || format!("writing a batch's {what}");
    let mut chunks = rows.chunks_exact(CHUNK);
    if chunks.len() > 0 {
        let mut stmt = conn.prepare_cached(&sql.1).context(ctx)?;
        for chunk in &mut chunks {
            let mut index = 1;
            for row in chunk {
                index = bind(&mut stmt, index, row)?;
            }
            stmt.raw_execute().context(ctx)?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut stmt = conn.prepare_cached(&sql.0).context(ctx)?;
        for row in rest {
            bind(&mut stmt, 1, row)?;
            stmt.raw_execute().context(ctx)?;
        }
    }
    Ok(())
}

fn bind_value<T: rusqlite::ToSql + ?Sized>(
    stmt: &mut Statement<'_>,
    index: usize,
    value: &T,
    what: &'static str,
) -> Result<(), StoreError> {
    stmt.raw_bind_parameter(index, value)
        .context(|| format!("binding a batch's {what}"))
}

/// One key-value put of a plain event commit.
pub(crate) struct KvPut<'a> {
    pub(crate) workload: &'a str,
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    pub(crate) value: &'a [u8],
    pub(crate) updated_at_ms: i64,
}

/// The rows queued by the plain event commits of one batch, not written yet.
#[derive(Default)]
pub(crate) struct BatchRows<'a> {
    counters: Vec<(&'a str, i64)>,
    kv: Vec<KvPut<'a>>,
    telemetry: Vec<(&'a str, &'a TelemetryRecord)>,
}

impl<'a> BatchRows<'a> {
    /// Queues `events` more handled events of `workload`.
    pub(crate) fn count(&mut self, workload: &'a str, events: i64) {
        self.counters.push((workload, events));
    }

    /// Queues one key-value put.
    pub(crate) fn put(&mut self, put: KvPut<'a>) {
        self.kv.push(put);
    }

    /// Queues one telemetry record of `workload`.
    pub(crate) fn push(&mut self, workload: &'a str, record: &'a TelemetryRecord) {
        self.telemetry.push((workload, record));
    }

    /// Writes every queued row, in order within each table, and empties the queues.
    pub(crate) fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        static COUNTER_SQL: OnceLock<(String, String)> = OnceLock::new();
        static KV_SQL: OnceLock<(String, String)> = OnceLock::new();
        static TELEMETRY_SQL: OnceLock<(String, String)> = OnceLock::new();
        let counters = std::mem::take(&mut self.counters);
        insert_rows(
            conn,
            sql(&COUNTERS, &COUNTER_SQL),
            &counters,
            |stmt, i, (workload, events)| {
                bind_value(stmt, i, *workload, "event counters")?;
                bind_value(stmt, i + 1, events, "event counters")?;
                Ok(i + 2)
            },
            "event counters",
        )?;
        let kv = std::mem::take(&mut self.kv);
        insert_rows(
            conn,
            sql(&KV_PUTS, &KV_SQL),
            &kv,
            |stmt, i, put| {
                bind_value(stmt, i, put.workload, "key-value writes")?;
                bind_value(stmt, i + 1, put.bucket, "key-value writes")?;
                bind_value(stmt, i + 2, put.key, "key-value writes")?;
                bind_value(stmt, i + 3, put.value, "key-value writes")?;
                bind_value(stmt, i + 4, &put.updated_at_ms, "key-value writes")?;
                Ok(i + 5)
            },
            "key-value writes",
        )?;
        let telemetry = std::mem::take(&mut self.telemetry);
        insert_rows(
            conn,
            sql(&TELEMETRY, &TELEMETRY_SQL),
            &telemetry,
            |stmt, i, (workload, record)| {
                let created = to_i64("created_at_ms", record.created_at_ms)?;
                bind_value(stmt, i, *workload, "telemetry")?;
                bind_value(stmt, i + 1, &record.stream, "telemetry")?;
                bind_value(stmt, i + 2, &record.payload, "telemetry")?;
                bind_value(stmt, i + 3, &created, "telemetry")?;
                Ok(i + 4)
            },
            "telemetry",
        )
    }
}
