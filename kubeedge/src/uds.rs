//! gRPC over Unix sockets, both ways: a lazily connecting client [`Channel`] to a socket path
//! that counts the connections it opens and closes (so the uplink notices that EdgeCore went
//! away or restarted, even while idle), and a listener for the mapper's own socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};

/// Connections a [`channel`] opened and closed: a connection that closed (the server went
/// away or restarted) means the server may have forgotten the client.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Connections opened.
    pub opened: AtomicU64,
    /// Connections closed (by either side).
    pub closed: AtomicU64,
}

impl LinkCounters {
    /// `(opened, closed)` now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.opened.load(Ordering::SeqCst),
            self.closed.load(Ordering::SeqCst),
        )
    }
}

/// A Unix stream that counts itself closed when the HTTP/2 layer drops it.
struct Counted {
    stream: UnixStream,
    counters: Arc<LinkCounters>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counters.closed.fetch_add(1, Ordering::SeqCst);
        tracing::debug!("connection closed");
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A channel to the gRPC server on `socket`. It connects on first use and again after the
/// connection is lost; `counters` counts the connections opened and closed.
pub fn channel(socket: &Path, timeout: Duration, counters: Arc<LinkCounters>) -> Channel {
    let socket = socket.to_path_buf();
    // The URI is required by the HTTP/2 layer but never resolved: the connector below dials
    // the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            let counters = counters.clone();
            async move {
                let stream = UnixStream::connect(&socket).await?;
                counters.opened.fetch_add(1, Ordering::SeqCst);
                tracing::debug!(socket = %socket.display(), "connection opened");
                Ok::<_, io::Error>(TokioIo::new(Counted { stream, counters }))
            }
        }))
}

/// Why the mapper's socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
    /// Another process serves on it.
    #[error("another process is already serving on {0}")]
    InUse(PathBuf),
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// Binds `path` for the mapper service: creates its directory, replaces a stale socket file
/// (one no process answers on), refuses a path where a server answers, and gives the socket
/// mode 0600 (EdgeCore runs as root, like the agent).
pub async fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |op, source| BindError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io("creating the directory of", e))?;
    }
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotSocket(path.to_path_buf()));
        }
        Ok(_) => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(BindError::InUse(path.to_path_buf()));
            }
            tokio::fs::remove_file(path)
                .await
                .map_err(|e| io("removing the stale socket", e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| io("binding", e))?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(|e| io("setting mode 0600 on", e))?;
    Ok(listener)
}
