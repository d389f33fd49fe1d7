//! The local API over the agent and its pods: every verb goes to the agent, whose supervisor
//! runs the pods as workloads of its `pods` source (so `lichen ps` lists them with their
//! labels `namespace`, `pod`, `container`, and `lichen logs <name>` shows what they printed);
//! `doctor` adds the task server's check and `/metrics` counts the pods (`lichen_pods`,
//! `lichen_pod_up{pod=..,container=..}`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast;

use super::PodRuntime;
use super::server::TaskServerState;
use crate::api::control::Control;
use crate::api::types::{
    ApiError, DeployReport, DeployRequest, DoctorReport, EventRecord, KvEntry, LogLine, SendReply,
    SendRequest, WorkloadStatus,
};
use crate::deployment::WorkloadState;
use crate::supervisor::Agent;

/// The agent and its pods, as the local API serves them.
#[derive(Clone)]
pub struct NodeControl {
    agent: Agent,
    pods: Arc<PodRuntime>,
    task_server: TaskServerState,
}

impl NodeControl {
    /// `agent` with `pods`, whose task server is in `task_server`'s state.
    pub fn new(agent: Agent, pods: Arc<PodRuntime>, task_server: TaskServerState) -> Self {
        Self {
            agent,
            pods,
            task_server,
        }
    }
}

impl Control for NodeControl {
    async fn deploy(&self, req: DeployRequest) -> Result<DeployReport, ApiError> {
        self.agent.deploy(req).await
    }

    async fn ps(&self) -> Vec<WorkloadStatus> {
        self.agent.ps().await
    }

    async fn logs(&self, workload: &str, tail: usize) -> Result<Vec<LogLine>, ApiError> {
        self.agent.logs(workload, tail).await
    }

    fn follow_logs(&self, workload: &str) -> Result<broadcast::Receiver<LogLine>, ApiError> {
        self.agent.follow_logs(workload)
    }

    async fn kv(&self, workload: &str, key: Option<&str>) -> Result<Vec<KvEntry>, ApiError> {
        self.agent.kv(workload, key).await
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>, ApiError> {
        self.agent.events(after, limit).await
    }

    async fn send(&self, workload: &str, req: SendRequest) -> Result<SendReply, ApiError> {
        self.agent.send(workload, req).await
    }

    async fn stop(&self, workload: &str) -> Result<(), ApiError> {
        self.agent.stop(workload).await
    }

    async fn doctor(&self) -> DoctorReport {
        let mut report = self.agent.doctor().await;
        report.checks.push(self.task_server.doctor_check());
        report
    }

    async fn import(
        &self,
        req: crate::api::types::ImportRequest,
    ) -> Result<crate::api::types::ImportReport, ApiError> {
        self.agent.import(req).await
    }

    fn metrics_text(&self) -> String {
        let mut text = self.agent.metrics_text();
        let rows = self.pods.states();
        let count = |state: WorkloadState| rows.iter().filter(|r| r.state == state).count();
        let counters = self.pods.counters();
        let _ = writeln!(
            text,
            "# HELP lichen_pods Pods the containerd task server holds, by state.\n# TYPE lichen_pods gauge"
        );
        for state in [
            WorkloadState::Starting,
            WorkloadState::Running,
            WorkloadState::Completed,
            WorkloadState::Failed,
            WorkloadState::Stopped,
        ] {
            let _ = writeln!(text, "lichen_pods{{state=\"{state}\"}} {}", count(state));
        }
        for (name, help, value) in [
            (
                "lichen_pods_started_total",
                "Pods started since the agent started.",
                &counters.started,
            ),
            (
                "lichen_pods_trapped_total",
                "Pods whose Wasm trapped.",
                &counters.trapped,
            ),
            (
                "lichen_pods_stopped_total",
                "Pods stopped by containerd.",
                &counters.stopped,
            ),
            (
                "lichen_pods_refused_total",
                "Pod creates refused (bad program, memory limit).",
                &counters.refused,
            ),
        ] {
            let _ = writeln!(
                text,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            text,
            "# HELP lichen_pod_up Pods by name and labels: 1 while running.\n# TYPE lichen_pod_up gauge"
        );
        for row in &rows {
            let mut labels = format!("workload=\"{}\"", escape(&row.workload));
            for (key, value) in &row.labels {
                let _ = write!(labels, ",{}=\"{}\"", key.replace('-', "_"), escape(value));
            }
            let _ = writeln!(
                text,
                "lichen_pod_up{{{labels}}} {}",
                u8::from(row.state.is_running())
            );
        }
        text
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
