//! The SQLite state store: deployments, workload status, per-workload key-value data, the
//! telemetry outbox, the event log and guest logs, in one database file.
//!
//! The file runs in WAL mode with `synchronous=FULL`, so a write that was acknowledged survives
//! power loss. The one exception is a batch of nothing but status rows (a workload's runtime
//! state, which nothing acknowledges and restore does not read back): it commits without an
//! fsync of its own and becomes durable with the next synced commit. All writes go through one writer thread that groups whatever is queued into one
//! transaction (one fsync), with a savepoint per request so that a failing request changes
//! nothing and does not disturb the others. Reads use a separate connection and run beside the
//! writer.
//!
//! A write method returns once its transaction has committed. A write whose future is dropped
//! after it was queued may still be committed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lichen_store::StoreError> {
//! use lichen_store::{NewDeployment, NewWorkload, StateStore, StoreOptions};
//!
//! let store = StateStore::open("/var/lib/lichen/state.db".as_ref(), StoreOptions::default())?;
//! let version = store
//!     .apply_deployment(NewDeployment {
//!         source_name: "site.toml".into(),
//!         source_text: "...".into(),
//!         digest: "...".into(),
//!         description: None,
//!         workloads: vec![NewWorkload {
//!             name: "door".into(),
//!             spec_json: "{}".into(),
//!             module_digest: "...".into(),
//!         }],
//!     })
//!     .await?;
//! assert_eq!(store.current_deployment()?.map(|d| d.version), Some(version));
//! # Ok(()) }
//! ```

mod batch;
#[cfg(feature = "kubeedge")]
mod dmi;
mod migrations;
mod outbox;
mod reads;
mod sources;
mod types;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

#[cfg(feature = "kubeedge")]
pub use dmi::DmiQueue;
/// The state of a workload in its status row (`workloads.state`, TEXT: the wire name).
pub use lichen_deployment::WorkloadState;
pub use outbox::SqliteOutbox;
pub use reads::{OUTBOX_ROW_OVERHEAD, Reader};
pub use sources::SourceWorkload;
pub use types::{
    CommandRecord, DeploymentRecord, DeploymentSummary, EventCommit, EventRow, GuestLogLine,
    KvWrite, NewDeployment, NewWorkload, OutboxRecord, OutboxRow, OutboxRowSize, StatusUpdate,
    StoreOptions, StoreStats, TelemetryRecord, WorkloadRow,
};
use writer::{Op, Output, Request};

/// How many write requests may wait for the writer before senders wait too.
const QUEUE_DEPTH: usize = 4096;

/// What can go wrong in the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory that should hold the database could not be created.
    #[error("cannot create state directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The database file (or its WAL or shared-memory file) could not be made private to
    /// the agent's user (mode 0600).
    #[error("cannot make {} private (mode 0600)", path.display())]
    Private {
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The database file could not be opened or configured.
    #[error("cannot open state database {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: rusqlite::Error,
    },
    /// The database could not be switched to WAL mode.
    #[error("state database {} cannot use WAL journal mode (it stays in {mode:?})", path.display())]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// The database was written by a newer agent.
    #[error(
        "state database {} has schema version {found}, newer than version {supported} that this agent supports",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The schema version found in the file.
        found: i64,
        /// The newest schema version this code knows.
        supported: i64,
    },
    /// A schema migration failed; the database is left at its previous version.
    #[error("migrating state database {} to schema version {version} failed", path.display())]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The version being migrated to.
        version: i64,
        /// Why it failed.
        #[source]
        source: rusqlite::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the state store writer thread")]
    SpawnWriter(#[source] std::io::Error),
    /// The writer thread is gone, so no write can be made.
    #[error("the state store writer thread has stopped")]
    WriterStopped,
    /// A read on a blocking thread ended without an answer (it panicked or the runtime is
    /// shutting down).
    #[error("a state store read did not finish: {0}")]
    ReadTask(String),
    /// A write named a workload that the applied deployment does not have.
    #[error("workload {0:?} does not exist")]
    UnknownWorkload(String),
    /// An event meant to record a hub command that the inbox already holds: nothing of the
    /// event was written (the first copy's writes stand).
    #[error("hub command {0:?} was handled already")]
    CommandHandled(String),
    /// A workload name that another source owns.
    #[error("workload {name:?} belongs to source {owner}")]
    OtherSource {
        /// The workload.
        name: String,
        /// The source that owns it.
        owner: String,
    },
    /// A deployment listed the same workload twice.
    #[error("deployment lists workload {0:?} more than once")]
    DuplicateWorkload(String),
    /// A number does not fit the database's signed 64-bit integers.
    #[error("{field} value {value} is too large to store")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A statement failed.
    #[error("{op} failed")]
    Sql {
        /// What was being done.
        op: String,
        /// Why it failed.
        #[source]
        source: rusqlite::Error,
    },
    /// The write transaction could not begin; the write was not made.
    #[error("beginning the state store write transaction failed")]
    Begin(#[source] Arc<rusqlite::Error>),
    /// The write transaction holding this request could not commit; the write was not made.
    #[error("committing the state store write transaction failed")]
    Commit(#[source] Arc<rusqlite::Error>),
}

/// Adds what was being done to a `rusqlite` error.
trait SqlContext<T> {
    /// Turns the error into [`StoreError::Sql`] with `op` as its description.
    fn context(self, op: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn context(self, op: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { op: op(), source })
    }
}

/// Milliseconds since the Unix epoch, as stored.
fn now_ms() -> i64 {
    i64::try_from(lichen_sync::now_ms()).unwrap_or(i64::MAX)
}

/// Converts a caller's `u64` to the database's `i64`.
fn to_i64(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { field, value })
}

/// State shared by the handles and the writer thread.
#[derive(Debug)]
struct StoreShared {
    path: PathBuf,
    options: StoreOptions,
    stats_transactions: AtomicU64,
    stats_requests: AtomicU64,
    stats_unsynced_batches: AtomicU64,
    stats_busy_ns: AtomicU64,
    stats_commit_ns: AtomicU64,
}

/// The part of a store that ends the writer thread when the last handle goes.
#[derive(Debug)]
struct Inner {
    shared: Arc<StoreShared>,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    /// Told after each commit that added outbox rows (the hub link, when there is one).
    outbox_listener: std::sync::OnceLock<OutboxListener>,
    /// Each status once it is recorded (supervisor's `status_changes`). Made by the first
    /// subscriber: a channel holds its [`TAP_CAPACITY`] slots from the start (~150 KiB),
    /// which an agent nobody watches need not carry.
    status_changes: std::sync::OnceLock<tokio::sync::broadcast::Sender<StatusUpdate>>,
    /// Each telemetry record once its event committed (supervisor's `telemetry_tap`); made
    /// by the first subscriber, like `status_changes`.
    telemetry: std::sync::OnceLock<tokio::sync::broadcast::Sender<CommittedTelemetry>>,
}

/// The tap's sender when someone listens: `None` before the first subscriber and after the
/// last one went, so nothing is cloned for nobody.
fn listened<T>(
    tap: &std::sync::OnceLock<tokio::sync::broadcast::Sender<T>>,
) -> Option<&tokio::sync::broadcast::Sender<T>> {
    tap.get().filter(|sender| sender.receiver_count() > 0)
}

/// Subscribers' buffer of status changes and of committed telemetry; a receiver that lags
/// further loses the oldest (it is told how many).
const TAP_CAPACITY: usize = 1024;

/// A telemetry record whose event has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedTelemetry {
    /// The workload that published it.
    pub workload: String,
    /// Its stream.
    pub stream: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A callback run after outbox rows were committed.
struct OutboxListener(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OutboxListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutboxListener")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop once it has answered what is queued.
        self.requests = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.shared.path.display(), "state store writer thread panicked");
        }
    }
}

/// Creates the database file with mode 0600 before SQLite opens it (SQLite gives its `-wal` and
/// `-shm` files the database's mode), and brings an existing database and its companions (left
/// 0644 by older agents) to 0600: they hold the key-value state, hub state and guest logs.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let private = |path: &Path, source| StoreError::Private {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| private(path, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(private(&file, e)),
            _ => {}
        }
    }
    Ok(())
}

/// The agent's state store. Cheap to clone; every clone uses the same database and writer.
#[derive(Debug, Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

impl StateStore {
    /// Opens (creating if needed) the database at `path`, migrates it, and starts the writer.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        make_private(path)?;
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        migrations::configure(&conn, path)?;
        migrations::migrate(&mut conn, path)?;

        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        migrations::configure(&reader, path)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(open_err)?;

        let shared = Arc::new(StoreShared {
            path: path.to_path_buf(),
            options,
            stats_transactions: AtomicU64::new(0),
            stats_requests: AtomicU64::new(0),
            stats_unsynced_batches: AtomicU64::new(0),
            stats_busy_ns: AtomicU64::new(0),
            stats_commit_ns: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = std::thread::Builder::new()
            .name("lichen-store-writer".to_owned())
            .spawn({
                let shared = Arc::clone(&shared);
                move || writer::run(conn, rx, shared)
            })
            .map_err(StoreError::SpawnWriter)?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                requests: Some(tx),
                writer: Some(writer),
                reader: Mutex::new(reader),
                outbox_listener: std::sync::OnceLock::new(),
                status_changes: std::sync::OnceLock::new(),
                telemetry: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    /// How many transactions and requests the writer has processed since open, and the time
    /// it spent on them.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            transactions: self.inner.shared.stats_transactions.load(Ordering::Relaxed),
            requests: self.inner.shared.stats_requests.load(Ordering::Relaxed),
            unsynced_batches: self
                .inner
                .shared
                .stats_unsynced_batches
                .load(Ordering::Relaxed),
            busy_ns: self.inner.shared.stats_busy_ns.load(Ordering::Relaxed),
            commit_ns: self.inner.shared.stats_commit_ns.load(Ordering::Relaxed),
        }
    }

    /// Applies a deployment atomically and returns its version (1, 2, 3, ...).
    ///
    /// In one transaction: records the deployment, upserts every listed workload (new ones
    /// start `pending`, existing ones keep their status and counters), deletes the workloads it
    /// does not list together with their key-value data and logs, and logs a `deployed` event.
    pub async fn apply_deployment(&self, d: NewDeployment) -> Result<u64, StoreError> {
        match self.submit(Op::Deploy(d)).await? {
            Output::Version(version) => Ok(version),
            other => {
                unreachable!("the writer answers a deployment with its version, not {other:?}")
            }
        }
    }

    /// Commits the effects of one handled event: key-value writes, telemetry into the outbox,
    /// the workload's event counter and, for a hub command, its inbox id and result, all or
    /// nothing. Returns once they are durable. A hub command the inbox already holds fails
    /// with [`StoreError::CommandHandled`] and writes nothing.
    pub async fn commit_event(&self, c: EventCommit) -> Result<(), StoreError> {
        let telemetry = !c.telemetry.is_empty() || c.command.is_some();
        let tap = listened(&self.inner.telemetry);
        let tapped: Vec<CommittedTelemetry> = if tap.is_some() {
            c.telemetry
                .iter()
                .map(|t| CommittedTelemetry {
                    workload: c.workload.clone(),
                    stream: t.stream.clone(),
                    payload: t.payload.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        self.submit(Op::Commit(c)).await?;
        if let Some(tap) = tap {
            for record in tapped {
                let _ = tap.send(record);
            }
        }
        if telemetry {
            self.outbox_changed();
        }
        Ok(())
    }

    /// Runs `listener` after every commit that adds outbox rows (cheap: it should only wake
    /// someone up). Only the first listener set is kept; returns whether this one was.
    pub fn set_outbox_listener(&self, listener: impl Fn() + Send + Sync + 'static) -> bool {
        self.inner
            .outbox_listener
            .set(OutboxListener(Box::new(listener)))
            .is_ok()
    }

    fn outbox_changed(&self) {
        if let Some(listener) = self.inner.outbox_listener.get() {
            (listener.0)();
        }
    }

    /// Queues a record the agent itself makes (reported state, an event) in the outbox;
    /// returns its row id.
    pub async fn push_outbox(&self, record: OutboxRecord) -> Result<i64, StoreError> {
        match self.submit(Op::OutboxPush(record)).await? {
            Output::RowId(id) => {
                self.outbox_changed();
                Ok(id)
            }
            other => unreachable!("the writer answers an outbox push with its id, not {other:?}"),
        }
    }

    /// Deletes outbox rows (acknowledged by the broker, or dropped by the quota); returns how
    /// many were still there.
    pub async fn delete_outbox(&self, ids: Vec<i64>) -> Result<u64, StoreError> {
        match self.submit(Op::OutboxDelete(ids)).await? {
            Output::Count(n) => Ok(n),
            other => unreachable!("the writer answers a delete with a count, not {other:?}"),
        }
    }

    /// [`StateStore::delete_outbox`] for a thread that is not async (tokio's blocking pool).
    pub fn delete_outbox_blocking(&self, ids: Vec<i64>) -> Result<u64, StoreError> {
        match self.submit_blocking(Op::OutboxDelete(ids))? {
            Output::Count(n) => Ok(n),
            other => unreachable!("the writer answers a delete with a count, not {other:?}"),
        }
    }

    /// Records that hub command `inbox_id` was handled and queues its result, in one
    /// transaction. Returns `false` (and queues nothing) if the id was handled before.
    pub async fn command_done(
        &self,
        inbox_id: &str,
        result: OutboxRecord,
    ) -> Result<bool, StoreError> {
        let op = Op::CommandDone {
            inbox_id: inbox_id.to_owned(),
            result,
        };
        match self.submit(op).await? {
            Output::Count(n) => {
                if n > 0 {
                    self.outbox_changed();
                }
                Ok(n > 0)
            }
            other => unreachable!("the writer answers a command with a count, not {other:?}"),
        }
    }

    /// Records a fact about the hub link (read back with [`StateStore::hub_state`]).
    pub async fn set_hub_state(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let op = Op::HubState {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        self.submit(op).await.map(drop)
    }

    /// Records a workload's status, and the event it comes with, in one transaction.
    pub async fn record_status(&self, s: StatusUpdate) -> Result<(), StoreError> {
        let tap = listened(&self.inner.status_changes);
        let change = tap.map(|tap| (tap, s.clone()));
        let result = self.submit(Op::Status(s)).await.map(drop);
        if let Some((tap, change)) = change {
            // Told even when the write failed: the workload's state changed all the same.
            let _ = tap.send(change);
        }
        result
    }

    /// Status updates as they are recorded (every runtime state change of a Wasm workload).
    pub fn status_changes(&self) -> tokio::sync::broadcast::Receiver<StatusUpdate> {
        self.inner
            .status_changes
            .get_or_init(|| tokio::sync::broadcast::channel(TAP_CAPACITY).0)
            .subscribe()
    }

    /// Telemetry records as their events commit.
    pub fn telemetry_tap(&self) -> tokio::sync::broadcast::Receiver<CommittedTelemetry> {
        self.inner
            .telemetry
            .get_or_init(|| tokio::sync::broadcast::channel(TAP_CAPACITY).0)
            .subscribe()
    }

    /// Appends an entry to the event log and returns its id.
    pub async fn log_event(
        &self,
        workload: Option<&str>,
        kind: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        let op = Op::LogEvent {
            workload: workload.map(str::to_owned),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
        };
        match self.submit(op).await? {
            Output::EventId(id) => Ok(id),
            other => unreachable!("the writer answers an event with its id, not {other:?}"),
        }
    }

    /// Appends guest log lines, keeping the newest
    /// [`max_log_lines_per_workload`](StoreOptions::max_log_lines_per_workload) per workload.
    ///
    /// Lines of workloads that no longer exist are dropped (a removed workload's logs are
    /// deleted with it), so a batch collected just before a redeploy still lands.
    pub async fn append_logs(&self, lines: Vec<GuestLogLine>) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        self.submit(Op::AppendLogs(lines)).await.map(drop)
    }

    /// Queues `op` for the writer and waits for its committed result.
    async fn submit(&self, op: Op) -> Result<Output, StoreError> {
        let requests = self
            .inner
            .requests
            .as_ref()
            .expect("the request sender lives until the store is dropped");
        let (reply, answer) = oneshot::channel();
        requests
            .send(Request { op, reply })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// [`StateStore::submit`] from a thread that may block (not an async task).
    fn submit_blocking(&self, op: Op) -> Result<Output, StoreError> {
        let requests = self
            .inner
            .requests
            .as_ref()
            .expect("the request sender lives until the store is dropped");
        let (reply, answer) = oneshot::channel();
        requests
            .blocking_send(Request { op, reply })
            .map_err(|_| StoreError::WriterStopped)?;
        answer
            .blocking_recv()
            .map_err(|_| StoreError::WriterStopped)?
    }

    /// The read connection. A panic while it was held leaves it usable (reads change nothing).
    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.inner
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
