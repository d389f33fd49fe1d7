//! A STAND-IN for EdgeCore's `DeviceManagerService` (EdgeCore cannot be installed here),
//! written from the same protocol definitions as the mapper (`lichen_kubeedge::proto`). It
//! records every call, answers `MapperRegister` with the devices and models a test gives it,
//! and plays EdgeCore's part towards the mapper (`RegisterDevice`, `UpdateDevice`, ...) through
//! the address the mapper registered, as EdgeCore's DMI client does.
//!
//! Shared by `kubeedge/tests/` and `tests/tests/kubeedge.rs` (included by path).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::proto::v1beta1::device_manager_service_server::{
    DeviceManagerService, DeviceManagerServiceServer,
};
use lichen_kubeedge::proto::v1beta1::device_mapper_service_client::DeviceMapperServiceClient;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// What the stand-in saw and what it answers; survives the stand-in's restarts, as EdgeCore's
/// database does.
#[derive(Default)]
pub struct Record {
    /// Every `MapperRegister` request's mapper info, in order.
    pub registrations: Vec<pb::MapperInfo>,
    /// Every `ReportDeviceStatus` request, in order.
    pub twins: Vec<pb::ReportDeviceStatusRequest>,
    /// Every `ReportDeviceStates` request, in order.
    pub states: Vec<pb::ReportDeviceStatesRequest>,
    /// The devices `MapperRegister` returns.
    pub devices: Vec<pb::Device>,
    /// The models `MapperRegister` returns.
    pub models: Vec<pb::DeviceModel>,
}

/// The shared record and a counter that moves on every call (to wait on, with a deadline).
#[derive(Clone)]
pub struct EdgeCoreState {
    record: Arc<Mutex<Record>>,
    calls: Arc<watch::Sender<u64>>,
}

impl Default for EdgeCoreState {
    fn default() -> Self {
        Self {
            record: Arc::default(),
            calls: Arc::new(watch::channel(0).0),
        }
    }
}

impl EdgeCoreState {
    /// Reads the record.
    pub fn with<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        f(&mut self.record.lock().unwrap())
    }

    /// A receiver that sees every later call.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.calls.subscribe()
    }

    fn called(&self) {
        self.calls.send_modify(|n| *n += 1);
    }

    /// Waits until `done` holds for the record, up to `deadline`; panics with `what` after.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        mut done: impl FnMut(&Record) -> bool,
    ) {
        let mut calls = self.calls.subscribe();
        let result = tokio::time::timeout(deadline, async {
            loop {
                if done(&self.record.lock().unwrap()) {
                    return;
                }
                if calls.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "stand-in EdgeCore: {what} did not happen within {deadline:?}"
        );
    }

    /// The reported values of `property` of device `name`, in the order they arrived.
    pub fn reported(&self, name: &str, property: &str) -> Vec<String> {
        self.with(|r| {
            r.twins
                .iter()
                .filter(|t| t.device_name == name)
                .flat_map(|t| t.reported_device.iter().flat_map(|s| s.twins.iter()))
                .filter(|t| t.property_name == property)
                .filter_map(|t| t.reported.as_ref().map(|p| p.value.clone()))
                .collect()
        })
    }

    /// The states reported for device `name`, in order.
    pub fn states(&self, name: &str) -> Vec<String> {
        self.with(|r| {
            r.states
                .iter()
                .filter(|s| s.device_name == name)
                .map(|s| s.state.clone())
                .collect()
        })
    }
}

struct Service(EdgeCoreState);

#[tonic::async_trait]
impl DeviceManagerService for Service {
    async fn mapper_register(
        &self,
        request: Request<pb::MapperRegisterRequest>,
    ) -> Result<Response<pb::MapperRegisterResponse>, Status> {
        let r = request.into_inner();
        // As EdgeCore: a mapper without a protocol is refused.
        let mapper = r.mapper.ok_or_else(|| Status::unknown("mapper is nil"))?;
        if mapper.protocol.is_empty() {
            return Err(Status::unknown(
                "fail to register mapper because the protocol is nil",
            ));
        }
        let response = self.0.with(|rec| {
            rec.registrations.push(mapper.clone());
            if !r.with_data {
                return pb::MapperRegisterResponse::default();
            }
            pb::MapperRegisterResponse {
                model_list: rec.models.clone(),
                device_list: rec
                    .devices
                    .iter()
                    .filter(|d| {
                        d.spec
                            .as_ref()
                            .and_then(|s| s.protocol.as_ref())
                            .map(|p| p.protocol_name.as_str())
                            == Some(mapper.protocol.as_str())
                    })
                    .cloned()
                    .collect(),
            }
        });
        self.0.called();
        Ok(Response::new(response))
    }

    async fn report_device_status(
        &self,
        request: Request<pb::ReportDeviceStatusRequest>,
    ) -> Result<Response<pb::ReportDeviceStatusResponse>, Status> {
        let r = request.into_inner();
        // As EdgeCore: a report without twins is an error.
        if r.reported_device
            .as_ref()
            .is_none_or(|d| d.twins.is_empty())
        {
            return Err(Status::unknown(
                "ReportDeviceStatusRequest does not have twin data",
            ));
        }
        self.0.with(|rec| rec.twins.push(r));
        self.0.called();
        Ok(Response::new(pb::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<pb::ReportDeviceStatesRequest>,
    ) -> Result<Response<pb::ReportDeviceStatesResponse>, Status> {
        let r = request.into_inner();
        if r.state.is_empty() || r.device_name.is_empty() {
            return Err(Status::unknown("ReportDeviceStatesRequest is invalid data"));
        }
        self.0.with(|rec| rec.states.push(r));
        self.0.called();
        Ok(Response::new(pb::ReportDeviceStatesResponse {}))
    }
}

/// A running stand-in on a Unix socket.
pub struct StandInEdgeCore {
    socket: PathBuf,
    pub state: EdgeCoreState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl StandInEdgeCore {
    /// Serves on `socket` (removing a stale file, as EdgeCore's listener does) with `state`.
    pub async fn start(socket: &Path, state: EdgeCoreState) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener =
            tokio::net::UnixListener::bind(socket).expect("stand-in EdgeCore binds its socket");
        let (stop, stopped) = oneshot::channel::<()>();
        let service = DeviceManagerServiceServer::new(Service(state.clone()));
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .expect("stand-in EdgeCore serves");
        });
        Self {
            socket: socket.to_path_buf(),
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving and removes the socket, as a stopped EdgeCore leaves it.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // The server closes every connection (GOAWAY) before its task ends: the mapper
            // sees EdgeCore gone, as when EdgeCore stops.
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the stand-in EdgeCore stops within 30 s")
                .expect("the stand-in EdgeCore's task ends cleanly");
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A DMI client to the mapper at the address it registered last, as EdgeCore's DMI client
    /// connects to it.
    pub async fn mapper(&self) -> DeviceMapperServiceClient<tonic::transport::Channel> {
        let address = self.state.with(|r| {
            r.registrations
                .last()
                .map(|m| String::from_utf8(m.address.clone()).expect("the address is a path"))
        });
        let address = address.expect("the mapper registered before EdgeCore calls it");
        let channel = lichen_kubeedge::uds::channel(
            Path::new(&address),
            Duration::from_secs(30),
            Arc::default(),
        );
        DeviceMapperServiceClient::new(channel)
    }
}

impl Drop for StandInEdgeCore {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
