//! What the local API can ask of a running agent.

use std::future::Future;

use tokio::sync::broadcast;

use super::types::{
    ApiError, DeployReport, DeployRequest, DoctorReport, EventRecord, KvEntry, LogLine, SendReply,
    SendRequest, WorkloadStatus,
};

/// The daemon side of the API: the agent implements it, the HTTP server calls it.
pub trait Control: Clone + Send + Sync + 'static {
    /// Validates a whole deployment and applies it atomically; an invalid one changes nothing.
    fn deploy(
        &self,
        req: DeployRequest,
    ) -> impl Future<Output = Result<DeployReport, ApiError>> + Send;
    /// Status of every workload, sorted by name.
    fn ps(&self) -> impl Future<Output = Vec<WorkloadStatus>> + Send;
    /// The last `tail` log lines of a workload, oldest first.
    fn logs(
        &self,
        workload: &str,
        tail: usize,
    ) -> impl Future<Output = Result<Vec<LogLine>, ApiError>> + Send;
    /// Log lines of a workload as they are written (for `logs --follow`).
    fn follow_logs(&self, workload: &str) -> Result<broadcast::Receiver<LogLine>, ApiError>;
    /// Key-value entries of a workload, all of them or only `key` (in the default bucket).
    fn kv(
        &self,
        workload: &str,
        key: Option<&str>,
    ) -> impl Future<Output = Result<Vec<KvEntry>, ApiError>> + Send;
    /// Lifecycle events with an id greater than `after`, oldest first, at most `limit`.
    fn events(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventRecord>, ApiError>> + Send;
    /// Delivers a command event to a workload and waits for its reply.
    fn send(
        &self,
        workload: &str,
        req: SendRequest,
    ) -> impl Future<Output = Result<SendReply, ApiError>> + Send;
    /// Stops a workload (it stays in the deployment, stopped, until the next deploy).
    fn stop(&self, workload: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// What this host can run, with reasons.
    fn doctor(&self) -> impl Future<Output = DoctorReport> + Send;
    /// Metrics in the Prometheus text exposition format.
    fn metrics_text(&self) -> String;
    /// Verifies a deployment bundle and applies it (`lichen import`); the agent's hub link
    /// does it, with the `[hub]` section's node id and trusted keys (the hub's `ImportRoute`;
    /// the API names no hub type, so it does not depend on the hub).
    fn import(
        &self,
        req: crate::api::types::ImportRequest,
    ) -> impl Future<Output = Result<crate::api::types::ImportReport, ApiError>> + Send;
}
