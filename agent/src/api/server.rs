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
mod tests;
