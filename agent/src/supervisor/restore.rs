//! Restoring the last applied deployment at start.
//!
//! A stored deployment is trusted no more than a new one: it may have been written by an older
//! agent with looser rules, or edited on disk. Each workload is read and checked against the
//! bounds of today's model ([`WorkloadSpec::check_bounds`]) before its runtime sees it; one that
//! cannot be read, is out of bounds, or whose artifact does not load is shown as `failed` in
//! `ps` with the reason, recorded in the event log, and the others start. Nothing stored can
//! stop the agent from coming up, so it never crash-loops on its own state.

use crate::api::types::WorkloadStatus;
use crate::deployment::{WorkloadSpec, WorkloadState};
use crate::runtime::{StartInfo, Tier};
use crate::store::{StatusUpdate, WorkloadRow};

use super::{Agent, Labels, Parked, Running, Source};

/// Why a stored workload could not start, with what is known of it for `ps`.
struct Failure {
    kind: String,
    tier: Tier,
    message: String,
}

impl Agent {
    /// Starts the stored workloads of the operator (its last applied deployment) and the
    /// devices source (after each runtime has cleaned up what a killed agent left behind); the
    /// pods source's stored workloads are dropped, not started (containerd owns pods). Returns whether there was any. A workload that cannot start is
    /// reported `failed`; only an unreadable state store is an error.
    pub async fn restore(&self) -> anyhow::Result<bool> {
        let _deploying = self.inner.deploying.lock().await;
        for runtime in self.inner.runtimes.values() {
            runtime.recover().await;
        }
        let mut rows = self.store().all_workloads()?;
        // Pods are not restored: containerd owns them, and it saw their tasks exit when the
        // agent went away (the task connection closed). What a killed agent left stored goes.
        let mut pods = Vec::new();
        rows.retain(|(row, source, _)| {
            let pod = Source::parse(source) == Some(Source::Pods);
            if pod {
                pods.push(row.name.clone());
            }
            !pod
        });
        for name in pods {
            if let Err(e) = self
                .store()
                .remove_source_workload(Source::Pods.as_str(), &name)
                .await
            {
                tracing::warn!(workload = %name.escape_debug(), "cannot drop a stored pod: {e}");
            }
        }
        if rows.is_empty() && self.store().current_deployment()?.is_none() {
            self.collect_garbage().await;
            return Ok(false);
        }
        let mut workloads = self.inner.workloads.lock().await;
        let mut failed = 0usize;
        for (row, source_name, labels_json) in &rows {
            // An unknown source (a newer agent's) is restored as the operator's, which the
            // next deployment then owns.
            let source = Source::parse(source_name).unwrap_or(Source::Operator);
            let labels: Labels = serde_json::from_str(labels_json).unwrap_or_default();
            match self
                .restore_one(row, row.deployment_version, source, labels.clone())
                .await
            {
                Ok(running) => {
                    workloads.running.insert(row.name.clone(), running);
                }
                Err(failure) => {
                    failed += 1;
                    let message = format!(
                        "cannot start the stored workload: {}; deploy a corrected deployment",
                        failure.message
                    );
                    tracing::error!(workload = %row.name.escape_debug(), "{message}");
                    self.inner.ctx.logs.agent_line(
                        &row.name,
                        lichen_host_apis::LogLevel::Error,
                        &message,
                    );
                    let _ = self
                        .store()
                        .record_status(StatusUpdate {
                            workload: row.name.clone(),
                            state: WorkloadState::Failed,
                            last_error: Some(message.clone()),
                            restarts: row.restarts,
                            traps: row.traps,
                            event: Some(("start-failed".into(), message.clone())),
                        })
                        .await;
                    let mut status = failed_status(row, row.deployment_version, failure, message);
                    status.source = source.as_str().into();
                    status.labels = labels.0;
                    workloads
                        .stopped
                        .insert(row.name.clone(), Parked { status });
                }
            }
        }
        drop(workloads);
        self.collect_garbage().await;
        tracing::info!(
            workloads = rows.len(),
            failed,
            "restored the stored workloads of every source"
        );
        Ok(true)
    }

    /// Reads, checks, prepares and starts one stored workload.
    async fn restore_one(
        &self,
        row: &WorkloadRow,
        version: u64,
        source: Source,
        labels: Labels,
    ) -> Result<Running, Failure> {
        let spec: WorkloadSpec = serde_json::from_str(&row.spec_json).map_err(|e| Failure {
            kind: "unknown".into(),
            tier: Tier::Wasm,
            message: format!("its stored spec is unreadable: {e}"),
        })?;
        let fail = |tier: Tier, message: String| Failure {
            kind: spec.kind().as_str().into(),
            tier,
            message,
        };
        let default_tier = spec.kind();
        if spec.name != row.name {
            return Err(fail(
                default_tier,
                format!("its stored spec names another workload, {:?}", spec.name),
            ));
        }
        spec.check_bounds().map_err(|e| {
            fail(
                default_tier,
                format!(
                    "{}: {} (its stored spec is out of bounds)",
                    e.field, e.message
                ),
            )
        })?;
        let isolation = self.isolation_for(std::slice::from_ref(&spec)).await;
        let tier = isolation
            .select(&spec)
            .map_err(|e| fail(default_tier, e.to_string()))?;
        let runtime = self.runtime(tier).map_err(|message| fail(tier, message))?;
        let prepared = runtime
            .prepare(&spec, Some(&row.module_digest))
            .await
            .map_err(|e| fail(tier, format!("cannot load its {}: {}", e.field, e.message)))?;
        let kv = self
            .store()
            .load_kv(&row.name)
            .map_err(|e| fail(tier, format!("cannot read its key-value state: {e}")))?;
        let workload = runtime.start(
            prepared,
            spec,
            StartInfo {
                version,
                kv,
                events_handled: row.events_handled,
            },
        );
        Ok(Running {
            tier,
            workload,
            source,
            labels,
        })
    }
}

/// The `ps` row of a stored workload that could not start.
fn failed_status(
    row: &WorkloadRow,
    version: u64,
    failure: Failure,
    message: String,
) -> WorkloadStatus {
    WorkloadStatus {
        name: row.name.clone(),
        kind: failure.kind,
        state: WorkloadState::Failed,
        module_digest: format!("sha256:{}", row.module_digest),
        deployment_version: version,
        restarts: row.restarts,
        traps: row.traps,
        events_handled: row.events_handled,
        queue_depth: 0,
        memory_bytes: 0,
        uptime_ms: None,
        last_error: Some(message),
        isolation: failure.tier.as_str().to_string(),
        pids: None,
        exit_code: None,
        oom_killed: false,
        exit_reason: None,
        runner: None,
        accelerator: None,
        source: Source::Operator.as_str().into(),
        labels: Default::default(),
    }
}
