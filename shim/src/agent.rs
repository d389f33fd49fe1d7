//! The one thing the task service needs from Lichen's agent, as a trait: create a workload
//! from a pod container's program, start it, learn how it ended, stop it, remove it.
//!
//! The agent implements it in its wiring (it owns the Wasm runtime, `ps`, logs and metrics);
//! the task service's tests implement it with a fake. Every call names the task by the
//! containerd task id, which is unique within the agent.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::io::OutputSink;
use crate::spec::PodIdentity;

/// A pod container's program, read from its bundle and image, for the agent to run.
pub struct PodWorkload {
    /// containerd's task id (the container id).
    pub id: String,
    /// containerd namespace the task lives in (`k8s.io` under Kubernetes).
    pub namespace: String,
    /// Pod and container names from the CRI annotations, for `ps`, logs and metrics.
    pub identity: PodIdentity,
    /// Path of the entrypoint inside the image, as the image named it.
    pub entrypoint: PathBuf,
    /// The entrypoint's bytes: a WebAssembly component or core module (checked magic only;
    /// compiling and checking imports is the agent's job).
    pub wasm: Vec<u8>,
    /// `argv`, the entrypoint first, as the OCI spec's `process.args`.
    pub args: Vec<String>,
    /// Environment as `(KEY, value)`, from the OCI spec's `process.env`.
    pub env: Vec<(String, String)>,
    /// Linear memory limit in bytes from `linux.resources.memory.limit`, if the spec sets one.
    pub memory_limit: Option<u64>,
    /// Where the program's stdout goes (containerd's FIFO), if anywhere.
    pub stdout: Option<OutputSink>,
    /// Where the program's stderr goes (containerd's FIFO), if anywhere.
    pub stderr: Option<OutputSink>,
}

impl fmt::Debug for PodWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodWorkload")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .field("identity", &self.identity)
            .field("entrypoint", &self.entrypoint)
            .field("wasm_bytes", &self.wasm.len())
            .field("args", &self.args)
            .field("memory_limit", &self.memory_limit)
            .finish_non_exhaustive()
    }
}

/// How a workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The program returned or called `exit` with this code.
    Code(i32),
    /// The program trapped (out of bounds, unreachable, out of fuel...); the agent has
    /// written the reason to the workload's stderr.
    Trapped(String),
    /// The agent stopped it because it was asked to (`stop`).
    Stopped,
}

/// What the agent says a workload is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadStatus {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Ended.
    Exited(Exit),
}

/// Why the agent refused or failed a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// No workload with this task id.
    #[error("no workload for task {0:?}")]
    NotFound(String),
    /// The workload's program or settings are not acceptable (not Wasm, unknown import, memory
    /// limit over the agent's slot...). The message names the field or import.
    #[error("{0}")]
    Invalid(String),
    /// The call does not fit the workload's state (start twice, remove while running).
    #[error("{0}")]
    State(String),
    /// The agent could not do it (out of instance slots, shutting down...).
    #[error("{0}")]
    Unavailable(String),
}

/// Lichen's agent as the task service sees it. All calls are cheap to make concurrently;
/// `wait` may be called while other calls run.
#[async_trait]
pub trait PodAgent: Send + Sync + 'static {
    /// Checks and prepares the workload (compiles it, checks its imports and memory limit)
    /// without running it. An error changes nothing in the agent.
    async fn create(&self, workload: PodWorkload) -> Result<(), AgentError>;
    /// Runs a created workload.
    async fn start(&self, id: &str) -> Result<(), AgentError>;
    /// Resolves when the workload has ended, with how. Called once per started workload.
    async fn wait(&self, id: &str) -> Result<Exit, AgentError>;
    /// Stops a running workload; `wait` then resolves with [`Exit::Stopped`]. Stopping a
    /// workload that has already ended is not an error.
    async fn stop(&self, id: &str) -> Result<(), AgentError>;
    /// What the workload is doing now.
    async fn status(&self, id: &str) -> Result<WorkloadStatus, AgentError>;
    /// Forgets a workload that is created or ended, closing its outputs.
    async fn remove(&self, id: &str) -> Result<(), AgentError>;
}
