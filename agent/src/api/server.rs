//! HTTP server of the local API.
//!
//! [`serve_unix`] answers JSON requests on a Unix socket that only its owner may open (mode
//! 0600); [`serve_metrics`] answers `GET /metrics` on TCP for Prometheus. Both call into a
//! [`Control`], which the agent implements; this module only routes, decodes and maps errors:
//!
//! | route | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/deploy` | [`DeployRequest`] | [`DeployReport`] |
//! | `POST /v1/import` | [`ImportRequest`](crate::api::types::ImportRequest) | [`ImportReport`](crate::api::types::ImportReport) |
//! | `GET /v1/workloads` | | `[WorkloadStatus]` |
//! | `GET /v1/workloads/{name}/logs?tail=N` | | `[LogLine]` |
//! | `GET /v1/workloads/{name}/logs?tail=N&follow=true` | | NDJSON stream of [`LogLine`] |
//! | `GET /v1/workloads/{name}/kv[?key=K]` | | `[KvEntry]` |
//! | `GET /v1/events?after=ID&limit=N` | | `[EventRecord]` |
//! | `POST /v1/workloads/{name}/send` | [`SendRequest`] | [`SendReply`] |
//! | `POST /v1/workloads/{name}/stop` | | `{}` |
//! | `GET /v1/doctor` | | [`DoctorReport`] |
//!
//! Every failure is an [`ApiError`] body with the status [`status_for`] gives its code.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Frame;
use serde::Deserialize;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};

use super::control::Control;
use super::types::{
    ApiError, DeployReport, DeployRequest, DoctorReport, ErrorCode, EventRecord, KvEntry, LogLine,
    SendReply, SendRequest, WorkloadStatus,
};

/// Largest request body the API reads: 16 MiB, room for the largest deployment
/// ([`DeploymentSpec::MAX_TEXT_BYTES`](crate::deployment::DeploymentSpec::MAX_TEXT_BYTES), 4 MiB)
/// after JSON escaping. A larger body is refused with an `invalid` error naming the limit.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Log lines `logs` returns when the request names no `tail`.
pub const DEFAULT_TAIL: usize = 100;
/// Events `events` returns when the request names no `limit`.
pub const DEFAULT_EVENT_LIMIT: usize = 100;
/// Most events one `events` request returns, whatever `limit` asks.
pub const MAX_EVENT_LIMIT: usize = 10_000;
/// Content type of the `logs?follow=true` stream: one JSON document per line.
pub const NDJSON: &str = "application/x-ndjson";
/// Content type of `/metrics` (Prometheus text exposition format).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// HTTP status of an [`ApiError`] code: `invalid` 400, `not-found` 404, `unavailable` 409,
/// anything else (`internal`) 500.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Invalid => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Unavailable => StatusCode::CONFLICT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_for(self.code), Json(self)).into_response()
    }
}

/// Serves the local API on the Unix socket `socket` until `shutdown` completes.
///
/// Creates the socket's parent directory if needed. If `socket` exists and no daemon answers on
/// it (left over from a crash), the stale file is removed; if a daemon answers, this fails
/// without touching it. The socket gets mode 0600 before the first connection is accepted (the
/// moment between `bind` and `chmod` is covered by the parent directory being the daemon's own,
/// as `/run/lichen` and `$XDG_RUNTIME_DIR` are). On shutdown, open `logs --follow` streams end,
/// in-flight requests finish, and the socket file is removed.
pub async fn serve_unix<C: Control>(
    control: C,
    socket: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_bound(control, bind(socket).await?, shutdown).await
}

/// A bound, private API socket not yet served; its file is removed when it is dropped.
///
/// The daemon binds before it restores any workload, so a second daemon on the same socket
/// stops before starting anything; connections wait in the backlog until it serves.
pub struct BoundSocket {
    listener: UnixListener,
    path: RemoveOnDrop,
}

impl BoundSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path.0
    }
}

/// Binds the API socket `socket` as [`serve_unix`] does, without serving it yet.
pub async fn bind(socket: &Path) -> anyhow::Result<BoundSocket> {
    let listener = bind_unix(socket).await?;
    Ok(BoundSocket {
        listener,
        path: RemoveOnDrop(socket.to_path_buf()),
    })
}

/// Serves the local API on a socket bound by [`bind`] until `shutdown` completes.
pub async fn serve_bound<C: Control>(
    control: C,
    bound: BoundSocket,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let BoundSocket {
        listener,
        path: _remove_on_exit,
    } = bound;
    let socket = _remove_on_exit.0.clone();
    let socket = socket.as_path();
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = router(AppState {
        control,
        shutdown: stop_rx,
    });
    tracing::info!(socket = %socket.display(), "local API listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Ends the follow streams, which graceful shutdown would otherwise wait for.
            let _ = stop_tx.send(true);
        })
        .await
        .with_context(|| format!("serving the local API on {}", socket.display()))
}

/// Serves `GET /metrics` (the [`Control::metrics_text`], content type
/// [`METRICS_CONTENT_TYPE`]) on TCP `addr` until `shutdown` completes.
pub async fn serve_metrics<C: Control>(
    control: C,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let app = Router::new()
        .route("/metrics", get(metrics::<C>))
        .fallback(fallback)
        .with_state(control);
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .with_context(|| format!("serving metrics on {addr}"))
}

/// Binds `socket`, replacing a stale socket file, and makes it private to its owner.
async fn bind_unix(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("creating the socket directory {}", parent.display()))?;
    }
    match tokio::fs::symlink_metadata(socket).await {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket; remove it or choose another path with --socket",
            socket.display()
        ),
        Ok(_) => match UnixStream::connect(socket).await {
            Ok(_) => bail!(
                "another lichen daemon is already listening on {}; stop it first or choose \
                 another path with --socket",
                socket.display()
            ),
            Err(err) => {
                tracing::info!(socket = %socket.display(), %err, "removing stale socket");
                tokio::fs::remove_file(socket)
                    .await
                    .with_context(|| format!("removing the stale socket {}", socket.display()))?;
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("inspecting {}", socket.display()));
        }
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the local API socket {}", socket.display()))?;
    if let Err(err) =
        tokio::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).await
    {
        drop(RemoveOnDrop(socket.to_path_buf()));
        return Err(err).with_context(|| format!("setting mode 0600 on {}", socket.display()));
    }
    Ok(listener)
}

/// Removes a socket file when dropped, so that it goes away however serving ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(socket = %self.0.display(), %err, "cannot remove the API socket");
        }
    }
}

/// What every handler of the Unix API gets.
#[derive(Clone)]
struct AppState<C> {
    control: C,
    /// Becomes `true` (or closes) when the server shuts down; ends follow streams.
    shutdown: watch::Receiver<bool>,
}

fn router<C: Control>(state: AppState<C>) -> Router {
    Router::new()
        .route("/v1/deploy", post(deploy::<C>))
        .route("/v1/import", post(import::<C>))
        .route("/v1/workloads", get(ps::<C>))
        .route("/v1/workloads/{name}/logs", get(logs::<C>))
        .route("/v1/workloads/{name}/kv", get(kv::<C>))
        .route("/v1/workloads/{name}/send", post(send::<C>))
        .route("/v1/workloads/{name}/stop", post(stop::<C>))
        .route("/v1/events", get(events::<C>))
        .route("/v1/doctor", get(doctor::<C>))
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

/// Turns axum's plain-text body rejection into an `invalid` [`ApiError`].
fn body_error(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::invalid(too_large_message());
    }
    ApiError::invalid(format!("malformed request body: {}", rejection.body_text()))
}

/// What a request over [`MAX_REQUEST_BYTES`] is told (the client says the same before it
/// sends one).
pub fn too_large_message() -> String {
    format!(
        "the request body is larger than the local API's limit of {} ({MAX_REQUEST_BYTES} \
         bytes); a deployment may be at most {}",
        crate::deployment::show_bytes(MAX_REQUEST_BYTES.try_into().unwrap_or(u64::MAX)),
        crate::deployment::show_bytes(
            crate::deployment::DeploymentSpec::MAX_TEXT_BYTES
                .try_into()
                .unwrap_or(u64::MAX)
        )
    )
}

/// Turns axum's plain-text query rejection into an `invalid` [`ApiError`].
fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::invalid(format!("malformed query string: {}", rejection.body_text()))
}

async fn fallback(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no API route {}", uri.path()))
}

async fn metrics<C: Control>(State(control): State<C>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        control.metrics_text(),
    )
}

async fn deploy<C: Control>(
    State(state): State<AppState<C>>,
    body: Result<Json<DeployRequest>, JsonRejection>,
) -> Result<Json<DeployReport>, ApiError> {
    let Json(req) = body.map_err(body_error)?;
    Ok(Json(state.control.deploy(req).await?))
}

async fn import<C: Control>(
    State(state): State<AppState<C>>,
    body: Result<Json<crate::api::types::ImportRequest>, JsonRejection>,
) -> Result<Json<crate::api::types::ImportReport>, ApiError> {
    let Json(req) = body.map_err(body_error)?;
    Ok(Json(state.control.import(req).await?))
}

async fn ps<C: Control>(State(state): State<AppState<C>>) -> Json<Vec<WorkloadStatus>> {
    Json(state.control.ps().await)
}

#[derive(Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    follow: Option<bool>,
}

async fn logs<C: Control>(
    State(state): State<AppState<C>>,
    UrlPath(name): UrlPath<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let tail = query.tail.unwrap_or(DEFAULT_TAIL);
    if query.follow.unwrap_or(false) {
        return follow(state, name, tail).await;
    }
    Ok(Json(state.control.logs(&name, tail).await?).into_response())
}

/// Streams the last `tail` lines, then new lines, as NDJSON until the client goes away or the
/// server shuts down.
async fn follow<C: Control>(
    state: AppState<C>,
    name: String,
    tail: usize,
) -> Result<Response, ApiError> {
    // Subscribe before reading the tail so that no line falls between the two; lines that are
    // in both are skipped below.
    let live = state.control.follow_logs(&name)?;
    let backlog = state.control.logs(&name, tail).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(pump_logs(name, backlog, live, tx, state.shutdown.clone()));
    Ok(([(header::CONTENT_TYPE, NDJSON)], Body::new(ChannelBody(rx))).into_response())
}

async fn pump_logs(
    name: String,
    backlog: Vec<LogLine>,
    mut live: broadcast::Receiver<LogLine>,
    tx: mpsc::Sender<Bytes>,
    mut shutdown: watch::Receiver<bool>,
) {
    for line in &backlog {
        if tx.send(ndjson_line(line)).await.is_err() {
            return;
        }
    }
    let last_at = backlog.last().map(|l| l.at_ms);
    let mut dedup = last_at.is_some();
    if *shutdown.borrow() {
        return;
    }
    loop {
        let line = tokio::select! {
            _ = tx.closed() => return,
            _ = shutdown.changed() => return,
            received = live.recv() => match received {
                Ok(line) => line,
                Err(broadcast::error::RecvError::Lagged(skipped)) => lag_line(&name, skipped),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if line.workload != name {
            continue;
        }
        if dedup {
            if last_at.is_some_and(|at| line.at_ms <= at) && backlog.contains(&line) {
                continue;
            }
            dedup = false;
        }
        if tx.send(ndjson_line(&line)).await.is_err() {
            return;
        }
    }
}

/// The line a follower gets in place of lines it fell too far behind to receive.
fn lag_line(workload: &str, skipped: u64) -> LogLine {
    let at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    LogLine {
        at_ms,
        workload: workload.to_string(),
        level: "warn".into(),
        context: "agent".into(),
        message: format!("{skipped} log lines skipped: this reader fell behind"),
    }
}

fn ndjson_line(line: &LogLine) -> Bytes {
    // A LogLine is plain strings and numbers: serialising it cannot fail.
    let mut buf = serde_json::to_vec(line).expect("a LogLine always serialises to JSON");
    buf.push(b'\n');
    Bytes::from(buf)
}

/// A response body fed by a channel; ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

#[derive(Deserialize)]
struct KvQuery {
    key: Option<String>,
}

async fn kv<C: Control>(
    State(state): State<AppState<C>>,
    UrlPath(name): UrlPath<String>,
    query: Result<Query<KvQuery>, QueryRejection>,
) -> Result<Json<Vec<KvEntry>>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    Ok(Json(state.control.kv(&name, query.key.as_deref()).await?))
}

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<i64>,
    limit: Option<usize>,
}

async fn events<C: Control>(
    State(state): State<AppState<C>>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Vec<EventRecord>>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let limit = query
        .limit
        .unwrap_or(DEFAULT_EVENT_LIMIT)
        .min(MAX_EVENT_LIMIT);
    Ok(Json(
        state
            .control
            .events(query.after.unwrap_or(0), limit)
            .await?,
    ))
}

async fn send<C: Control>(
    State(state): State<AppState<C>>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> Result<Json<SendReply>, ApiError> {
    let Json(req) = body.map_err(body_error)?;
    Ok(Json(state.control.send(&name, req).await?))
}

async fn stop<C: Control>(
    State(state): State<AppState<C>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.control.stop(&name).await?;
    Ok(Json(serde_json::json!({})))
}

async fn doctor<C: Control>(State(state): State<AppState<C>>) -> Json<DoctorReport> {
    Json(state.control.doctor().await)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::api::client::{Client, ClientError};
    use crate::api::types::DoctorCheck;

    /// Test double of the agent: canned answers, just enough to exercise routing, decoding and
    /// error mapping. The real agent is tested end to end through the binary.
    #[derive(Clone)]
    struct FakeAgent {
        logs: broadcast::Sender<LogLine>,
        stopped: Arc<Mutex<Vec<String>>>,
    }

    impl FakeAgent {
        fn new() -> Self {
            Self {
                logs: broadcast::channel(16).0,
                stopped: Arc::default(),
            }
        }
    }

    fn line(at_ms: u64, message: &str) -> LogLine {
        LogLine {
            at_ms,
            workload: "door".into(),
            level: "info".into(),
            context: "main".into(),
            message: message.into(),
        }
    }

    fn known(workload: &str) -> Result<(), ApiError> {
        if workload == "door" {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "no workload named \"{workload}\""
            )))
        }
    }

    impl Control for FakeAgent {
        async fn deploy(&self, req: DeployRequest) -> Result<DeployReport, ApiError> {
            if req.text.contains("bad") {
                return Err(ApiError::invalid(format!(
                    "{}:1:1: unknown field `bad`",
                    req.file_name
                )));
            }
            Ok(DeployReport {
                version: 7,
                started: vec!["door".into()],
                ..Default::default()
            })
        }
        async fn ps(&self) -> Vec<WorkloadStatus> {
            vec![WorkloadStatus {
                name: "door".into(),
                kind: "wasm".into(),
                state: "running".into(),
                module_digest: "sha256:00".into(),
                deployment_version: 7,
                restarts: 0,
                traps: 0,
                events_handled: 3,
                queue_depth: 0,
                memory_bytes: 65536,
                uptime_ms: Some(1500),
                last_error: None,
                ..Default::default()
            }]
        }
        async fn logs(&self, workload: &str, tail: usize) -> Result<Vec<LogLine>, ApiError> {
            known(workload)?;
            let all = [line(1, "first"), line(2, "second")];
            Ok(all[all.len().saturating_sub(tail)..].to_vec())
        }
        fn follow_logs(&self, workload: &str) -> Result<broadcast::Receiver<LogLine>, ApiError> {
            known(workload)?;
            Ok(self.logs.subscribe())
        }
        async fn kv(&self, workload: &str, key: Option<&str>) -> Result<Vec<KvEntry>, ApiError> {
            known(workload)?;
            Ok(vec![KvEntry {
                bucket: "default".into(),
                key: key.unwrap_or("opened").into(),
                value: "3".into(),
                size: 1,
            }])
        }
        async fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>, ApiError> {
            Ok((after + 1..)
                .take(limit.min(3))
                .map(|id| EventRecord {
                    id,
                    at_ms: 0,
                    workload: Some("door".into()),
                    kind: "started".into(),
                    detail: String::new(),
                })
                .collect())
        }
        async fn send(&self, workload: &str, req: SendRequest) -> Result<SendReply, ApiError> {
            known(workload)?;
            if req.command == "busy" {
                return Err(ApiError::unavailable("workload \"door\" is backing off"));
            }
            Ok(SendReply {
                id: "cmd-1".into(),
                reply: Some(format!("{}:{}", req.command, req.payload)),
            })
        }
        async fn stop(&self, workload: &str) -> Result<(), ApiError> {
            known(workload)?;
            self.stopped
                .lock()
                .expect("stopped list lock is not poisoned")
                .push(workload.into());
            Ok(())
        }
        async fn doctor(&self) -> DoctorReport {
            DoctorReport {
                version: "test".into(),
                board: "sim".into(),
                checks: vec![DoctorCheck {
                    name: "wasm runtime".into(),
                    status: "ok".into(),
                    detail: "wasmtime".into(),
                }],
            }
        }
        fn metrics_text(&self) -> String {
            "lichen_workloads 1\n".into()
        }
        async fn import(
            &self,
            req: crate::api::types::ImportRequest,
        ) -> Result<crate::api::types::ImportReport, ApiError> {
            // No hub link: the same answer as an agent without a `[hub]` section.
            crate::hub::ImportRoute::default().import_bundle(req).await
        }
    }

    struct Running {
        agent: FakeAgent,
        socket: PathBuf,
        client: Client,
        stop: oneshot::Sender<()>,
        task: JoinHandle<anyhow::Result<()>>,
    }

    impl Running {
        async fn shut_down(self) -> anyhow::Result<()> {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("server stops within 5 s of shutdown")
                .expect("server task does not panic")
        }
    }

    async fn start(socket: PathBuf) -> Running {
        let agent = FakeAgent::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let (served, path) = (agent.clone(), socket.clone());
        let task = tokio::spawn(async move {
            serve_unix(served, &path, async move {
                let _ = stopped.await;
            })
            .await
        });
        let client = Client::new(socket.clone());
        for _ in 0..200 {
            if client.doctor().await.is_ok() {
                return Running {
                    agent,
                    socket,
                    client,
                    stop,
                    task,
                };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not come up on {}", socket.display());
    }

    /// Sends one raw HTTP/1.1 request and returns the status code and body.
    async fn raw(socket: &Path, request: &str) -> (u16, String) {
        let mut stream = UnixStream::connect(socket)
            .await
            .expect("server is listening");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("request is written");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("answer is read");
        let status = answer[9..12].parse().expect("status line has a code");
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn socket_is_private_and_verbs_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = start(dir.path().join("sub/lichen.sock")).await;
        let mode = std::fs::metadata(&run.socket)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let ps = run.client.ps().await.expect("ps");
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].name, "door");
        let report = run
            .client
            .deploy(&DeployRequest {
                file_name: "deploy.toml".into(),
                text: "[workloads.door]".into(),
                base_dir: "/tmp".into(),
            })
            .await
            .expect("deploy");
        assert_eq!(
            (report.version, report.started),
            (7, vec!["door".to_string()])
        );
        let reply = run
            .client
            .send("door", "open", "{\"s\":1}")
            .await
            .expect("send");
        assert_eq!(reply.reply.as_deref(), Some("open:{\"s\":1}"));
        assert_eq!(
            run.client.logs("door", 1).await.expect("logs"),
            vec![line(2, "second")]
        );
        assert_eq!(
            run.client.kv("door", Some("k")).await.expect("kv")[0].key,
            "k"
        );
        let events = run.client.events(5, 2).await.expect("events");
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![6, 7]);
        run.client.stop("door").await.expect("stop");
        assert_eq!(
            *run.agent.stopped.lock().expect("lock"),
            vec!["door".to_string()]
        );

        let socket = run.socket.clone();
        run.shut_down().await.expect("server ends cleanly");
        assert!(!socket.exists(), "socket file is removed on shutdown");
    }

    #[tokio::test]
    async fn api_errors_map_to_statuses_and_reach_the_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = start(dir.path().join("lichen.sock")).await;
        let bad = DeployRequest {
            file_name: "deploy.toml".into(),
            text: "bad = 1".into(),
            base_dir: "/tmp".into(),
        };
        let cases = [
            (
                run.client.deploy(&bad).await.map(|_| ()),
                400,
                "invalid",
                "deploy.toml:1:1",
            ),
            (
                run.client.send("gate", "x", "").await.map(|_| ()),
                404,
                "not-found",
                "gate",
            ),
            (
                run.client.send("door", "busy", "").await.map(|_| ()),
                409,
                "unavailable",
                "backing",
            ),
        ];
        for (result, status, code, text) in cases {
            match result {
                Err(ClientError::Api { status: got, error }) => {
                    assert_eq!((got, error.code.as_str()), (status, code));
                    assert!(error.error.contains(text), "{}", error.error);
                }
                other => panic!("expected an API error, got {other:?}"),
            }
        }
        run.shut_down().await.expect("server ends cleanly");
    }

    #[tokio::test]
    async fn malformed_body_gets_an_api_error_not_plain_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = start(dir.path().join("lichen.sock")).await;
        let body = "{\"file_name\": \"d.toml\"";
        let request = format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: lichen\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, answer) = raw(&run.socket, &request).await;
        assert_eq!(status, 400);
        let error: ApiError = serde_json::from_str(&answer).expect("body is an ApiError");
        assert_eq!(error.code, ErrorCode::Invalid);
        assert!(
            error.error.starts_with("malformed request body"),
            "{}",
            error.error
        );

        let (status, answer) = raw(
            &run.socket,
            "GET /v1/events?after=x HTTP/1.1\r\nHost: lichen\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 400);
        assert!(answer.contains("malformed query string"), "{answer}");
        run.shut_down().await.expect("server ends cleanly");
    }

    #[tokio::test]
    async fn follow_streams_the_tail_then_new_lines_and_ends_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = start(dir.path().join("lichen.sock")).await;
        let mut lines = run.client.follow_logs("door", 1).await.expect("follow");
        let next = async |lines: &mut mpsc::Receiver<Result<LogLine, ClientError>>| {
            tokio::time::timeout(Duration::from_secs(5), lines.recv())
                .await
                .expect("line in 5 s")
        };
        assert_eq!(
            next(&mut lines).await.expect("tail").expect("parses"),
            line(2, "second")
        );
        // Sent after subscription: a duplicate of the tail is skipped, a new line comes through.
        run.agent.logs.send(line(2, "second")).expect("subscribed");
        run.agent.logs.send(line(3, "third")).expect("subscribed");
        assert_eq!(
            next(&mut lines).await.expect("live").expect("parses"),
            line(3, "third")
        );

        run.shut_down()
            .await
            .expect("shutdown is not held up by the follower");
        assert!(
            next(&mut lines).await.is_none(),
            "stream ends when the daemon stops"
        );
    }

    #[tokio::test]
    async fn follower_that_hangs_up_is_unsubscribed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = start(dir.path().join("lichen.sock")).await;
        let lines = run.client.follow_logs("door", 0).await.expect("follow");
        assert_eq!(run.agent.logs.receiver_count(), 1);
        drop(lines);
        for _ in 0..200 {
            if run.agent.logs.receiver_count() == 0 {
                return run.shut_down().await.expect("server ends cleanly");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server still follows the logs for a client that hung up");
    }

    #[tokio::test]
    async fn follow_of_an_unknown_workload_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = start(dir.path().join("lichen.sock")).await;
        let err = run
            .client
            .follow_logs("gate", 10)
            .await
            .expect_err("gate is unknown");
        assert!(
            matches!(err, ClientError::Api { status: 404, .. }),
            "{err:?}"
        );
        run.shut_down().await.expect("server ends cleanly");
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("lichen.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind stale socket"));
        assert!(socket.exists());
        let run = start(socket.clone()).await;
        assert_eq!(
            run.client.ps().await.expect("ps on the new daemon").len(),
            1
        );

        let second = serve_unix(FakeAgent::new(), &socket, async {}).await;
        let message = format!("{:#}", second.expect_err("a live daemon owns the socket"));
        assert!(message.contains("already listening"), "{message}");
        assert!(
            run.client.ps().await.is_ok(),
            "the first daemon is untouched"
        );
        run.shut_down().await.expect("server ends cleanly");
    }

    #[tokio::test]
    async fn no_daemon_gives_a_clear_cannot_reach_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("lichen.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind stale socket"));
        let err = Client::new(socket.clone())
            .ps()
            .await
            .expect_err("nobody listens");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the lichen daemon at {}: is `lichen run` running? \
                 (connection refused)",
                socket.display()
            )
        );
        let missing = Client::new(dir.path().join("nothing.sock")).ps().await;
        let message = missing.expect_err("no socket").to_string();
        assert!(
            message.starts_with("cannot reach the lichen daemon at"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let addr = probe.local_addr().expect("bound address");
        drop(probe);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_metrics(FakeAgent::new(), addr, async move {
            let _ = stopped.await;
        }));
        let mut answer = String::new();
        for _ in 0..200 {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .expect("request is written");
                stream
                    .read_to_string(&mut answer)
                    .await
                    .expect("answer is read");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("content-type: text/plain; version=0.0.4"),
            "{answer}"
        );
        assert!(answer.ends_with("lichen_workloads 1\n"), "{answer}");
        let _ = stop.send(());
        task.await
            .expect("no panic")
            .expect("metrics server ends cleanly");
    }
}
