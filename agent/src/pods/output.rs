//! A pod program's stdout and stderr, streamed as it writes: each stream is a bounded
//! in-memory pipe whose writing end the program's WASI context holds and whose reading end a
//! forwarder task drains into containerd's FIFO ([`OutputSink`]) and, line by line, into the
//! pod's log.
//!
//! The pipe holds at most [`PIPE_BYTES`]; a program writing faster than the forwarder drains
//! waits (WASI's write readiness), it never grows memory. The FIFO write is bounded in time by
//! the sink itself ([`lichen_shim::io::OUTPUT_STALL`]); a log line is cut at
//! [`MAX_LINE_BYTES`]. The forwarder ends when the program's store is dropped (the pipe's
//! writers go with it), so awaiting it after the run means every byte was forwarded.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use lichen_host_apis::{LogLevel, LogSink};
use lichen_shim::io::OutputSink;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use crate::runtime::wasm::CommandOutput;

/// Bytes one stream's pipe holds before the program's writes wait.
pub const PIPE_BYTES: usize = 64 << 10;
/// Longest log line; a longer run of bytes without a newline is logged in pieces of this size.
pub const MAX_LINE_BYTES: usize = 4 << 10;
/// Bytes the forwarder reads at once.
const CHUNK_BYTES: usize = 8 << 10;

/// The program's end of one stream, handed to its WASI context. Every stream WASI makes of it
/// writes into the same pipe.
#[derive(Clone)]
pub struct PipeOutput {
    writer: Arc<Mutex<DuplexStream>>,
}

/// Makes a stream: its end for the program, and the reading end for [`forward`].
pub fn pipe() -> (PipeOutput, DuplexStream) {
    let (writer, reader) = tokio::io::duplex(PIPE_BYTES);
    (
        PipeOutput {
            writer: Arc::new(Mutex::new(writer)),
        },
        reader,
    )
}

impl IsTerminal for PipeOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PipeOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl PipeOutput {
    fn with<R>(&self, f: impl FnOnce(Pin<&mut DuplexStream>) -> R) -> R {
        // The lock is held only inside one poll, never across an await.
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        f(Pin::new(&mut *writer))
    }
}

impl AsyncWrite for PipeOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.with(|w| w.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|w| w.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // One stream closing must not close the pipe for the program's other handles: the
        // pipe closes when the last handle is dropped with the store.
        Poll::Ready(Ok(()))
    }
}

/// A command pod's stdout and stderr program ends, for the supervisor's command runner
/// ([`CommandOutput`]): handed to the first run, or dropped by [`PodStreams::close`]; either
/// way the pipes close once the program's store is gone.
pub struct PodStreams {
    ends: Mutex<Option<(PipeOutput, PipeOutput)>>,
}

impl PodStreams {
    /// The program ends of a pod's stdout and stderr pipes.
    pub fn new(stdout: PipeOutput, stderr: PipeOutput) -> Self {
        Self {
            ends: Mutex::new(Some((stdout, stderr))),
        }
    }

    fn take(&self) -> Option<(PipeOutput, PipeOutput)> {
        self.ends.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Drops the ends no run took.
    pub fn close(&self) {
        drop(self.take());
    }
}

impl CommandOutput for PodStreams {
    fn attach(&self, builder: &mut WasiCtxBuilder) {
        // A second run (none is made: pods never restart) would get WASI's empty streams.
        if let Some((stdout, stderr)) = self.take() {
            builder.stdout(stdout).stderr(stderr);
        }
    }
}

/// Where one stream's bytes go.
pub struct Destination {
    /// containerd's FIFO, if the task has one for this stream.
    pub sink: Option<OutputSink>,
    /// The pod's log and the name it is kept under.
    pub log: Arc<dyn LogSink + Send + Sync>,
    /// Log name of the pod.
    pub workload: String,
    /// `stdout` or `stderr` (the log line's context).
    pub stream: &'static str,
    /// Level of its log lines.
    pub level: LogLevel,
}

/// Drains `reader` into `to` until every writer is gone. Returns the bytes read.
pub async fn forward(mut reader: impl AsyncRead + Unpin, to: Destination) -> u64 {
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut line: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        let bytes = &chunk[..n];
        if let Some(sink) = &to.sink {
            sink.write(bytes).await;
        }
        for &b in bytes {
            if b == b'\n' {
                emit(&to, &mut line);
            } else {
                line.push(b);
                if line.len() >= MAX_LINE_BYTES {
                    emit(&to, &mut line);
                }
            }
        }
    }
    if !line.is_empty() {
        emit(&to, &mut line);
    }
    total
}

fn emit(to: &Destination, line: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(line);
    to.log.log(&to.workload, to.level, to.stream, &text);
    line.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    struct Lines(Mutex<Vec<String>>);
    impl LogSink for Lines {
        fn log(&self, _workload: &str, _level: LogLevel, _context: &str, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    #[tokio::test]
    async fn lines_are_forwarded_as_written_cut_at_the_bound_and_the_pipe_closes_with_its_writers()
    {
        let (out, reader) = pipe();
        let lines = Arc::new(Lines(Mutex::new(Vec::new())));
        let forwarder = tokio::spawn(forward(
            reader,
            Destination {
                sink: None,
                log: lines.clone(),
                workload: "p".into(),
                stream: "stdout",
                level: LogLevel::Info,
            },
        ));
        let mut a = Pin::from(out.async_stream());
        a.write_all(b"first\n").await.unwrap();
        a.flush().await.unwrap();
        // Forwarded while the writer is still open: streamed, not collected at the end.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while lines.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never forwarded");
            tokio::task::yield_now().await;
        }
        let mut b = Pin::from(out.async_stream());
        b.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).await.unwrap();
        b.write_all(b"\nlast without newline").await.unwrap();
        drop((a, b, out));
        let total = forwarder.await.unwrap();
        assert_eq!(total, (6 + MAX_LINE_BYTES + 10 + 21) as u64);
        let lines = lines.0.lock().unwrap().clone();
        assert_eq!(lines[0], "first");
        assert_eq!(lines[1].len(), MAX_LINE_BYTES);
        assert_eq!(lines[2], "x".repeat(10));
        assert_eq!(lines[3], "last without newline");
    }
}
