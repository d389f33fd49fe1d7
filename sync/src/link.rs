//! One connection's plumbing: the session opens the TCP (and TLS) connection to the broker
//! itself, and rumqttc reaches it through a private Unix socket, with the [`InboundGuard`]
//! between the two on the way in.
//!
//! rumqttc takes no ready-made stream, only an address; a Unix socket in a directory only this
//! process's user can enter (0700, made fresh for the session, removed with it) is the one
//! address that can carry our filtered stream, and it is unlinked as soon as rumqttc has
//! connected. The cost is one more copy of the bytes through the kernel, small next to TLS.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::tokio_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::task::JoinHandle;

use crate::guard::{InboundGuard, Oversized};

/// A byte stream to the broker, plain or TLS.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// The private directory of a session's Unix socket; removed when dropped.
#[derive(Debug)]
pub(crate) struct SocketDir {
    dir: PathBuf,
    socket: PathBuf,
}

/// Longest base directory used for the socket: a Unix socket path holds at most 107 bytes.
const MAX_BASE_LEN: usize = 64;

impl SocketDir {
    /// Makes a new directory of mode 0700 under `base` (the system's temporary directory when
    /// `None`, or when `base` is too long for a socket path), after removing the directories
    /// that sessions of processes no longer running left there (a `kill -9` skips the cleanup).
    pub(crate) fn create(base: Option<&Path>) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = match base {
            Some(b) if b.as_os_str().len() <= MAX_BASE_LEN => b.to_path_buf(),
            _ => std::env::temp_dir(),
        };
        sweep_stale(&base);
        let mut last = None;
        for _ in 0..100 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("lichen-mqtt-{}-{n}", std::process::id()));
            // `create`, not `create_all`: a directory someone else made first is not ours.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let socket = dir.join("mqtt.sock");
                    return Ok(SocketDir { dir, socket });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free socket directory name")))
    }

    /// The socket's path.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

/// Removes `lichen-mqtt-<pid>-<n>` directories in `base` whose process is gone.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("lichen-mqtt-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            // Another user's directory cannot be removed; that is fine.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens the connection to the broker: TCP, then TLS when `tls` is set, within `timeout`.
/// Errors are in words (rustls's text for a certificate problem).
pub(crate) async fn connect_upstream(
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<Box<dyn Stream>, String> {
    let connect = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = tls else {
            return Ok(Box::new(tcp) as Box<dyn Stream>);
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        Ok(Box::new(stream) as Box<dyn Stream>)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {timeout:?}")))
}

/// Oversized messages the guard refused, oldest first, for the session to match with their
/// stand-ins.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refused(Arc<Mutex<VecDeque<Oversized>>>);

impl Refused {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Oversized>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of the stand-in with sequence `seq`; older records (of stand-ins that never
    /// reached the session) are dropped.
    pub(crate) fn take(&self, seq: u64) -> Option<Oversized> {
        let mut queue = self.lock();
        while let Some(front) = queue.front() {
            if front.seq > seq {
                return None;
            }
            let front = queue.pop_front().expect("front exists");
            if front.seq == seq {
                return Some(front);
            }
        }
        None
    }
}

/// The relay of one connection: runs until either side closes.
pub(crate) struct Relay {
    task: JoinHandle<()>,
    error: Arc<Mutex<Option<String>>>,
    /// What the guard refused.
    pub(crate) refused: Refused,
}

impl Relay {
    /// Accepts rumqttc's connection on `listener` (then unlinks `socket`) and relays between it
    /// and `upstream`, guarding the way in with a `limit`-byte packet limit.
    pub(crate) fn start(
        listener: UnixListener,
        socket: PathBuf,
        upstream: Box<dyn Stream>,
        limit: usize,
    ) -> Relay {
        let error = Arc::new(Mutex::new(None));
        let refused = Refused::default();
        let task = {
            let (error, refused) = (error.clone(), refused.clone());
            tokio::spawn(async move {
                let ended = relay(listener, &socket, upstream, limit, &refused).await;
                if let Err(e) = ended {
                    *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
            })
        };
        Relay {
            task,
            error,
            refused,
        }
    }

    /// Waits up to `within` for the relay to pass on what the client wrote before it closed
    /// its side (the client's event loop must be gone), then ends it.
    pub(crate) async fn finish(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, &mut self.task).await;
    }

    /// Why the relay ended, if it ended on something rumqttc cannot see (a packet the guard
    /// refused to pass, a read error on the broker's side).
    pub(crate) fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the relay ended on its own side.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    /// rumqttc's connection to the local socket did not come.
    #[error("the local MQTT socket failed: {0}")]
    Accept(#[source] io::Error),
    /// The broker's side could not be read.
    #[error("reading from the broker failed: {0}")]
    Read(#[source] io::Error),
    /// The guard refused what the broker sent.
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
}

async fn relay(
    listener: UnixListener,
    socket: &Path,
    upstream: Box<dyn Stream>,
    limit: usize,
    refused: &Refused,
) -> Result<(), RelayError> {
    let (client, _) = listener.accept().await.map_err(RelayError::Accept)?;
    // Nobody else may connect: the path goes as soon as rumqttc is in.
    drop(listener);
    let _ = std::fs::remove_file(socket);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut broker_read, mut broker_write) = tokio::io::split(upstream);
    let outbound = async {
        let _ = tokio::io::copy(&mut client_read, &mut broker_write).await;
        let _ = broker_write.shutdown().await;
        Ok(())
    };
    let inbound = async {
        let mut guard = InboundGuard::new(limit);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(buf.len());
        let mut records = Vec::new();
        loop {
            let n = broker_read.read(&mut buf).await.map_err(RelayError::Read)?;
            if n == 0 {
                return Ok(());
            }
            out.clear();
            guard.feed(&buf[..n], &mut out, &mut records)?;
            if !records.is_empty() {
                refused.lock().extend(records.drain(..));
            }
            if client_write.write_all(&out).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::select! {
        r = outbound => r,
        r = inbound => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_socket_directory_is_private_and_stale_ones_are_swept() {
        let base = tempfile::tempdir().unwrap();
        // pid_max is at most 4194304: this process cannot exist.
        let stale = base.path().join("lichen-mqtt-4294967-0");
        let other = base.path().join("unrelated");
        std::fs::create_dir(&stale).unwrap();
        std::fs::create_dir(&other).unwrap();
        let dir = SocketDir::create(Some(base.path())).unwrap();
        assert!(!stale.exists(), "the directory of a dead process is gone");
        assert!(other.exists(), "nothing else is touched");
        let made = dir.socket().parent().unwrap().to_path_buf();
        assert_eq!(made.parent(), Some(base.path()));
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // A second session of this process gets its own; each goes when dropped.
        let second = SocketDir::create(Some(base.path())).unwrap();
        assert_ne!(second.socket(), dir.socket());
        drop(dir);
        assert!(!made.exists());
        assert!(second.socket().parent().unwrap().exists());
    }

    #[test]
    fn a_base_too_long_for_a_socket_path_falls_back_to_the_temporary_directory() {
        let long = std::path::PathBuf::from(format!("/{}", "x".repeat(100)));
        let dir = SocketDir::create(Some(&long)).unwrap();
        assert!(dir.socket().starts_with(std::env::temp_dir()));
    }
}
