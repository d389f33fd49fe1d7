//! What the mapper needs from the agent, as a trait: [`DeviceHost`].
//!
//! The agent implements it (the integration goes into its supervisor); the tests implement it
//! with a fake. Every call goes through the agent's normal paths: [`DeviceHost::apply`] is the
//! validated, atomic deployment of one workload (grants checked against the board profile and
//! against the pins other workloads own, events logged), [`DeviceHost::send`] delivers a
//! `command` event exactly as `lichen send` does.

use std::collections::BTreeMap;
use std::future::Future;

use tokio::sync::broadcast;

use crate::workload::DeviceWorkload;

/// A workload's health, as the mapper sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Running and taking events.
    Running,
    /// Being started (or restarted after a failure).
    Starting,
    /// Not running: failed, backing off, stopped or ended; with the reason.
    Down(String),
}

/// A device's state as KubeEdge names it (`ReportDeviceStates.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Its function runs.
    Online,
    /// Its function does not run, or its workload is missing.
    Offline,
    /// Not known yet (the function is starting).
    Unknown,
}

impl DeviceState {
    /// The state of a device whose workload has `health` (`None`: no such workload).
    pub fn of(health: Option<&Health>) -> Self {
        match health {
            Some(Health::Running) => DeviceState::Online,
            Some(Health::Starting) => DeviceState::Unknown,
            Some(Health::Down(_)) | None => DeviceState::Offline,
        }
    }

    /// The word KubeEdge's mappers send: `online`, `offline`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
            DeviceState::Unknown => "unknown",
        }
    }
}

/// A telemetry record a function published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// The workload that published it.
    pub workload: String,
    /// Its stream.
    pub stream: String,
    /// Its payload as published.
    pub payload: Vec<u8>,
}

/// Why the agent refused or failed a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The workload is invalid; `field` is its field in the deployment schema (`gpio[0].pin`)
    /// and nothing changed.
    #[error("{field}: {message}")]
    Invalid {
        /// The workload's field at fault.
        field: String,
        /// Why.
        message: String,
    },
    /// No such workload.
    #[error("{0}")]
    NotFound(String),
    /// The agent or workload cannot take it now (stopped, backing off, busy).
    #[error("{0}")]
    Unavailable(String),
    /// The function answered a command with an error.
    #[error("the function refused the command: {0}")]
    Refused(String),
    /// A failure inside the agent.
    #[error("{0}")]
    Internal(String),
}

/// What the mapper asks of the agent.
pub trait DeviceHost: Send + Sync + 'static {
    /// Adds the workload of a Device, or replaces it (hot reload) if one of that name is
    /// already owned by the mapper, through the validated, atomic deployment path. A workload
    /// of that name in the operator's deployment is refused (`Invalid`, field `name`).
    fn apply(&self, workload: DeviceWorkload)
    -> impl Future<Output = Result<(), HostError>> + Send;
    /// Removes a workload the mapper added: it gets `stop`, its outputs go to their safe state.
    fn remove(&self, workload: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Delivers a `command` event to a workload and waits for its reply.
    fn send(
        &self,
        workload: &str,
        command: &str,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, HostError>> + Send;
    /// The health of every workload, by name.
    fn health(&self) -> impl Future<Output = BTreeMap<String, Health>> + Send;
    /// Telemetry records as they are committed, from every workload. A receiver that lags
    /// loses the oldest records: the mapper only needs the latest value of each property.
    fn telemetry(&self) -> broadcast::Receiver<Telemetry>;
}
