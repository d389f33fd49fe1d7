//! Serving the Task service on the agent's Unix socket, the address `start` hands containerd.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::Server;

use crate::agent::PodAgent;
use crate::service::{Handler, TaskService};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another server answers on the socket.
    #[error("another task server already listens on {0}")]
    InUse(PathBuf),
    /// Creating the directory, removing a stale socket or binding failed.
    #[error("cannot serve on {path}: {message}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The running server; [`TaskServer::shutdown`] stops it and removes its socket.
pub struct TaskServer {
    server: Server,
    socket: PathBuf,
}

impl TaskServer {
    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The address `start` prints for containerd.
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops listening, closes connections (containerd sees them close) and removes the socket.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves `service` on `socket` (mode 0600, its directory created 0700 if missing). A socket
/// file left by a previous run is replaced; one a live server answers on is not.
pub async fn serve<A: PodAgent>(
    socket: &Path,
    service: Arc<TaskService<A>>,
) -> Result<TaskServer, ServeError> {
    let bind_err = |message: String| ServeError::Bind {
        path: socket.to_path_buf(),
        message,
    };
    if let Some(dir) = socket.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).map_err(|e| bind_err(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| bind_err(e.to_string()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ServeError::InUse(socket.to_path_buf()));
        }
        std::fs::remove_file(socket).map_err(|e| bind_err(format!("stale socket: {e}")))?;
    }
    let address = format!("unix://{}", socket.display());
    let mut server = Server::new()
        .bind(&address)
        .map_err(|e| bind_err(e.to_string()))?
        .register_service(create_task(Arc::new(Handler(service))));
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| bind_err(e.to_string()))?;
    server.start().await.map_err(|e| bind_err(e.to_string()))?;
    Ok(TaskServer {
        server,
        socket: socket.to_path_buf(),
    })
}
