//! One task's record: its phase, how it ended, and the waiters for that.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

use containerd_shim_protos::api::Status;
use containerd_shim_protos::ttrpc::{self, Code};
use tokio::sync::{Notify, watch};

use crate::agent::Exit;
use crate::events::EventTarget;
use crate::spec::TaskKind;

/// Exit status when the Wasm trapped: 128 + SIGABRT, as `wasmtime run` reports.
pub const TRAP_STATUS: u32 = 134;
/// Exit status when the agent lost the workload.
pub const LOST_STATUS: u32 = 255;
/// The signal assumed when a stop came from elsewhere than Kill.
const SIGKILL: u32 = 9;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created, not started.
    Created,
    /// Start in progress.
    Starting,
    /// Running.
    Running,
    /// Ended.
    Stopped,
}

impl Phase {
    /// containerd's name for it.
    pub fn status(self) -> Status {
        match self {
            Phase::Created | Phase::Starting => Status::CREATED,
            Phase::Running => Status::RUNNING,
            Phase::Stopped => Status::STOPPED,
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRecord {
    /// Exit status as a process would report it.
    pub status: u32,
    /// When.
    pub at: SystemTime,
}

impl ExitRecord {
    /// `status`, now.
    pub fn now(status: u32) -> Self {
        Self {
            status,
            at: SystemTime::now(),
        }
    }
}

/// 128 + signal, as a shell reports a process killed by it.
pub fn signal_status(signal: u32) -> u32 {
    128 + signal.min(127)
}

/// The exit status of a program that ended as `exit` says; `signal` is the last Kill's.
pub fn exit_status(exit: &Exit, signal: u32) -> u32 {
    match exit {
        Exit::Code(code) => (*code & 0xff).unsigned_abs(),
        Exit::Trapped(_) => TRAP_STATUS,
        Exit::Stopped => signal_status(if signal == 0 { SIGKILL } else { signal }),
    }
}

/// A task as the service holds it.
pub struct Task {
    /// containerd's task id.
    pub id: String,
    /// Its bundle directory.
    pub bundle: PathBuf,
    /// Sandbox or program.
    pub kind: TaskKind,
    /// stdin, stdout, stderr paths as containerd gave them.
    pub stdio: [String; 3],
    /// Where its events go, if known.
    pub target: Option<EventTarget>,
    /// The rootfs this service mounted, to unmount on delete.
    pub rootfs: Option<PathBuf>,
    /// Wakes a sandbox's waiter when it is killed.
    pub killed: Notify,
    /// Held while the exit is published and recorded, so that happens once and in order.
    pub finishing: tokio::sync::Mutex<()>,
    /// How long the parts of its `Create` took (set once the create succeeded).
    pub timings: std::sync::OnceLock<CreateTimings>,
    phase: Mutex<Phase>,
    signal: AtomicU32,
    exit: watch::Sender<Option<ExitRecord>>,
}

/// How long the parts of one task's `Create` took, for the task path's timing line.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateTimings {
    /// Reading and checking the bundle's `config.json`.
    pub bundle: std::time::Duration,
    /// Mounting the rootfs containerd prepared.
    pub mount: std::time::Duration,
    /// Finding and reading the entrypoint `.wasm`.
    pub entrypoint: std::time::Duration,
    /// Opening containerd's stdout and stderr FIFOs.
    pub fifo: std::time::Duration,
    /// The agent's create: compiling the program or loading it from the cache, the pod record.
    pub agent: std::time::Duration,
}

impl Task {
    /// A created task.
    pub fn new(
        id: String,
        bundle: PathBuf,
        kind: TaskKind,
        stdio: [String; 3],
        target: Option<EventTarget>,
        rootfs: Option<PathBuf>,
    ) -> Self {
        Self {
            id,
            bundle,
            kind,
            stdio,
            target,
            rootfs,
            killed: Notify::new(),
            finishing: tokio::sync::Mutex::new(()),
            timings: std::sync::OnceLock::new(),
            phase: Mutex::new(Phase::Created),
            signal: AtomicU32::new(0),
            exit: watch::Sender::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().expect("phase lock is never poisoned")
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.lock()
    }

    /// Sets the phase unless the task has already ended.
    pub fn set_phase(&self, phase: Phase) {
        let mut current = self.lock();
        if *current != Phase::Stopped {
            *current = phase;
        }
    }

    /// Moves Created to Starting; any other phase refuses the start.
    pub fn begin_start(&self, id: &str) -> Result<(), ttrpc::Error> {
        let mut phase = self.lock();
        match *phase {
            Phase::Created => {
                *phase = Phase::Starting;
                Ok(())
            }
            other => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::FAILED_PRECONDITION,
                format!("task {id}: cannot start a task that is {other:?}"),
            ))),
        }
    }

    /// Back to Created after a start the agent refused.
    pub fn abort_start(&self) {
        let mut phase = self.lock();
        if *phase == Phase::Starting {
            *phase = Phase::Created;
        }
    }

    /// Remembers the signal of a Kill.
    pub fn set_signal(&self, signal: u32) {
        self.signal.store(signal, Ordering::Relaxed);
    }

    /// The last Kill's signal (0 if none).
    pub fn signal(&self) -> u32 {
        self.signal.load(Ordering::Relaxed)
    }

    /// Records the end the first time; `None` if it had already ended.
    pub fn record_exit(&self, status: u32) -> Option<ExitRecord> {
        let record = ExitRecord::now(status);
        self.record(record).then_some(record)
    }

    /// Records `record` as the end, wakes the waiters; `false` if it had already ended.
    pub fn record(&self, record: ExitRecord) -> bool {
        let mut phase = self.lock();
        if self.exit.borrow().is_some() {
            return false;
        }
        *phase = Phase::Stopped;
        self.exit.send_replace(Some(record));
        true
    }

    /// How it ended, if it has.
    pub fn exit(&self) -> Option<ExitRecord> {
        *self.exit.borrow()
    }

    /// Resolves when the task has ended.
    pub async fn wait_exit(&self) -> ExitRecord {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(record) = *rx.borrow_and_update() {
                return record;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the task; unreachable while we hold `self`.
                return ExitRecord::now(LOST_STATUS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_a_process() {
        assert_eq!(exit_status(&Exit::Code(0), 0), 0);
        assert_eq!(exit_status(&Exit::Code(3), 0), 3);
        assert_eq!(exit_status(&Exit::Code(256 + 7), 0), 7);
        // A negative code keeps its low byte, as waitpid reports it: -1 is 255.
        assert_eq!(exit_status(&Exit::Code(-1), 0), 255);
        assert_eq!(exit_status(&Exit::Trapped("unreachable".into()), 0), 134);
        assert_eq!(exit_status(&Exit::Stopped, 15), 143);
        assert_eq!(exit_status(&Exit::Stopped, 0), 137);
    }
}
