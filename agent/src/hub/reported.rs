//! Reported state: what the node tells the hub about itself (retained on `reported`), and
//! noticing when it changed.

use std::sync::atomic::Ordering;

use lichen_sync::{Assembly, RowKind};
use serde_json::json;

use super::{Bridge, now_ms};
use crate::api::control::Control;
use crate::store::OutboxRecord;

impl Bridge {
    /// What reported state says of the deployment and workloads now, to notice changes.
    pub(super) async fn seen_now(&self) -> String {
        let version = self
            .store
            .current_deployment()
            .ok()
            .flatten()
            .map_or(0, |d| d.version);
        let mut seen = format!("{version}");
        if let Some(p) = &self.pending {
            for (digest, f) in &p.fetches {
                let held = f.assembly.as_ref().map_or(0, Assembly::held);
                seen.push_str(&format!("|{digest}:{held}"));
            }
        }
        if let Some(system) = &self.system {
            seen.push('|');
            seen.push_str(&system.fingerprint());
        }
        seen.push_str(&self.push_seen());
        for w in self.agent.ps().await {
            seen.push_str(&format!(
                "|{}:{}:{}",
                w.name,
                w.state,
                w.last_error.unwrap_or_default()
            ));
        }
        seen
    }

    pub(super) async fn reported(&self) -> serde_json::Value {
        let reads = self.store.reads();
        let deployment = reads.current_deployment().await.ok().flatten();
        let outbox_rows = reads.outbox_len().await.unwrap_or(0);
        let applied = self.applied_version();
        let workloads: Vec<serde_json::Value> = self
            .agent
            .ps()
            .await
            .into_iter()
            .map(|w| {
                json!({
                    "name": w.name,
                    "state": w.state,
                    "module": w.module_digest,
                    "restarts": w.restarts,
                    "traps": w.traps,
                    "events": w.events_handled,
                    "last-error": w.last_error,
                })
            })
            .collect();
        json!({
            "node": self.node,
            "agent": env!("CARGO_PKG_VERSION"),
            "insecure-dev": self.insecure_dev,
            "engine": self.engine_reported(),
            "warning": self.insecure_dev.then_some(
                "INSECURE: hub.insecure-dev is set, deployments are applied without a valid signature"
            ),
            "applied-version": (applied > 0).then_some(applied),
            "system": self.system_reported(),
            "deployment": deployment.map(|d| json!({
                "local-version": d.version,
                "source": d.source_name,
                "digest": d.digest,
            })),
            "last-rejection": self.last_rejection.as_ref().map(|r| json!({
                "version": r.version,
                "reason": r.reason,
                "at-ms": r.at_ms,
            })),
            "ignored-desired": self.ignored.as_ref().map(|i| json!({
                "version": i.version,
                "lost-to": i.lost_to,
                "reason": i.reason,
                "at-ms": i.at_ms,
            })),
            "artifacts": self.pending.as_ref().map(|p| json!({
                "version": p.desired.version,
                "fetching": p.fetches.iter().map(|(digest, f)| json!({
                    "digest": digest,
                    "size": f.size,
                    "chunks": f.assembly.as_ref().map(|a| a.manifest().chunks.len()),
                    "held": f.assembly.as_ref().map_or(0, Assembly::held),
                    "resumed": f.resumed,
                    "fetched": f.fetched,
                    "redundant": f.redundant,
                    "refused": f.refused,
                    "last-error": f.last_error,
                })).collect::<Vec<_>>(),
            })),
            "connection": {
                "url": self.url,
                "connected": self.connected,
                "subscribed": self.subscribed,
                "reconnects": self.reconnects,
                "last-error": self.last_connection_error,
            },
            "workloads": workloads,
            "counters": {
                "dropped-telemetry": self.dropped,
                "commands": self.answered.load(Ordering::Relaxed),
                "rejected-messages": self.rejected_messages,
                "artifact-chunks": self.chunks_fetched,
                "outbox-rows": outbox_rows,
            },
            "errors": self.errors,
        })
    }

    /// What the hub needs to precompile for this node: the target, the engine fingerprint
    /// and the memory settings that make it, and whether the node can compile itself.
    fn engine_reported(&self) -> serde_json::Value {
        let store = self.agent.artifacts();
        let engine = store.engine();
        let options = engine.options();
        let counts = store.counts();
        json!({
            "target": engine.target(),
            "fingerprint": engine.fingerprint(),
            "wasmtime": crate::runtime::wasm::WASMTIME_VERSION,
            "max-memory": options.max_memory_bytes,
            "memory-guard": options.memory_guard_bytes,
            "compiler": crate::runtime::wasm::COMPILER,
            "compiled": counts.compiled,
            "precompiled-loads": counts.precompiled_loads,
        })
    }

    pub(super) async fn publish_reported(&mut self) {
        self.last_seen = self.seen_now().await;
        let record = OutboxRecord {
            kind: RowKind::State.as_str().to_owned(),
            workload: String::new(),
            stream: String::new(),
            payload: self.reported().await.to_string().into_bytes(),
            created_at_ms: now_ms(),
        };
        if let Err(e) = self.store.push_outbox(record).await {
            tracing::warn!("cannot queue reported state: {e}");
        }
    }
}
