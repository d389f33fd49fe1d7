//! The Wasm runtime behind the common [`Runtime`] / [`Workload`] traits: preparing compiles
//! (or loads the cached compilation of) the module, a workload is a worker task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{ArtifactStore, Delivery, EventSender, Reply, WorkerContext, WorkerHandle};
use crate::deployment::{ModuleRef, WorkloadSpec};
use crate::runtime::{
    BoxFuture, DeliveryError, PrepareError, Prepared, Runtime, RuntimeStatus, StartInfo, Tier,
    UpdateError, Usage, Workload,
};

/// Runs `wasm` workloads on the agent's engine.
pub struct WasmRuntime {
    ctx: WorkerContext,
    artifacts: Arc<ArtifactStore>,
}

impl WasmRuntime {
    /// A runtime over the workers' shared context and the artifact store.
    pub fn new(ctx: WorkerContext, artifacts: Arc<ArtifactStore>) -> Self {
        WasmRuntime { ctx, artifacts }
    }

    async fn load(
        &self,
        spec: &WorkloadSpec,
        stored_digest: Option<&str>,
    ) -> Result<Prepared, PrepareError> {
        let max_memory = self.ctx.max_memory_bytes;
        if let Some(memory) = spec.limits.memory_bytes
            && memory > max_memory
        {
            return Err(PrepareError::new(
                "limits.memory",
                format!(
                    "{memory} bytes is more than this agent's per-instance maximum of {max_memory} bytes (wasm.max-memory in the agent config)"
                ),
            ));
        }
        let loaded = match (stored_digest, spec.module()) {
            (Some(digest), _) => self
                .artifacts
                .load(digest)
                .await
                .map_err(|e| format!("{e:#}")),
            (None, Some(ModuleRef::Digest(digest))) => self
                .artifacts
                .load(digest)
                .await
                .map_err(|e| format!("{e:#}")),
            (None, Some(ModuleRef::Path(path))) => self
                .artifacts
                .add_file(path)
                .await
                .map_err(|e| format!("{e:#}")),
            (None, None) => Err("a wasm workload needs a module".to_string()),
        };
        loaded
            .map(Prepared::Wasm)
            .map_err(|message| PrepareError::new("module", message))
    }
}

impl Runtime for WasmRuntime {
    fn tier(&self) -> Tier {
        Tier::Wasm
    }

    fn probe<'a>(&'a self) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async { Ok("Wasmtime, built in".to_string()) })
    }

    fn collect_garbage<'a>(
        &'a self,
        in_use: &'a std::collections::BTreeSet<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let collected = self.artifacts.collect_garbage(in_use);
            if collected.files > 0 {
                tracing::info!(
                    files = collected.files,
                    bytes = collected.bytes,
                    "removed Wasm artifacts that no deployment uses"
                );
            }
        })
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a WorkloadSpec,
        stored_digest: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Prepared, PrepareError>> {
        Box::pin(self.load(spec, stored_digest))
    }

    fn start(&self, prepared: Prepared, spec: WorkloadSpec, info: StartInfo) -> Box<dyn Workload> {
        let Prepared::Wasm(artifact) = prepared else {
            unreachable!("the supervisor starts a workload with the runtime that prepared it")
        };
        let handle = super::spawn_worker(
            self.ctx.clone(),
            artifact,
            spec,
            info.version,
            info.kv,
            info.events_handled,
        );
        Box::new(WasmWorkload {
            handle,
            ctx: self.ctx.clone(),
        })
    }
}

/// A running `wasm` workload: its worker.
pub struct WasmWorkload {
    handle: WorkerHandle,
    ctx: WorkerContext,
}

impl Workload for WasmWorkload {
    fn name(&self) -> &str {
        &self.handle.name
    }

    fn spec(&self) -> &WorkloadSpec {
        &self.handle.spec
    }

    fn digest(&self) -> &str {
        &self.handle.digest
    }

    fn status(&self) -> RuntimeStatus {
        let stats = &self.handle.stats;
        let s = stats.status();
        let memory = stats.memory_bytes.load(Ordering::Relaxed);
        RuntimeStatus {
            kind: if s.kind.is_empty() {
                "wasm".into()
            } else {
                s.kind
            },
            state: s.state,
            digest: s.digest,
            version: s.version,
            restarts: stats.restarts.load(Ordering::Relaxed),
            traps: stats.traps.load(Ordering::Relaxed),
            events_handled: stats.events_handled.load(Ordering::Relaxed),
            queue_depth: self.handle.queue_depth() as u64,
            uptime: s.started_at.map(|t| t.elapsed()),
            exit: s.exit_code.map(|code| crate::runtime::ExitInfo {
                reason: format!("exited with code {code}"),
                code: Some(code),
                oom_killed: false,
            }),
            last_error: s.last_error,
            usage: Usage {
                memory_bytes: Some(memory),
                pids: None,
            },
            runner: None,
            accelerator: None,
        }
    }

    fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    fn note_error(&self, message: String) {
        self.handle
            .stats
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = Some(message);
    }

    fn try_deliver(
        &self,
        delivery: Delivery,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> Result<(), DeliveryError> {
        self.handle.try_deliver(delivery, reply)
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(self.handle.deliver(delivery, reply))
    }

    fn event_sender(&self) -> Option<EventSender> {
        Some(self.handle.sender())
    }

    fn update<'a>(
        &'a mut self,
        prepared: Prepared,
        spec: WorkloadSpec,
        version: u64,
    ) -> BoxFuture<'a, Result<(), UpdateError>> {
        Box::pin(async move {
            let Prepared::Wasm(artifact) = prepared else {
                return Err(UpdateError::OtherKind {
                    kind: "wasm",
                    wanted: "wasm module",
                });
            };
            self.handle.reload(&self.ctx, artifact, spec, version).await
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(self.handle.stop())
    }
}
