//! Serving containerd's Task API from the daemon: the task service over [`PodRuntime`] on the
//! socket `[containerd] task-socket` (or `LICHEN_TASK_SOCKET`) names.
//!
//! Pods are optional on a node: when the socket cannot be bound (another agent serves it, no
//! permission on its directory) the daemon says so in its log and in `lichen doctor` and goes
//! on running its deployment.

use std::path::PathBuf;
use std::sync::Arc;

use lichen_shim::{TaskServer, TaskService};

use super::PodRuntime;
use crate::config::ContainerdSection;

/// Whether the task server serves, for `lichen doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskServerState {
    /// Serving on this socket.
    Serving(PathBuf),
    /// `task-server = false`.
    Disabled,
    /// It could not start.
    Failed {
        /// The socket.
        socket: PathBuf,
        /// Why.
        error: String,
    },
}

impl TaskServerState {
    /// `lichen doctor`'s check.
    pub fn doctor_check(&self) -> crate::api::types::DoctorCheck {
        let (status, detail) = match self {
            Self::Serving(socket) => (
                "ok",
                format!(
                    "serving containerd's Task API v2 for Wasm pods on {}",
                    socket.display()
                ),
            ),
            Self::Disabled => (
                "missing",
                "containerd.task-server = false: Wasm pods cannot run on this node".to_string(),
            ),
            Self::Failed { socket, error } => (
                "fail",
                format!(
                    "not serving on {}: {error}; Wasm pods cannot run on this node",
                    socket.display()
                ),
            ),
        };
        crate::api::types::DoctorCheck {
            name: "containerd task server".into(),
            status: status.into(),
            detail,
        }
    }
}

/// Starts the task server as `config` says. Never fails the daemon: a server that cannot
/// start is reported in the returned state.
pub async fn start(
    config: &ContainerdSection,
    pods: Arc<PodRuntime>,
) -> (Option<TaskServer>, TaskServerState) {
    if !config.task_server {
        return (None, TaskServerState::Disabled);
    }
    let socket = config.effective_socket();
    if let Err(e) = crate::config::socket_path_ok(&socket) {
        return (
            None,
            TaskServerState::Failed {
                socket,
                error: e.to_string(),
            },
        );
    }
    let service = Arc::new(TaskService::new(pods));
    match lichen_shim::serve(&socket, service).await {
        Ok(server) => {
            tracing::info!(socket = %socket.display(), "serving containerd's Task API for Wasm pods");
            (Some(server), TaskServerState::Serving(socket))
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "containerd task server not started: Wasm pods cannot run on this node");
            (
                None,
                TaskServerState::Failed {
                    socket,
                    error: e.to_string(),
                },
            )
        }
    }
}

/// `lichen doctor`'s check, run outside the daemon: whether an agent answers on the task
/// socket `config` (or `LICHEN_TASK_SOCKET`) names.
pub fn probe(config: &ContainerdSection) -> crate::api::types::DoctorCheck {
    probe_socket(config.task_server, config.effective_socket())
}

fn probe_socket(enabled: bool, socket: PathBuf) -> crate::api::types::DoctorCheck {
    let state = if !enabled {
        TaskServerState::Disabled
    } else {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(_) => TaskServerState::Serving(socket),
            Err(e) => TaskServerState::Failed {
                error: format!("nothing answers ({e}): is `lichen run` running?"),
                socket,
            },
        }
    };
    state.doctor_check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_says_whether_the_task_server_serves() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("task.sock");
        let check = probe_socket(true, socket.clone());
        assert_eq!(check.status, "fail", "{}", check.detail);
        assert!(check.detail.contains("nothing answers"), "{}", check.detail);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let check = probe_socket(true, socket.clone());
        assert_eq!(check.status, "ok", "{}", check.detail);
        assert!(check.detail.contains(&socket.display().to_string()));
        drop(listener);
        let off = probe_socket(false, socket);
        assert_eq!(off.status, "missing");
        assert!(off.detail.contains("task-server = false"), "{}", off.detail);
    }
}
