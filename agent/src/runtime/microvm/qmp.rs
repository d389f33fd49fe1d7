//! A small QMP (QEMU Machine Protocol) client: one JSON object per line over QEMU's Unix
//! socket. Lichen uses it to ask the guest to power off (`system_powerdown`, an ACPI power
//! button press), to end QEMU (`quit`), and to learn why QEMU ended (the `SHUTDOWN` event's
//! reason: `guest-shutdown`, `guest-reset`, `guest-panic`, `host-qmp-quit`, ...).

use std::collections::VecDeque;
use std::path::Path;
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

type Reply = oneshot::Sender<Result<(), String>>;

/// A connected QMP session; commands go through a task that also watches for events.
#[derive(Debug, Clone)]
pub(crate) struct Qmp {
    commands: mpsc::Sender<(String, Reply)>,
    shutdown: Arc<OnceLock<ShutdownEvent>>,
}

impl Qmp {
    /// Connects to `socket` (retrying until `deadline`, as QEMU creates it while starting),
    /// reads the greeting and negotiates capabilities.
    pub async fn connect(socket: &Path, deadline: Instant) -> Result<Qmp, String> {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to QMP socket {socket:?}: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let handshake = async {
            let greeting = lines.next_line().await.map_err(|e| e.to_string())?;
            if !greeting.is_some_and(|g| g.contains("\"QMP\"")) {
                return Err("QEMU sent no QMP greeting".to_string());
            }
            write
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let line = lines
                    .next_line()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("QEMU closed QMP during the handshake")?;
                let value: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                if value.get("return").is_some() {
                    return Ok(());
                }
                if let Some(err) = value.get("error") {
                    return Err(format!("qmp_capabilities failed: {err}"));
                }
            }
        };
        tokio::time::timeout(left, handshake)
            .await
            .map_err(|_| format!("QMP handshake on {socket:?} timed out"))?
            .map_err(|e| format!("QMP handshake on {socket:?}: {e}"))?;

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
                            let _ = reply.send(Err(err["desc"]
                                .as_str()
                                .map_or_else(|| err.to_string(), str::to_string)));
                        }
                    }
                    command = rx.recv() => {
                        let Some((name, reply)) = command else { break };
                        let line = format!("{{\"execute\":{}}}\n", Value::from(name));
                        if let Err(e) = write.write_all(line.as_bytes()).await {
                            let _ = reply.send(Err(format!("cannot write to QMP: {e}")));
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
    pub async fn execute(&self, command: &str) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send((command.to_string(), tx))
            .await
            .map_err(|_| "the QMP connection is closed".to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(result)) => result,
            // `quit` may close the socket before its reply arrives.
            Ok(Err(_)) => Err("the QMP connection closed before replying".into()),
            Err(_) => Err(format!("QMP {command} got no reply within 5 s")),
        }
    }

    /// The `SHUTDOWN` event, once QEMU has sent it.
    pub fn shutdown_event(&self) -> Option<ShutdownEvent> {
        self.shutdown.get().cloned()
    }
}
