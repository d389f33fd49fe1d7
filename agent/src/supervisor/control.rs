//! The local API's verbs on the agent: `ps`, `logs`, `kv`, `events`, `send`, `stop`,
//! `doctor`, metrics.

use std::path::Path;
use std::sync::atomic::Ordering;

use tokio::sync::{broadcast, oneshot};

use super::status::to_api_status;
use super::{Agent, Parked, REPLY_TIMEOUT};
use crate::api::control::Control;
use crate::api::types::{
    ApiError, DeployReport, DeployRequest, DoctorReport, EventRecord, KvEntry, LogLine, SendReply,
    SendRequest, WorkloadStatus,
};
use crate::deployment::WorkloadState;
use crate::runtime::wasm::{Delivery, EventSender};

impl Control for Agent {
    async fn deploy(&self, req: DeployRequest) -> Result<DeployReport, ApiError> {
        self.deploy_text(&req.file_name, &req.text, Path::new(&req.base_dir))
            .await
    }

    async fn ps(&self) -> Vec<WorkloadStatus> {
        let workloads = self.inner.workloads.lock().await;
        let mut rows: Vec<WorkloadStatus> =
            workloads.running.values().map(Self::status_of).collect();
        rows.extend(workloads.stopped.values().map(|s| s.status.clone()));
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    async fn logs(&self, workload: &str, tail: usize) -> Result<Vec<LogLine>, ApiError> {
        if !self.knows(workload).await {
            return Err(ApiError::not_found(format!(
                "no workload named {workload:?}"
            )));
        }
        self.inner
            .ctx
            .logs
            .lines(workload, tail, self.store())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    fn follow_logs(&self, workload: &str) -> Result<broadcast::Receiver<LogLine>, ApiError> {
        Ok(self.inner.ctx.logs.follow(workload))
    }

    async fn kv(&self, workload: &str, key: Option<&str>) -> Result<Vec<KvEntry>, ApiError> {
        if !self.knows(workload).await {
            return Err(ApiError::not_found(format!(
                "no workload named {workload:?}"
            )));
        }
        let data = self
            .store()
            .reads()
            .load_kv(workload)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(data
            .into_iter()
            .filter(|((bucket, k), _)| match key {
                Some(key) => bucket == "default" && k == key,
                None => true,
            })
            .map(|((bucket, key), value)| KvEntry {
                bucket,
                key,
                size: value.len() as u64,
                value: String::from_utf8_lossy(&value).into_owned(),
            })
            .collect())
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>, ApiError> {
        let rows = self
            .store()
            .reads()
            .events(after, limit)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|r| EventRecord {
                id: r.id,
                at_ms: r.at_ms,
                workload: r.workload,
                kind: r.kind,
                detail: r.detail,
            })
            .collect())
    }

    async fn send(&self, workload: &str, req: SendRequest) -> Result<SendReply, ApiError> {
        let id = format!(
            "cmd-{}",
            self.inner.next_command.fetch_add(1, Ordering::Relaxed)
        );
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let workloads = self.inner.workloads.lock().await;
            let Some(running) = workloads.running.get(workload) else {
                return Err(if let Some(parked) = workloads.stopped.get(workload) {
                    ApiError::unavailable(format!(
                        "workload {workload:?} is {}",
                        parked.status.state
                    ))
                } else {
                    ApiError::not_found(format!("no workload named {workload:?}"))
                });
            };
            let state = running.workload.status().state;
            if state.is_finished() {
                return Err(ApiError::unavailable(format!(
                    "workload {workload:?} is {state} and takes no commands until it is deployed again"
                )));
            }
            running
                .workload
                .try_deliver(
                    Delivery::Command {
                        id: id.clone(),
                        name: req.command,
                        payload: req.payload.into_bytes(),
                        hub: None,
                    },
                    Some(reply_tx),
                )
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
        }
        match tokio::time::timeout(REPLY_TIMEOUT, reply_rx).await {
            Ok(Ok(Ok(reply))) => Ok(SendReply {
                id,
                reply: reply.map(|r| String::from_utf8_lossy(&r).into_owned()),
            }),
            Ok(Ok(Err(message))) => Err(ApiError::unavailable(format!(
                "workload {workload:?} did not handle command {id}: {message}"
            ))),
            Ok(Err(_)) => Err(ApiError::unavailable(format!(
                "workload {workload:?} dropped command {id} (it stopped or restarted)"
            ))),
            Err(_) => Err(ApiError::unavailable(format!(
                "workload {workload:?} did not answer command {id} within {REPLY_TIMEOUT:?}"
            ))),
        }
    }

    async fn stop(&self, workload: &str) -> Result<(), ApiError> {
        let mut workloads = self.inner.workloads.lock().await;
        let Some(running) = workloads.running.remove(workload) else {
            return if workloads.stopped.contains_key(workload) {
                Ok(())
            } else {
                Err(ApiError::not_found(format!(
                    "no workload named {workload:?}"
                )))
            };
        };
        let tier = running.tier;
        let before = running.workload.status();
        running.workload.stop().await;
        let mut status = to_api_status(workload, tier, before);
        status.source = running.source.as_str().into();
        status.labels = running.labels.0.clone();
        status.state = WorkloadState::Stopped;
        status.memory_bytes = 0;
        status.pids = None;
        status.uptime_ms = None;
        workloads
            .stopped
            .insert(workload.to_string(), Parked { status });
        Ok(())
    }

    async fn doctor(&self) -> DoctorReport {
        // The first report runs the probes (trial containers, a trial KVM boot of up to 5 s):
        // off the async workers.
        let board = self.inner.board.clone();
        let engine = *self.inner.ctx.engine.options();
        let agent = self.clone();
        let hooks = agent
            .inner
            .doctor_checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match tokio::task::spawn_blocking(move || {
            let mut report = crate::doctor::report(&board, Some(&engine));
            report.checks.extend(hooks.iter().map(|hook| hook(&agent)));
            report
        })
        .await
        {
            Ok(report) => report,
            Err(err) => DoctorReport {
                version: env!("CARGO_PKG_VERSION").into(),
                board: self.inner.board.clone(),
                checks: vec![crate::api::types::DoctorCheck {
                    name: "doctor".into(),
                    status: "warn".into(),
                    detail: format!("the probe task failed: {err}"),
                }],
            },
        }
    }

    async fn import(
        &self,
        req: crate::api::types::ImportRequest,
    ) -> Result<crate::api::types::ImportReport, ApiError> {
        self.imports().import_bundle(req).await
    }

    fn metrics_text(&self) -> String {
        // Scrapes must not wait on a deploy: read what is available without blocking.
        let statuses: Vec<WorkloadStatus> = match self.inner.workloads.try_lock() {
            Ok(w) => w.running.values().map(Self::status_of).collect(),
            Err(_) => Vec::new(),
        };
        self.inner.ctx.metrics.render(&self.gauges(&statuses))
    }
}

impl Agent {
    /// The event queue of `workload`, if it takes commands now: an unknown, stopped, failed or
    /// completed workload, or one of a kind that takes no events, is an error naming it. The
    /// hub link queues its commands here, waiting for room rather than failing when full.
    pub async fn command_queue(&self, workload: &str) -> Result<EventSender, ApiError> {
        let workloads = self.inner.workloads.lock().await;
        let Some(running) = workloads.running.get(workload) else {
            return Err(if workloads.stopped.contains_key(workload) {
                ApiError::unavailable(format!("workload {workload:?} is stopped"))
            } else {
                ApiError::not_found(format!("no workload named {workload:?}"))
            });
        };
        let status = running.workload.status();
        if status.state.is_finished() {
            return Err(ApiError::unavailable(format!(
                "workload {workload:?} is {} and takes no commands until it is deployed again",
                status.state
            )));
        }
        running.workload.event_sender().ok_or_else(|| {
            ApiError::unavailable(format!(
                "workload {workload:?} is a {}: it takes no commands",
                status.kind
            ))
        })
    }

    /// Queues an event for a workload without waiting for a reply (benchmarks, tests).
    pub async fn inject(&self, workload: &str, delivery: Delivery) -> Result<(), ApiError> {
        let workloads = self.inner.workloads.lock().await;
        let running = workloads
            .running
            .get(workload)
            .ok_or_else(|| ApiError::not_found(format!("no workload named {workload:?}")))?;
        running
            .workload
            .deliver(delivery, None)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))
    }

    /// Direct event queues of running workloads, in the order of `names` (benchmarks).
    pub async fn event_senders(&self, names: &[String]) -> Result<Vec<EventSender>, ApiError> {
        let workloads = self.inner.workloads.lock().await;
        names
            .iter()
            .map(|name| {
                workloads
                    .running
                    .get(name)
                    .and_then(|r| r.workload.event_sender())
                    .ok_or_else(|| ApiError::not_found(format!("no wasm workload named {name:?}")))
            })
            .collect()
    }
}
