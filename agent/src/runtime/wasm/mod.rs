//! The Wasm runtime: one Wasmtime engine for every `wasm` workload, components precompiled
//! once and cached on disk, one instance per workload driven by its own task.

mod address_space;
mod artifacts;
mod command;
mod compiler;
mod engine;
mod instance;
mod limiter;
mod worker;
mod workload;

pub use address_space::{AddressSpace, PoolFit};
pub use artifacts::{
    Artifact, ArtifactKind, ArtifactStore, COMPILER, CompileCounts, LoadPhases, sha256_hex,
};
pub use command::{CommandOutput, CommandOutputs, CommandProgram};
pub use engine::{
    CodeSettings, EngineOptions, WASMTIME_VERSION, WasmEngine, engine_config, host_target,
};
pub use instance::{CallOutcome, Instance, InstanceSetup};
pub use worker::{
    CommandCommitted, Delivery, EventRequest, EventSender, HubCommand, Reply, StartError,
    WorkerCommand, WorkerContext, WorkerHandle, WorkerStats, spawn_worker,
};
pub use workload::{WasmRuntime, WasmWorkload};

/// Turns Wasmtime's own error type into an `anyhow` error so `.context` can wrap it.
pub(crate) trait IntoAnyhow<T> {
    /// The same result with an `anyhow` error.
    fn anyhow(self) -> anyhow::Result<T>;
}

impl<T> IntoAnyhow<T> for wasmtime::Result<T> {
    fn anyhow(self) -> anyhow::Result<T> {
        self.map_err(anyhow::Error::from)
    }
}
