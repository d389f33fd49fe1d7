//! Status: a workload's `ps` row and the gauges the metrics show.

use std::collections::BTreeMap;

use super::{Agent, Running, Source};
use crate::api::types::{WorkloadState, WorkloadStatus};
use crate::metrics::Gauges;
use crate::runtime::{RuntimeStatus, Tier};
use crate::util::process_rss_bytes;

impl Agent {
    pub(super) fn status_of(running: &Running) -> WorkloadStatus {
        let tier = running.tier;
        let mut status = to_api_status(running.workload.name(), tier, running.workload.status());
        status.source = running.source.as_str().into();
        status.labels = running.labels.0.clone();
        status
    }

    pub(super) async fn knows(&self, workload: &str) -> bool {
        let workloads = self.inner.workloads.lock().await;
        workloads.running.contains_key(workload) || workloads.stopped.contains_key(workload)
    }

    pub(super) fn gauges(&self, statuses: &[WorkloadStatus]) -> Gauges {
        Gauges {
            instances: statuses
                .iter()
                .filter(|s| s.kind == "wasm" && s.state == WorkloadState::Running)
                .count() as u64,
            queue_depth: statuses.iter().map(|s| s.queue_depth).sum(),
            rss_bytes: process_rss_bytes().unwrap_or(0),
            outbox_rows: self.store().outbox_len().unwrap_or(0),
        }
    }
}

/// A runtime's status as a `ps` row.
pub(super) fn to_api_status(name: &str, tier: Tier, s: RuntimeStatus) -> WorkloadStatus {
    WorkloadStatus {
        name: name.to_string(),
        kind: s.kind,
        state: s.state,
        module_digest: format!("sha256:{}", s.digest),
        deployment_version: s.version,
        restarts: s.restarts,
        traps: s.traps,
        events_handled: s.events_handled,
        queue_depth: s.queue_depth,
        memory_bytes: s.usage.memory_bytes.unwrap_or(0),
        uptime_ms: s.uptime.map(crate::util::millis),
        last_error: s.last_error,
        isolation: tier.as_str().to_string(),
        pids: s.usage.pids,
        exit_code: s.exit.as_ref().and_then(|e| e.code),
        oom_killed: s.exit.as_ref().is_some_and(|e| e.oom_killed),
        exit_reason: s.exit.map(|e| e.reason),
        runner: s.runner,
        accelerator: s.accelerator,
        source: Source::Operator.as_str().into(),
        labels: BTreeMap::new(),
    }
}
