//! A small QMP (QEMU Machine Protocol) client: one JSON object per line over QEMU's Unix
//! socket. Lichen uses it to ask the guest to power off (`system_powerdown`, an ACPI power
//! button press), to end QEMU (`quit`), and to learn why QEMU ended (the `SHUTDOWN` event's
//! reason: `guest-shutdown`, `guest-reset`, `guest-panic`, `host-qmp-quit`, ...).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// QEMU's `SHUTDOWN` event: the VM stopped running and (with `-no-reboot`) QEMU will exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShutdownEvent {
    /// Whether the guest caused it (power off, reset, panic).
    pub guest: bool,
    /// QEMU's reason, for example `guest-shutdown`.
    pub reason: String,
}

type Reply = oneshot::Sender<Result<(), QmpError>>;

/// What went wrong talking QMP to QEMU.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    /// The socket did not accept a connection before the deadline.
    #[error("cannot connect to QMP socket {socket:?}: {source}")]
    Connect {
        /// QEMU's QMP socket.
        socket: PathBuf,
        /// The last connection error.
        source: std::io::Error,
    },
    /// The handshake did not end before the deadline.
    #[error("QMP handshake on {socket:?} timed out")]
    HandshakeTimeout {
        /// QEMU's QMP socket.
        socket: PathBuf,
    },
    /// The handshake failed.
    #[error("QMP handshake on {socket:?}: {reason}")]
    Handshake {
        /// QEMU's QMP socket.
        socket: PathBuf,
        /// Why.
        #[source]
        reason: HandshakeError,
    },
    /// QEMU refused a command (its `desc`).
    #[error("{0}")]
    Refused(String),
    /// A command could not be sent.
    #[error("cannot write to QMP: {0}")]
    Write(#[source] std::io::Error),
    /// The session's task has ended.
    #[error("the QMP connection is closed")]
    Closed,
    /// The session ended while a command waited for its reply.
    #[error("the QMP connection closed before replying")]
    ClosedBeforeReply,
    /// No reply in time to the command named.
    #[error("QMP {0} got no reply within 5 s")]
    NoReply(String),
}

/// Why the QMP handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A line that is not JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The first line is not QMP's greeting.
    #[error("QEMU sent no QMP greeting")]
    NoGreeting,
    /// QEMU closed the socket.
    #[error("QEMU closed QMP during the handshake")]
    Closed,
    /// QEMU refused `qmp_capabilities` (its error object).
    #[error("qmp_capabilities failed: {0}")]
    Refused(Value),
}

/// A connected QMP session; commands go through a task that also watches for events.
#[derive(Debug, Clone)]
pub(crate) struct Qmp {
    commands: mpsc::Sender<(String, Reply)>,
    shutdown: Arc<OnceLock<ShutdownEvent>>,
}

impl Qmp {
    /// Connects to `socket` (retrying until `deadline`, as QEMU creates it while starting),
    /// reads the greeting and negotiates capabilities.
    pub async fn connect(socket: &Path, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let handshake = async {
            let greeting = lines.next_line().await?;
            if !greeting.is_some_and(|g| g.contains("\"QMP\"")) {
                return Err(HandshakeError::NoGreeting);
            }
            write
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .await?;
            loop {
                let line = lines.next_line().await?.ok_or(HandshakeError::Closed)?;
                let value: Value = serde_json::from_str(&line)?;
                if value.get("return").is_some() {
                    return Ok(());
                }
                if let Some(err) = value.get("error") {
                    return Err(HandshakeError::Refused(err.clone()));
                }
            }
        };
        tokio::time::timeout(left, handshake)
            .await
            .map_err(|_| QmpError::HandshakeTimeout {
                socket: socket.to_path_buf(),
            })?
            .map_err(|reason| QmpError::Handshake {
                socket: socket.to_path_buf(),
                reason,
            })?;

        let (commands, mut rx) = mpsc::channel::<(String, Reply)>(4);
        let shutdown = Arc::new(OnceLock::new());
        let seen = shutdown.clone();
        tokio::spawn(async move {
            let mut pending: VecDeque<Reply> = VecDeque::new();
            loop {
                tokio::select! {
                    line = lines.next_line() => {
                        let Ok(Some(line)) = line else { break };
                        let Ok(value) = serde_json::from_str::<Value>(&line) else { continue };
                        if value["event"] == "SHUTDOWN" {
                            let _ = seen.set(ShutdownEvent {
                                guest: value["data"]["guest"].as_bool().unwrap_or(false),
                                reason: value["data"]["reason"]
                                    .as_str()
                                    .unwrap_or("unknown")
                                    .to_string(),
                            });
                        } else if value.get("return").is_some() {
                            if let Some(reply) = pending.pop_front() {
                                let _ = reply.send(Ok(()));
                            }
                        } else if let Some(err) = value.get("error")
                            && let Some(reply) = pending.pop_front()
                        {
                            let _ = reply.send(Err(QmpError::Refused(err["desc"]
                                .as_str()
                                .map_or_else(|| err.to_string(), str::to_string))));
                        }
                    }
                    command = rx.recv() => {
                        let Some((name, reply)) = command else { break };
                        let line = format!("{{\"execute\":{}}}\n", Value::from(name));
                        if let Err(e) = write.write_all(line.as_bytes()).await {
                            let _ = reply.send(Err(QmpError::Write(e)));
                            break;
                        }
                        pending.push_back(reply);
                    }
                }
            }
        });
        Ok(Qmp { commands, shutdown })
    }

    /// Runs a QMP command without arguments (`system_powerdown`, `quit`) and waits for its reply.
    pub async fn execute(&self, command: &str) -> Result<(), QmpError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send((command.to_string(), tx))
            .await
            .map_err(|_| QmpError::Closed)?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(result)) => result,
            // `quit` may close the socket before its reply arrives.
            Ok(Err(_)) => Err(QmpError::ClosedBeforeReply),
            Err(_) => Err(QmpError::NoReply(command.to_string())),
        }
    }

    /// The `SHUTDOWN` event, once QEMU has sent it.
    pub fn shutdown_event(&self) -> Option<ShutdownEvent> {
        self.shutdown.get().cloned()
    }
}
