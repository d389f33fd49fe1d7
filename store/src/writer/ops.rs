//! What each write does in SQL, inside the writer's transaction or savepoint: a deployment
//! applied, an event's writes committed, a status row, log lines kept to their bound, outbox
//! rows, commands and events recorded. The thread, batching and group commit are in
//! `writer.rs`.

use super::*;

/// Fails with [`StoreError::UnknownWorkload`] unless `workload` exists.
pub(super) fn require_workload(conn: &Connection, workload: &str) -> Result<(), StoreError> {
    let found = conn
        .prepare_cached("SELECT 1 FROM workloads WHERE name = ?1")
        .and_then(|mut stmt| stmt.query_row([workload], |_| Ok(())).optional())
        .context(|| format!("looking up workload {workload:?}"))?;
    found.ok_or_else(|| StoreError::UnknownWorkload(workload.to_owned()))
}

pub(super) fn apply_deployment(conn: &Connection, d: &NewDeployment) -> Result<Output, StoreError> {
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
    crate::sources::prune(conn).context(ctx)?;

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
pub(super) fn commit_event<'a>(
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
pub(super) fn write_kv(conn: &Connection, c: &EventCommit, now: i64) -> Result<(), StoreError> {
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

pub(super) fn record_status(conn: &Connection, s: &StatusUpdate) -> Result<Output, StoreError> {
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

pub(crate) fn log_event(
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

pub(super) fn append_logs(
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
pub(super) fn outbox_push(conn: &Connection, r: &OutboxRecord) -> Result<i64, StoreError> {
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

pub(super) fn outbox_delete(conn: &Connection, ids: &[i64]) -> Result<Output, StoreError> {
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
pub(super) fn command_done(
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
pub(super) fn record_command(
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
