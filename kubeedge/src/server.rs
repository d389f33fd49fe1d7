//! Lichen's `DeviceMapperService`, which EdgeCore calls on the mapper's socket: each call goes
//! to the [`Mapper`], and a refusal is a gRPC status naming the field
//! (`InvalidArgument`, `NotFound`, `AlreadyExists`, `Unavailable`).

use std::future::Future;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::host::DeviceHost;
use crate::mapper::Mapper;
use crate::plan::ResourceId;
use crate::proto::v1beta1 as pb;
use crate::proto::v1beta1::device_mapper_service_server::{
    DeviceMapperService, DeviceMapperServiceServer,
};
use crate::queue::ReportQueue;

/// Largest request EdgeCore may send, in bytes (a Device with 64 properties and its grants
/// is a few tens of KiB).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The service over a [`Mapper`].
pub struct MapperService<H, Q>(pub Mapper<H, Q>);

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field}: missing"))
}

#[tonic::async_trait]
impl<H: DeviceHost, Q: ReportQueue> DeviceMapperService for MapperService<H, Q> {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let device = request
            .into_inner()
            .device
            .ok_or_else(|| missing("device"))?;
        let id = self.0.register_device(device).await?;
        Ok(Response::new(pb::RegisterDeviceResponse {
            device_name: id.name,
            device_namespace: id.namespace,
        }))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let r = request.into_inner();
        self.0
            .remove_device(&ResourceId::new(&r.device_namespace, &r.device_name))
            .await?;
        Ok(Response::new(pb::RemoveDeviceResponse {}))
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::UpdateDeviceResponse>, Status> {
        let device = request
            .into_inner()
            .device
            .ok_or_else(|| missing("device"))?;
        self.0.update_device(device).await?;
        Ok(Response::new(pb::UpdateDeviceResponse {}))
    }

    async fn create_device_model(
        &self,
        request: Request<pb::CreateDeviceModelRequest>,
    ) -> Result<Response<pb::CreateDeviceModelResponse>, Status> {
        let model = request.into_inner().model.ok_or_else(|| missing("model"))?;
        let id = self.0.create_model(model).await?;
        Ok(Response::new(pb::CreateDeviceModelResponse {
            device_model_name: id.name,
            device_model_namespace: id.namespace,
        }))
    }

    async fn remove_device_model(
        &self,
        request: Request<pb::RemoveDeviceModelRequest>,
    ) -> Result<Response<pb::RemoveDeviceModelResponse>, Status> {
        let r = request.into_inner();
        self.0
            .remove_model(&ResourceId::new(&r.model_namespace, &r.model_name))
            .await;
        Ok(Response::new(pb::RemoveDeviceModelResponse {}))
    }

    async fn update_device_model(
        &self,
        request: Request<pb::UpdateDeviceModelRequest>,
    ) -> Result<Response<pb::UpdateDeviceModelResponse>, Status> {
        let model = request.into_inner().model.ok_or_else(|| missing("model"))?;
        self.0.update_model(model).await?;
        Ok(Response::new(pb::UpdateDeviceModelResponse {}))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        let r = request.into_inner();
        let device = self
            .0
            .get_device(&ResourceId::new(&r.device_namespace, &r.device_name))
            .await?;
        Ok(Response::new(pb::GetDeviceResponse {
            device: Some(device),
        }))
    }
}

/// Serves the mapper service on `listener` until `shutdown` completes.
pub async fn serve<H: DeviceHost, Q: ReportQueue>(
    mapper: Mapper<H, Q>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let service = DeviceMapperServiceServer::new(MapperService(mapper))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
