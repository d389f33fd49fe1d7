//! Lichen as a KubeEdge device mapper, inside the agent: the supervisor as
//! `lichen_kubeedge::host::DeviceHost` (each Device's function a workload of source
//! `devices`), the report queue in the state store ([`crate::store::DmiQueue`]), and the
//! mapper started by the daemon from the `[kubeedge]` section. The mapping is in
//! `docs/kubeedge.md`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use lichen_kubeedge::host::{DeviceHost, Health, HostError, Telemetry};
use lichen_kubeedge::mapper::MapperConfig;
use lichen_kubeedge::queue::ReportQueue;
use lichen_kubeedge::workload::DeviceWorkload;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::api::control::Control;
use crate::api::types::{ApiError, ErrorCode, SendRequest, WorkloadState};
use crate::config::KubeEdgeSection;
use crate::store::DmiQueue;
use crate::supervisor::{Agent, Labels, Refusal, Source};

/// Telemetry records buffered for the mapper; a lagging mapper loses the oldest (it only
/// needs each property's latest value).
const TELEMETRY_BUFFER: usize = 4096;

/// The agent as the mapper's host. Cheap to clone.
#[derive(Clone)]
pub struct AgentDevices {
    agent: Agent,
    telemetry: broadcast::Sender<Telemetry>,
}

impl AgentDevices {
    /// The host over `agent`, with a task forwarding committed telemetry to the mapper (ended
    /// by aborting the returned handle).
    pub fn new(agent: Agent) -> (Self, JoinHandle<()>) {
        let (telemetry, _) = broadcast::channel(TELEMETRY_BUFFER);
        let mut tap = agent.telemetry_tap();
        let forward = tokio::spawn({
            let telemetry = telemetry.clone();
            async move {
                loop {
                    match tap.recv().await {
                        Ok(record) => {
                            let _ = telemetry.send(Telemetry {
                                workload: record.workload,
                                stream: record.stream,
                                payload: record.payload,
                            });
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
        });
        (Self { agent, telemetry }, forward)
    }
}

fn from_api(e: ApiError) -> HostError {
    match e.code {
        ErrorCode::NotFound => HostError::NotFound(e.error),
        ErrorCode::Unavailable => HostError::Unavailable(e.error),
        ErrorCode::Invalid => HostError::Invalid {
            field: "name".into(),
            message: e.error,
        },
        ErrorCode::Internal => HostError::Internal(e.error),
    }
}

fn from_refusal(refusal: Refusal) -> HostError {
    match refusal {
        // The Device names a module the artifact store does not hold.
        Refusal::Invalid { field, message }
            if field == "module" && message.contains("no artifact") =>
        {
            HostError::NotFound(message)
        }
        Refusal::Invalid { field, message } => HostError::Invalid { field, message },
        Refusal::Api(e) => from_api(e),
    }
}

/// A Device's workload through the deployment file schema (JSON), so it is validated by the
/// same parser as `lichen deploy`; a refusal names the workload's field (`gpio[1].pin`).
fn to_spec(workload: &DeviceWorkload) -> Result<crate::deployment::WorkloadSpec, HostError> {
    let text = serde_json::json!({ "workloads": [workload.to_json()] }).to_string();
    let mut parsed =
        crate::deployment::parse("device.json", &text, Path::new("/")).map_err(|e| {
            let field = e.field.clone().unwrap_or_default();
            HostError::Invalid {
                field: field
                    .strip_prefix("workloads[0].")
                    .unwrap_or(&field)
                    .to_owned(),
                message: e.message,
            }
        })?;
    parsed
        .spec
        .workloads
        .pop()
        .ok_or_else(|| HostError::Internal("the device's workload vanished".into()))
}

impl DeviceHost for AgentDevices {
    async fn apply(&self, workload: DeviceWorkload) -> Result<(), HostError> {
        let spec = to_spec(&workload)?;
        // `lichen ps` shows the Device and its model beside the workload's name.
        let device = &workload.device;
        let labels = Labels::of([
            ("device", device.name.as_str()),
            ("model", device.model.as_str()),
            ("namespace", device.namespace.as_str()),
        ]);
        self.agent
            .upsert_checked(Source::Devices, spec, labels)
            .await
            .map_err(from_refusal)
    }

    async fn remove(&self, workload: &str) -> Result<(), HostError> {
        self.agent
            .remove_checked(Source::Devices, workload)
            .await
            .map_err(from_refusal)
    }

    async fn send(
        &self,
        workload: &str,
        command: &str,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, HostError> {
        let request = SendRequest {
            command: command.to_owned(),
            payload: String::from_utf8_lossy(&payload).into_owned(),
        };
        match Control::send(&self.agent, workload, request).await {
            Ok(reply) => Ok(reply.reply.map(String::into_bytes)),
            Err(e) if e.code == ErrorCode::Unavailable && e.error.contains("did not handle") => {
                Err(HostError::Refused(e.error))
            }
            Err(e) => Err(from_api(e)),
        }
    }

    async fn health(&self) -> BTreeMap<String, Health> {
        self.agent
            .ps()
            .await
            .into_iter()
            .map(|w| {
                let health = match w.state {
                    WorkloadState::Running => Health::Running,
                    WorkloadState::Starting | WorkloadState::Pending => Health::Starting,
                    state => Health::Down(match w.last_error {
                        Some(error) => format!("{state}: {error}"),
                        None => state.to_string(),
                    }),
                };
                (w.name, health)
            })
            .collect()
    }

    fn telemetry(&self) -> broadcast::Receiver<Telemetry> {
        self.telemetry.subscribe()
    }
}

/// The mapper as the daemon runs it.
pub struct KubeEdge {
    running: lichen_kubeedge::Running<AgentDevices, DmiQueue>,
    forward: JoinHandle<()>,
}

impl KubeEdge {
    /// Starts the mapper: binds its socket, serves EdgeCore and registers with it as soon as
    /// it answers. The report queue is the state store's.
    pub async fn start(agent: &Agent, section: &KubeEdgeSection) -> Result<Self> {
        let queue = Arc::new(DmiQueue::new(agent.store().clone(), section.queue_reports));
        let (host, forward) = AgentDevices::new(agent.clone());
        let config = MapperConfig {
            edgecore_socket: section.edgecore_socket.clone(),
            mapper_socket: section.mapper_socket.clone(),
            max_devices: usize::try_from(section.max_devices).unwrap_or(usize::MAX),
            ..MapperConfig::default()
        };
        let edgecore_socket = section.edgecore_socket.clone();
        agent.add_doctor_check(Arc::new(move |agent: &Agent| {
            doctor_check(agent, &edgecore_socket)
        }));
        let running = match lichen_kubeedge::Running::start(host, queue, config).await {
            Ok(running) => running,
            Err(e) => {
                forward.abort();
                return Err(e).with_context(|| {
                    format!(
                        "cannot serve the KubeEdge mapper on {}",
                        section.mapper_socket.display()
                    )
                });
            }
        };
        tracing::info!(
            edgecore = %section.edgecore_socket.display(),
            mapper = %section.mapper_socket.display(),
            "KubeEdge device mapper started"
        );
        Ok(Self { running, forward })
    }

    /// Stops serving and reporting; the device functions keep running until the agent stops
    /// them, and queued reports stay queued.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
        self.forward.abort();
    }
}

/// The `doctor` line: whether EdgeCore's socket answers, the devices, the queued reports.
pub fn doctor_check(agent: &Agent, edgecore_socket: &Path) -> crate::api::types::DoctorCheck {
    let reachable = std::os::unix::net::UnixStream::connect(edgecore_socket);
    let devices = agent.store().all_workloads().map(|rows| {
        rows.iter()
            .filter(|(_, source, _)| source == "devices")
            .count()
    });
    let queued = DmiQueue::new(agent.store().clone(), 1).len();
    let counts = format!(
        "{} devices, {} reports queued for EdgeCore",
        devices.map_or_else(|e| format!("? ({e})"), |n| n.to_string()),
        queued.map_or_else(|e| format!("? ({e})"), |n| n.to_string()),
    );
    match reachable {
        Ok(_) => crate::api::types::DoctorCheck {
            name: "kubeedge".into(),
            status: "ok".into(),
            detail: format!(
                "EdgeCore answers on {}; {counts}",
                edgecore_socket.display()
            ),
        },
        Err(e) => crate::api::types::DoctorCheck {
            name: "kubeedge".into(),
            status: "warn".into(),
            detail: format!(
                "EdgeCore's socket {} does not answer ({e}): reports wait in the queue; {counts}",
                edgecore_socket.display()
            ),
        },
    }
}
