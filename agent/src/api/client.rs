//! Client of the local API, used by the CLI verbs.
//!
//! One HTTP/1.1 connection over the Unix socket per request: the CLI makes one or two requests
//! per run, so there is nothing to gain from pooling.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lichen_agent::api::client::ClientError> {
//! use lichen_agent::api::client::Client;
//! let client = Client::new("/run/lichen/lichen.sock".into());
//! for workload in client.ps().await? {
//!     println!("{} {}", workload.name, workload.state);
//! }
//! # Ok(())
//! # }
//! ```

use std::io;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::types::{
    ApiError, DeployReport, DeployRequest, DoctorReport, EventRecord, KvEntry, LogLine, SendReply,
    SendRequest, WorkloadStatus,
};

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket: the daemon is not running, or runs elsewhere.
    #[error("cannot reach the lichen daemon at {}: is `lichen run` running? ({reason})", socket.display())]
    Unreachable {
        /// The socket that was tried.
        socket: PathBuf,
        /// What connecting said, in words (`connection refused`, `no such socket`, ...).
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{}", error.error)]
    Api {
        /// HTTP status of the answer.
        status: u16,
        /// The error the daemon gave: its code and message.
        error: ApiError,
    },
    /// The connection broke during the request.
    #[error("connection to the lichen daemon at {} failed: {message}", socket.display())]
    Connection {
        /// The socket of the daemon.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The daemon answered something this client does not understand (a version mismatch?).
    #[error("unexpected answer from the lichen daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The daemon's error, if the daemon answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Self::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A client of one daemon's local API.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`; nothing is connected until a request.
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /v1/deploy`: validates and applies a deployment. A text over
    /// [`DeploymentSpec::MAX_TEXT_BYTES`](crate::deployment::DeploymentSpec::MAX_TEXT_BYTES) is
    /// refused here, with the daemon's own message, without being sent.
    pub async fn deploy(&self, req: &DeployRequest) -> Result<DeployReport, ClientError> {
        let max = crate::deployment::DeploymentSpec::MAX_TEXT_BYTES;
        if req.text.len() > max {
            return Err(ClientError::Api {
                status: 400,
                error: ApiError::invalid(format!(
                    "{}: the deployment is {} bytes long; the largest accepted is {} ({max} bytes)",
                    req.file_name,
                    req.text.len(),
                    crate::deployment::show_bytes(max.try_into().unwrap_or(u64::MAX)),
                )),
            });
        }
        self.call(Method::POST, "/v1/deploy".into(), Some(req))
            .await
    }

    /// `POST /v1/import`: verifies and applies a deployment bundle on the node's disk.
    pub async fn import(
        &self,
        req: &crate::api::types::ImportRequest,
    ) -> Result<crate::api::types::ImportReport, ClientError> {
        self.call(Method::POST, "/v1/import".into(), Some(req))
            .await
    }

    /// `GET /v1/workloads`: the status of every workload.
    pub async fn ps(&self) -> Result<Vec<WorkloadStatus>, ClientError> {
        self.call(Method::GET, "/v1/workloads".into(), None::<&()>)
            .await
    }

    /// `GET /v1/workloads/{name}/logs`: the last `tail` log lines of a workload.
    pub async fn logs(&self, name: &str, tail: usize) -> Result<Vec<LogLine>, ClientError> {
        let path = format!("/v1/workloads/{}/logs?tail={tail}", encode(name));
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `GET /v1/workloads/{name}/logs?follow=true`: the last `tail` lines, then new lines as
    /// they are written. The receiver ends when the daemon closes the stream; dropping it closes
    /// the connection.
    pub async fn follow_logs(
        &self,
        name: &str,
        tail: usize,
    ) -> Result<mpsc::Receiver<Result<LogLine, ClientError>>, ClientError> {
        let path = format!(
            "/v1/workloads/{}/logs?tail={tail}&follow=true",
            encode(name)
        );
        let response = self.request(Method::GET, path, None).await?;
        if !response.status().is_success() {
            return Err(self.error_from(response).await);
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(read_ndjson(response.into_body(), tx, self.socket.clone()));
        Ok(rx)
    }

    /// `GET /v1/workloads/{name}/kv`: a workload's key-value entries, or only `key`.
    pub async fn kv(&self, name: &str, key: Option<&str>) -> Result<Vec<KvEntry>, ClientError> {
        let mut path = format!("/v1/workloads/{}/kv", encode(name));
        if let Some(key) = key {
            path.push_str("?key=");
            path.push_str(&encode(key));
        }
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `GET /v1/events`: lifecycle events with an id above `after`, at most `limit`.
    pub async fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>, ClientError> {
        let path = format!("/v1/events?after={after}&limit={limit}");
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST /v1/workloads/{name}/send`: delivers a command and waits for the reply.
    pub async fn send(
        &self,
        name: &str,
        command: &str,
        payload: &str,
    ) -> Result<SendReply, ClientError> {
        let req = SendRequest {
            command: command.into(),
            payload: payload.into(),
        };
        let path = format!("/v1/workloads/{}/send", encode(name));
        self.call(Method::POST, path, Some(&req)).await
    }

    /// `POST /v1/workloads/{name}/stop`: stops a workload until the next deploy.
    pub async fn stop(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/workloads/{}/stop", encode(name));
        let _: serde_json::Value = self.call(Method::POST, path, None::<&()>).await?;
        Ok(())
    }

    /// `GET /v1/doctor`: what the daemon's host can run.
    pub async fn doctor(&self) -> Result<DoctorReport, ClientError> {
        self.call(Method::GET, "/v1/doctor".into(), None::<&()>)
            .await
    }

    /// One request with an optional JSON body, answered by a JSON document.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|err| ClientError::Protocol(format!("cannot encode the request: {err}")))?;
        // The daemon would stop reading and close: say why before sending, as it would.
        if body
            .as_ref()
            .is_some_and(|body| body.len() > super::server::MAX_REQUEST_BYTES)
        {
            return Err(ClientError::Api {
                status: 413,
                error: ApiError::invalid(super::server::too_large_message()),
            });
        }
        let response = self.request(method, path, body).await?;
        if !response.status().is_success() {
            return Err(self.error_from(response).await);
        }
        let bytes = self.collect(response).await?;
        serde_json::from_slice(&bytes).map_err(|err| ClientError::Protocol(err.to_string()))
    }

    async fn request(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|err| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    reason: connect_reason(&err),
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| self.broken(err))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "API connection ended with an error");
            }
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "lichen");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| ClientError::Protocol(format!("cannot build the request: {err}")))?;
        sender
            .send_request(request)
            .await
            .map_err(|err| self.broken(err))
    }

    async fn collect(&self, response: Response<Incoming>) -> Result<Bytes, ClientError> {
        Ok(response
            .into_body()
            .collect()
            .await
            .map_err(|err| self.broken(err))?
            .to_bytes())
    }

    /// The [`ClientError`] of a non-success answer: its [`ApiError`] body, or a made-up one
    /// from the status and text if the body is not one.
    async fn error_from(&self, response: Response<Incoming>) -> ClientError {
        let status = response.status();
        let bytes = match self.collect(response).await {
            Ok(bytes) => bytes,
            Err(err) => return err,
        };
        let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(&bytes);
            ApiError::internal(format!("HTTP {status}: {}", text.trim()))
        });
        ClientError::Api {
            status: status.as_u16(),
            error,
        }
    }

    fn broken(&self, err: hyper::Error) -> ClientError {
        ClientError::Connection {
            socket: self.socket.clone(),
            message: err.to_string(),
        }
    }
}

/// Reads an NDJSON body line by line into `tx` until the body ends or the receiver goes away.
async fn read_ndjson(
    mut body: Incoming,
    tx: mpsc::Sender<Result<LogLine, ClientError>>,
    socket: PathBuf,
) {
    let mut buffer = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = tx.closed() => return,
            frame = body.frame() => frame,
        };
        let data = match frame {
            None => break,
            Some(Err(err)) => {
                let message = err.to_string();
                let _ = tx
                    .send(Err(ClientError::Connection { socket, message }))
                    .await;
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if !send_parsed(&tx, &line).await {
                return;
            }
        }
    }
    send_parsed(&tx, &buffer).await;
}

/// Parses one NDJSON line (blank lines are skipped) and sends it; false once nobody listens.
async fn send_parsed(tx: &mpsc::Sender<Result<LogLine, ClientError>>, line: &[u8]) -> bool {
    if line.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    let parsed = serde_json::from_slice(line)
        .map_err(|err| ClientError::Protocol(format!("bad log line in the stream: {err}")));
    tx.send(parsed).await.is_ok()
}

/// What a failed connect means, in the words the user sees.
fn connect_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::NotFound => "no such socket".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied: the socket is private to the user running the daemon".into()
        }
        _ => err.to_string(),
    }
}

/// Percent-encodes a path segment or query value (everything but RFC 3986 unreserved bytes).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn names_and_keys_are_percent_encoded() {
        assert_eq!(encode("door-1.a_b~"), "door-1.a_b~");
        assert_eq!(encode("a b/c?d&e+é"), "a%20b%2Fc%3Fd%26e%2B%C3%A9");
    }
}
