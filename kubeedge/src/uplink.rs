//! The link to EdgeCore's `DeviceManagerService`: registration, re-registration, and the
//! report queue drained in order.
//!
//! The uplink registers (`MapperRegister`, protocol `lichen`, with the device list) at start
//! and again whenever EdgeCore may have lost or changed what it knows of the mapper: after a
//! call failed (EdgeCore away) and after the connection it registered on closed or was
//! replaced (EdgeCore stopped or restarted, even while the link was idle: the HTTP/2 layer
//! drops a connection the server closed). Each registration reconciles the devices and models
//! EdgeCore lists. Reports leave the queue oldest first, one call each, and are acknowledged only
//! when EdgeCore answered; while it is away they wait, and the uplink tries again with
//! back-off.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;

use crate::host::DeviceHost;
use crate::mapper::Mapper;
use crate::proto::v1beta1 as pb;
use crate::proto::v1beta1::device_manager_service_client::DeviceManagerServiceClient;
use crate::queue::{Queued, Report, ReportQueue};
use crate::uds::{self, LinkCounters};

/// Reports read from the queue per batch.
const BATCH: usize = 64;
/// Tries of one report that EdgeCore answers with an error other than "unavailable" before
/// it is dropped as one EdgeCore will never take.
const MAX_REFUSALS: u32 = 10;

/// The version sent at registration.
pub const API_VERSION: &str = "v1beta1";

/// What the last successful registration saw of the link: connections opened and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// Connections opened then.
    pub opened: u64,
    /// Connections closed then.
    pub closed: u64,
}

/// Whether the mapper must register (again) before it reports: never registered, or a
/// connection was opened or closed since (EdgeCore went away or restarted).
pub fn must_register(last: Option<Registration>, (opened, closed): (u64, u64)) -> bool {
    last.is_none_or(|r| r.opened != opened || r.closed != closed)
}

/// Whether an error from EdgeCore means the report will never be taken (as opposed to
/// EdgeCore being away, busy or restarting).
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

pub(crate) struct Uplink<H, Q> {
    mapper: Mapper<H, Q>,
    client: DeviceManagerServiceClient<Channel>,
    link: Arc<LinkCounters>,
    registered: Option<Registration>,
    backoff: Duration,
    /// Refusals of the report at the head of the queue (its id and count).
    refusals: (u64, u32),
}

impl<H: DeviceHost, Q: ReportQueue> Uplink<H, Q> {
    pub(crate) fn new(mapper: Mapper<H, Q>) -> Self {
        let link = Arc::new(LinkCounters::default());
        let config = mapper.config();
        let channel = uds::channel(&config.edgecore_socket, config.call_timeout, link.clone());
        Self {
            backoff: config.backoff_initial,
            mapper,
            client: DeviceManagerServiceClient::new(channel),
            link,
            registered: None,
            refusals: (0, 0),
        }
    }

    async fn register(&mut self) -> Result<(), tonic::Status> {
        let config = self.mapper.config();
        let request = pb::MapperRegisterRequest {
            with_data: true,
            mapper: Some(pb::MapperInfo {
                name: config.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                api_version: API_VERSION.to_owned(),
                protocol: crate::plan::PROTOCOL.to_owned(),
                address: config.mapper_socket.as_os_str().as_encoded_bytes().to_vec(),
                state: "ok".to_owned(),
            }),
        };
        // Closes are counted from before the call: a connection that closes after EdgeCore
        // answered (EdgeCore stopping) must cause the next registration. Opens are counted
        // after it: the call itself opens the connection it registers on.
        let (_, closed) = self.link.get();
        let epoch = self.mapper.epoch().await;
        let response = self.client.mapper_register(request).await?.into_inner();
        let (opened, _) = self.link.get();
        self.registered = Some(Registration { opened, closed });
        self.mapper
            .stats()
            .registrations
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            devices = response.device_list.len(),
            models = response.model_list.len(),
            "registered with EdgeCore as the lichen mapper"
        );
        self.mapper
            .reconcile(response.model_list, response.device_list, epoch)
            .await;
        Ok(())
    }

    async fn send(&mut self, report: &Report) -> Result<(), tonic::Status> {
        match report.clone() {
            Report::Twins(r) => self.client.report_device_status(r).await.map(drop),
            Report::State(r) => self.client.report_device_states(r).await.map(drop),
        }
    }

    async fn oldest(&self) -> Vec<Queued> {
        let queue = self.mapper.inner.queue.clone();
        match tokio::task::spawn_blocking(move || queue.oldest(BATCH)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::warn!("{e}");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!("report queue task failed: {e}");
                Vec::new()
            }
        }
    }

    async fn ack(&self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        let queue = self.mapper.inner.queue.clone();
        match tokio::task::spawn_blocking(move || queue.ack_many(&ids)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e} (the report may be sent again)"),
            Err(e) => tracing::warn!("report queue task failed: {e}"),
        }
    }

    /// Sends queued reports until the queue is empty (`Ok`) or EdgeCore fails (`Err`). The
    /// reports of one batch that EdgeCore took are acknowledged together (one write), before
    /// the next batch is read or the error is returned.
    async fn drain(&mut self) -> Result<(), tonic::Status> {
        loop {
            let batch = self.oldest().await;
            if batch.is_empty() {
                return Ok(());
            }
            let mut taken = Vec::with_capacity(batch.len());
            let mut failure = None;
            for queued in batch {
                match self.send(&queued.report).await {
                    Ok(()) => {
                        self.mapper
                            .stats()
                            .reports_sent
                            .fetch_add(1, Ordering::Relaxed);
                        taken.push(queued.id);
                    }
                    Err(status) if !transient(status.code()) => {
                        let count = if self.refusals.0 == queued.id {
                            self.refusals.1 + 1
                        } else {
                            1
                        };
                        self.refusals = (queued.id, count);
                        if count < MAX_REFUSALS {
                            failure = Some(status);
                            break;
                        }
                        tracing::warn!(
                            device = %queued.report.device(),
                            "EdgeCore refused a report {count} times, dropping it: {status}"
                        );
                        self.mapper
                            .stats()
                            .reports_refused
                            .fetch_add(1, Ordering::Relaxed);
                        taken.push(queued.id);
                    }
                    Err(status) => {
                        failure = Some(status);
                        break;
                    }
                }
            }
            self.ack(taken).await;
            if let Some(status) = failure {
                return Err(status);
            }
            if self.must_register() {
                return Ok(());
            }
        }
    }

    fn must_register(&self) -> bool {
        must_register(self.registered, self.link.get())
    }

    /// Runs until the task is aborted.
    pub(crate) async fn run(mut self) {
        let config = self.mapper.config().clone();
        loop {
            let result = if self.must_register() {
                self.register().await
            } else {
                self.drain().await
            };
            match result {
                Ok(()) => {
                    self.backoff = config.backoff_initial;
                    if self.must_register() {
                        continue;
                    }
                    // A push since the drain found the queue empty left a permit: no wake-up
                    // is lost.
                    tokio::select! {
                        () = self.mapper.inner.queued.notified() => {}
                        () = tokio::time::sleep(config.probe_every) => {}
                    }
                }
                Err(status) => {
                    if transient(status.code()) {
                        // EdgeCore away: register again when it is back.
                        self.registered = None;
                    }
                    tracing::debug!("EdgeCore link: {status}; next try in {:?}", self.backoff);
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(config.backoff_max);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_repeated_after_the_connection_closed_or_was_replaced() {
        assert!(must_register(None, (0, 0)));
        let r = Registration {
            opened: 1,
            closed: 0,
        };
        assert!(!must_register(Some(r), (1, 0)));
        assert!(must_register(Some(r), (1, 1)), "EdgeCore went away");
        assert!(must_register(Some(r), (2, 1)), "reconnected");
    }
}
