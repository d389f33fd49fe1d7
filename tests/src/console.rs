//! A QEMU serial console as the board and guest fixtures read it: reader threads copy QEMU's
//! stdout and stderr (without carriage returns) into one shared text and into a log file, and
//! [`SerialConsole::wait`] sleeps until the text shows what a caller looks for, QEMU exits, or
//! a hang guard passes (each new chunk wakes it: no polling).

use std::io::{Read, Write};
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Console bytes seen so far, shared with the reader threads.
#[derive(Default)]
struct Text {
    text: String,
    closed: bool,
}

/// The console of one QEMU process.
#[derive(Clone, Default)]
pub struct SerialConsole(Arc<(Mutex<Text>, Condvar)>);

/// How much of the console a failure message shows.
const TAIL_BYTES: usize = 4000;

impl SerialConsole {
    /// The console of a QEMU `child` spawned with stdout and stderr piped: both read, each by a
    /// thread of its own, into the console and into `log`.
    pub fn of_child(child: &mut Child, log: &std::fs::File) -> Result<Self> {
        let stdout = child.stdout.take().context("QEMU's stdout was not piped")?;
        let stderr = child.stderr.take().context("QEMU's stderr was not piped")?;
        Self::attach(vec![Box::new(stdout), Box::new(stderr)], log)
    }

    /// Starts one reader thread per stream, each copying into the console and into `log`.
    pub fn attach(streams: Vec<Box<dyn Read + Send>>, log: &std::fs::File) -> Result<Self> {
        let console = SerialConsole::default();
        for stream in streams {
            let shared = console.clone();
            let mut log = log.try_clone().context("cannot share the console log")?;
            std::thread::spawn(move || shared.pump(stream, &mut log));
        }
        Ok(console)
    }

    /// Everything the console has shown so far.
    pub fn text(&self) -> String {
        self.0.0.lock().expect("console lock").text.clone()
    }

    /// The last `bytes` of the console, for failure messages.
    pub fn tail(&self, bytes: usize) -> String {
        tail(&self.0.0.lock().expect("console lock").text, bytes)
    }

    /// Waits until `found` returns something for the console's text; fails, with the console's
    /// tail, if QEMU exits first or nothing is found within `guard`. `what` names what is
    /// awaited in that message.
    pub fn wait<T>(
        &self,
        what: &str,
        guard: Duration,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + guard;
        let (lock, cond) = &*self.0;
        let mut console = lock.lock().expect("console lock");
        loop {
            if let Some(value) = found(&console.text) {
                return Ok(value);
            }
            if console.closed {
                bail!(
                    "QEMU exited while waiting for {what}; console:\n{}",
                    tail(&console.text, TAIL_BYTES)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "no {what} after {guard:?}; console:\n{}",
                    tail(&console.text, TAIL_BYTES)
                );
            }
            console = cond
                .wait_timeout(console, deadline - now)
                .expect("console lock")
                .0;
        }
    }

    /// Copies `stream` into the console and `log` until it ends, then marks the console closed.
    fn pump(&self, mut stream: Box<dyn Read + Send>, log: &mut std::fs::File) {
        let (lock, cond) = &*self.0;
        let mut buf = [0u8; 4096];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let _ = log.write_all(&buf[..n]);
            let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            lock.lock().expect("console lock").text.push_str(&text);
            cond.notify_all();
        }
        lock.lock().expect("console lock").closed = true;
        cond.notify_all();
    }
}

/// The last `bytes` (or fewer) of `text`, cut at a character boundary.
fn tail(text: &str, bytes: usize) -> String {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// A command run on a console's shell: its exit status and its output.
pub(crate) type ShellRun = Result<(i32, String)>;

/// Runs `command` through `run` and fails unless it exits with 0; returns its output trimmed.
/// The board's and the guest's `sh`.
pub(crate) fn sh_ok(run: impl FnOnce(&str) -> ShellRun, command: &str) -> Result<String> {
    let (status, output) = run(command)?;
    if status != 0 {
        bail!("{command:?} exited with {status}:\n{output}");
    }
    Ok(output.trim().to_string())
}

/// Runs `command` through `run` every `pace` until `done` holds for its trimmed output (which
/// it returns), failing after `guard` with `what` and the last output. The board's and the
/// guest's `wait_until`.
pub(crate) fn poll_until(
    mut run: impl FnMut(&str) -> ShellRun,
    command: &str,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
    guard: Duration,
    pace: Duration,
) -> Result<String> {
    let deadline = Instant::now() + guard;
    loop {
        let (_, output) = run(command)?;
        let output = output.trim().to_string();
        if done(&output) {
            return Ok(output);
        }
        if Instant::now() >= deadline {
            bail!("{what}: never happened; the last output of {command:?} was:\n{output}");
        }
        std::thread::sleep(pace);
    }
}
