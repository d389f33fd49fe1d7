//! Workloads of the sources other than the operator (`pods`, `devices`): one row each in
//! `workloads` with its source and labels, added, replaced and removed one at a time.
//!
//! The operator's workloads come and go with whole deployments ([`StateStore::apply_deployment`]
//! only touches rows of source `operator`); a workload of another source is upserted with a
//! `deployments` row of its own source (its version), and that row is pruned once no workload
//! names it, so the table stays bounded by the workloads that exist.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::writer::{Op, Output, log_event};
use super::{SqlContext, StateStore, StoreError, WorkloadRow, now_ms};

/// A workload of a source other than `operator`, to add or replace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceWorkload {
    /// The source: `pods` or `devices`.
    pub source: String,
    /// The workload name, unique across every source.
    pub name: String,
    /// The workload specification as JSON.
    pub spec_json: String,
    /// Digest of the module or image the workload runs.
    pub module_digest: String,
    /// Its labels as a JSON object.
    pub labels_json: String,
}

/// Adds or replaces a workload of `w.source` and returns its version. A name that another
/// source owns is refused (the supervisor checks first; this keeps the table honest).
pub(crate) fn upsert(conn: &Connection, w: &SourceWorkload) -> Result<Output, StoreError> {
    let ctx = || format!("recording workload {:?} of source {}", w.name, w.source);
    let owner: Option<String> = conn
        .query_row(
            "SELECT source FROM workloads WHERE name = ?1",
            [&w.name],
            |row| row.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .context(ctx)?;
    if let Some(owner) = owner.filter(|owner| *owner != w.source) {
        return Err(StoreError::OtherSource {
            name: w.name.clone(),
            owner,
        });
    }
    let now = now_ms();
    let version: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM deployments",
            [],
            |row| row.get(0),
        )
        .context(ctx)?;
    conn.execute(
        "INSERT INTO deployments
             (version, applied_at_ms, source_name, source_text, digest, description,
              workload_count, source)
         VALUES (?1, ?2, ?3, ?4, ?5, NULL, 1, ?6)",
        params![
            version,
            now,
            format!("{}:{}", w.source, w.name),
            w.spec_json,
            w.module_digest,
            w.source
        ],
    )
    .context(ctx)?;
    conn.execute(
        "INSERT INTO workloads
             (name, deployment_version, spec_json, module_digest, state, updated_at_ms, source,
              labels_json)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7)
         ON CONFLICT (name) DO UPDATE SET
             deployment_version = excluded.deployment_version,
             spec_json = excluded.spec_json,
             module_digest = excluded.module_digest,
             labels_json = excluded.labels_json,
             updated_at_ms = excluded.updated_at_ms",
        params![
            w.name,
            version,
            w.spec_json,
            w.module_digest,
            now,
            w.source,
            w.labels_json
        ],
    )
    .context(ctx)?;
    prune(conn).context(ctx)?;
    log_event(
        conn,
        Some(&w.name),
        "deployed",
        &format!("version {version}: source {}", w.source),
    )?;
    Ok(Output::Version(u64::try_from(version).unwrap_or(0)))
}

/// Removes a workload of `source` with its key-value data and logs; `Count(0)` if it has none
/// of that name.
pub(crate) fn remove(conn: &Connection, source: &str, name: &str) -> Result<Output, StoreError> {
    let ctx = || format!("removing workload {name:?} of source {source}");
    let removed = conn
        .execute(
            "DELETE FROM workloads WHERE name = ?1 AND source = ?2",
            params![name, source],
        )
        .context(ctx)?;
    prune(conn).context(ctx)?;
    if removed > 0 {
        log_event(conn, Some(name), "removed", &format!("source {source}"))?;
    }
    Ok(Output::Count(removed as u64))
}

/// Deletes the deployment rows of sources other than the operator that no workload names.
pub(crate) fn prune(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM deployments WHERE source <> 'operator'
             AND version NOT IN (SELECT deployment_version FROM workloads)",
        [],
    )
}

impl StateStore {
    /// Adds or replaces one workload of a source other than the operator, atomically; returns
    /// its version. [`StoreError::OtherSource`] if another source owns the name.
    pub async fn upsert_source_workload(&self, w: SourceWorkload) -> Result<u64, StoreError> {
        match self.submit(Op::SourceUpsert(w)).await? {
            Output::Version(version) => Ok(version),
            other => unreachable!("the writer answers an upsert with its version, not {other:?}"),
        }
    }

    /// Removes one workload of a source with its key-value data and logs; whether there was
    /// one.
    pub async fn remove_source_workload(
        &self,
        source: &str,
        name: &str,
    ) -> Result<bool, StoreError> {
        let op = Op::SourceRemove {
            source: source.to_owned(),
            name: name.to_owned(),
        };
        match self.submit(op).await? {
            Output::Count(n) => Ok(n > 0),
            other => unreachable!("the writer answers a removal with a count, not {other:?}"),
        }
    }

    /// Every stored workload of every source, by name, with its source and labels.
    pub fn all_workloads(&self) -> Result<Vec<(WorkloadRow, String, String)>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(&format!(
            "SELECT name, deployment_version, spec_json, module_digest, state, last_error,
                    restarts, traps, {}, source, labels_json
             FROM workloads ORDER BY name",
            super::reads::EVENTS_HANDLED
        ))
        .and_then(|mut stmt| {
            stmt.query_map([], |row| {
                Ok((
                    super::reads::workload_row(row)?,
                    row.get::<_, String>(9)?,
                    row.get::<_, String>(10)?,
                ))
            })?
            .collect()
        })
        .context(|| "reading the workloads of every source".to_owned())
    }
}
