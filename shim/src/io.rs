//! A task's stdout and stderr: the FIFOs containerd creates and reads (`ctr` prints from them,
//! CRI writes them to the pod's log files).
//!
//! The FIFO is opened read-write and non-blocking: that open never waits for containerd's
//! reader and never fails because the reader is not there yet (a write-only non-blocking open
//! would fail with ENXIO). A write waits at most [`OUTPUT_STALL`] for room in the pipe; past
//! that the bytes are dropped and counted, so a reader that stops reading cannot stall the
//! workload, or the agent, for ever.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

/// Longest a write waits for containerd to drain the FIFO before dropping bytes.
pub const OUTPUT_STALL: Duration = Duration::from_secs(5);
/// How often [`OutputSink::drained`] looks at the pipe's unread count.
pub const DRAIN_CHECK: Duration = Duration::from_millis(2);

/// Why a stdio path cannot be used. Messages name the stream.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A `binary://`, `file://`... log URI.
    #[error("{stream}: {path:?} is a log URI; the lichen runtime writes only to FIFOs")]
    Scheme {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The path given.
        path: String,
    },
    /// Not a FIFO, or cannot be opened.
    #[error("{stream}: cannot open FIFO {path}: {source}")]
    Open {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A terminal was asked for.
    #[error("terminal: the lichen runtime has no TTY for Wasm pods")]
    Terminal,
}

/// The writing end of one containerd FIFO.
#[derive(Clone)]
pub struct OutputSink {
    inner: Arc<Sink>,
}

struct Sink {
    path: PathBuf,
    sender: Mutex<pipe::Sender>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSink")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl OutputSink {
    /// Opens containerd's FIFO at `path` for `stream` (`stdout`/`stderr`); `""` means none.
    /// Must be called inside a tokio runtime.
    pub fn open(stream: &'static str, path: &str) -> Result<Option<Self>, IoError> {
        if path.is_empty() {
            return Ok(None);
        }
        let path = match path.split_once("://") {
            Some(("fifo", rest)) => rest,
            Some(_) => {
                return Err(IoError::Scheme {
                    stream,
                    path: path.to_string(),
                });
            }
            None => path,
        };
        let sender = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(Path::new(path))
            .map_err(|source| IoError::Open {
                stream,
                path: PathBuf::from(path),
                source,
            })?;
        Ok(Some(Self {
            inner: Arc::new(Sink {
                path: PathBuf::from(path),
                sender: Mutex::new(sender),
                dropped: AtomicU64::new(0),
            }),
        }))
    }

    /// Writes `bytes`, waiting at most [`OUTPUT_STALL`] for room. Returns whether everything
    /// was written; what was not is counted in [`OutputSink::dropped`].
    pub async fn write(&self, bytes: &[u8]) -> bool {
        let mut sender = self.inner.sender.lock().await;
        match tokio::time::timeout(OUTPUT_STALL, sender.write_all(bytes)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) if e.kind() == ErrorKind::BrokenPipe => {
                self.count_dropped(bytes.len());
                false
            }
            Ok(Err(_)) | Err(_) => {
                self.count_dropped(bytes.len());
                false
            }
        }
    }

    fn count_dropped(&self, n: usize) {
        self.inner.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Waits, at most `deadline`, until containerd's reader has taken every byte written so far
    /// (the pipe holds nothing unread). Returns whether it did.
    ///
    /// The FIFO is held read-write, so a program can end before containerd's reader has even
    /// opened it; containerd's client stops opening its reader once the task is reported exited,
    /// and bytes still in the pipe would be lost with the last descriptor. Reporting the exit
    /// only after the pipe drained (or the deadline passed) closes that race. The kernel gives a
    /// writer no "drained" notification, so this checks the unread count (FIONREAD) every
    /// [`DRAIN_CHECK`].
    pub async fn drained(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let unread = {
                let sender = self.inner.sender.lock().await;
                rustix::io::ioctl_fionread(&*sender).unwrap_or(0)
            };
            if unread == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(DRAIN_CHECK).await;
        }
    }

    /// Bytes dropped because the FIFO stayed full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The FIFO's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        path
    }

    #[tokio::test]
    async fn opens_before_the_reader_and_the_reader_gets_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdout");
        // No reader yet: the open must neither block nor fail.
        let sink = OutputSink::open("stdout", path.to_str().unwrap())
            .unwrap()
            .unwrap();
        assert!(sink.write(b"hello\n").await);
        let mut reader = pipe::OpenOptions::new().open_receiver(&path).unwrap();
        let mut buf = [0u8; 6];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello\n");
    }

    #[tokio::test]
    async fn drained_waits_for_the_reader_to_take_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdout");
        let sink = OutputSink::open("stdout", path.to_str().unwrap())
            .unwrap()
            .unwrap();
        assert!(sink.drained(Duration::ZERO).await, "nothing written yet");
        assert!(sink.write(b"last words\n").await);
        // No reader: the bytes stay in the pipe and the wait ends at its deadline.
        assert!(!sink.drained(Duration::from_millis(20)).await);
        // A reader that comes late still gets them, and then the pipe is drained.
        let reader = tokio::spawn(async move {
            let mut reader = pipe::OpenOptions::new().open_receiver(&path).unwrap();
            let mut buf = [0u8; 11];
            reader.read_exact(&mut buf).await.unwrap();
            buf
        });
        assert!(sink.drained(Duration::from_secs(60)).await);
        assert_eq!(&reader.await.unwrap(), b"last words\n");
    }

    #[tokio::test]
    async fn empty_path_is_no_output_and_uris_and_plain_files_are_refused() {
        assert!(OutputSink::open("stdout", "").unwrap().is_none());
        let err = OutputSink::open("stderr", "binary:///usr/bin/logger")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("stderr:") && err.contains("log URI"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        let err = OutputSink::open("stdout", file.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("stdout: cannot open FIFO"), "{err}");
    }
}
