//! The telemetry of a group commit's events, inserted a chunk of rows per statement.
//!
//! Each telemetry record is an `outbox` row. One INSERT per row also rewrote the outbox's
//! AUTOINCREMENT entry in `sqlite_sequence` per row; a multi-row INSERT does that once per
//! statement and pays the statement's overhead once per chunk. Rows keep the order they were
//! queued in, so outbox ids follow the order of the batch, as they did one row at a time.

use std::sync::OnceLock;

use rusqlite::Connection;

use super::{SqlContext, StoreError, TelemetryRecord, to_i64};

/// Rows per multi-row statement (4 parameters each: far below SQLite's 32766).
const CHUNK: usize = 32;

/// One row; `kind` is a constant.
const SINGLE: &str = "INSERT INTO outbox (workload, stream, payload, created_at_ms, kind)
                      VALUES (?1, ?2, ?3, ?4, 'telemetry')";

fn chunk_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let rows = vec!["(?, ?, ?, ?, 'telemetry')"; CHUNK].join(", ");
        format!("INSERT INTO outbox (workload, stream, payload, created_at_ms, kind) VALUES {rows}")
    })
}

/// Telemetry rows queued by the commits of one batch, not inserted yet.
#[derive(Default)]
pub(crate) struct TelemetryRows<'a> {
    rows: Vec<(&'a str, &'a TelemetryRecord)>,
}

impl<'a> TelemetryRows<'a> {
    /// Queues one record of `workload`.
    pub(crate) fn push(&mut self, workload: &'a str, record: &'a TelemetryRecord) {
        self.rows.push((workload, record));
    }

    /// Inserts every queued row, in order, and empties the queue.
    pub(crate) fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let ctx = || "queueing a batch's telemetry in the outbox".to_owned();
        let rows = std::mem::take(&mut self.rows);
        let mut chunks = rows.chunks_exact(CHUNK);
        if chunks.len() > 0 {
            let mut stmt = conn.prepare_cached(chunk_sql()).context(ctx)?;
            for chunk in &mut chunks {
                let mut index = 1;
                for (workload, record) in chunk {
                    let created = to_i64("created_at_ms", record.created_at_ms)?;
                    stmt.raw_bind_parameter(index, workload).context(ctx)?;
                    stmt.raw_bind_parameter(index + 1, &record.stream)
                        .context(ctx)?;
                    stmt.raw_bind_parameter(index + 2, &record.payload)
                        .context(ctx)?;
                    stmt.raw_bind_parameter(index + 3, created).context(ctx)?;
                    index += 4;
                }
                stmt.raw_execute().context(ctx)?;
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut stmt = conn.prepare_cached(SINGLE).context(ctx)?;
            for (workload, record) in rest {
                let created = to_i64("created_at_ms", record.created_at_ms)?;
                stmt.execute(rusqlite::params![
                    workload,
                    record.stream,
                    record.payload,
                    created
                ])
                .context(ctx)?;
            }
        }
        Ok(())
    }
}
