//! Connection settings and the versioned schema.
//!
//! The schema version lives in `PRAGMA user_version`. Each entry of [`MIGRATIONS`] moves the
//! schema one version up; the pending ones run in order inside one `IMMEDIATE` transaction that
//! also bumps the version, so each runs exactly once even if two processes open the file at once.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// How long a connection waits for another one's lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The migration steps; step `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE deployments (
        version        INTEGER PRIMARY KEY,
        applied_at_ms  INTEGER NOT NULL,
        source_name    TEXT    NOT NULL,
        source_text    TEXT    NOT NULL,
        digest         TEXT    NOT NULL,
        description    TEXT,
        workload_count INTEGER NOT NULL
    );

    CREATE TABLE workloads (
        name               TEXT    PRIMARY KEY,
        deployment_version INTEGER NOT NULL REFERENCES deployments(version),
        spec_json          TEXT    NOT NULL,
        module_digest      TEXT    NOT NULL,
        state              TEXT    NOT NULL,
        last_error         TEXT,
        restarts           INTEGER NOT NULL DEFAULT 0,
        traps              INTEGER NOT NULL DEFAULT 0,
        events_handled     INTEGER NOT NULL DEFAULT 0,
        updated_at_ms      INTEGER NOT NULL
    );

    CREATE TABLE kv (
        workload      TEXT    NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
        bucket        TEXT    NOT NULL,
        key           TEXT    NOT NULL,
        value         BLOB    NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (workload, bucket, key)
    ) WITHOUT ROWID;

    -- No foreign key: telemetry already produced is still delivered after its workload goes.
    CREATE TABLE outbox (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        workload      TEXT    NOT NULL,
        stream        TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        created_at_ms INTEGER NOT NULL
    );

    -- No foreign key: the history outlives the workloads it mentions.
    CREATE TABLE event_log (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms    INTEGER NOT NULL,
        workload TEXT,
        kind     TEXT    NOT NULL,
        detail   TEXT    NOT NULL
    );

    CREATE TABLE guest_logs (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        workload TEXT    NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
        at_ms    INTEGER NOT NULL,
        level    TEXT    NOT NULL,
        context  TEXT    NOT NULL,
        message  TEXT    NOT NULL
    );
    CREATE INDEX guest_logs_by_workload ON guest_logs (workload, id);
    ",
    // 2: hub sync. Outbox rows get a kind (telemetry, state, cmd-result, event: what
    // lichen-sync's RowKind names), so reported state and command results travel in the same
    // queue as telemetry; existing rows are telemetry. The inbox keeps the ids of inbound
    // commands already handled, so de-duplication survives a restart. hub_state keeps small
    // facts about the hub link (the applied hub deployment version).
    "
    ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'telemetry';

    CREATE TABLE inbox (
        id             TEXT    PRIMARY KEY,
        received_at_ms INTEGER NOT NULL
    );
    CREATE INDEX inbox_by_time ON inbox (received_at_ms);

    CREATE TABLE hub_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    ",
    // 3: workload sources. The node's desired state is the union of sources (`operator`:
    // deployment files, the hub, bundles; `pods`: containerd; `devices`: KubeEdge), each with
    // its own workloads; a deployment row belongs to one source (the operator's history is
    // its own rows; another source records one row per workload it upserts, pruned when no
    // workload names it). Labels (pod, container, device) are a JSON object. The DMI report
    // queue of the KubeEdge mapper (`docs/kubeedge.md`) lives here too.
    "
    ALTER TABLE deployments ADD COLUMN source TEXT NOT NULL DEFAULT 'operator';
    ALTER TABLE workloads ADD COLUMN source TEXT NOT NULL DEFAULT 'operator';
    ALTER TABLE workloads ADD COLUMN labels_json TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE dmi_reports (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        kind          TEXT    NOT NULL,
        device        TEXT    NOT NULL,
        properties    TEXT    NOT NULL,
        body          BLOB    NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE dmi_counters (
        key   TEXT    PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    ",
    // 4: event counters out of the wide `workloads` rows. Every committed event bumped its
    // workload's counter, and rewriting a row that carries the spec JSON dirtied most pages of
    // `workloads` in every group commit (WAL bytes and checksums per transaction). A narrow
    // table keeps those writes to a few pages; a workload's count is its `workloads` column
    // (what it had before this migration) plus its row here, which goes with the workload.
    "
    CREATE TABLE workload_counters (
        name           TEXT    PRIMARY KEY REFERENCES workloads(name) ON DELETE CASCADE,
        events_handled INTEGER NOT NULL
    ) WITHOUT ROWID;
    ",
];

/// The schema version this code writes and understands.
// A compile-time count of the few migrations above: far inside i64 (`try_from` is not const).
#[allow(clippy::cast_possible_wrap)]
pub(crate) const LATEST_VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies the per-connection settings: WAL, `synchronous=FULL`, foreign keys, busy timeout,
/// page cache size ([`CACHE_KIB`]).
pub(crate) fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal {
            path: path.to_path_buf(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(open_err)?;
    // Negative: KiB rather than pages.
    conn.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(open_err)?;
    Ok(())
}

/// SQLite's page cache per connection, in KiB (SQLite's default is 2000 KiB; the store has
/// two connections). The hot pages of a group commit (the name index, the counters, the
/// kv rows, the outbox's tail) fit many times over; a cold read goes to the kernel's page
/// cache, which the whole system shares.
pub(crate) const CACHE_KIB: i64 = 512;

/// Brings the schema up to [`LATEST_VERSION`], refusing a database written by newer code.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let migrate_err = |version, source| StoreError::Migrate {
        path: path.to_path_buf(),
        version,
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| migrate_err(LATEST_VERSION, e))?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| migrate_err(LATEST_VERSION, e))?;
    if found > LATEST_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: LATEST_VERSION,
        });
    }
    if found == LATEST_VERSION {
        return Ok(());
    }
    // `found` is in 0..LATEST_VERSION here, so it indexes MIGRATIONS.
    let first = usize::try_from(found).unwrap_or(0);
    for (version, sql) in (1i64..).zip(MIGRATIONS).skip(first) {
        tx.execute_batch(sql).map_err(|e| migrate_err(version, e))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(|e| migrate_err(version, e))?;
    }
    tx.commit().map_err(|e| migrate_err(LATEST_VERSION, e))?;
    tracing::info!(path = %path.display(), from = found, to = LATEST_VERSION, "migrated state database");
    Ok(())
}
