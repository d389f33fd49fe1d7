//! The durable queue of reports for EdgeCore: [`ReportQueue`].
//!
//! The mapper pushes a report when a twin's reported value or a device's state changes, and
//! the uplink sends the queue in order, acknowledging (deleting) each report only after
//! EdgeCore answered its `ReportDeviceStatus` or `ReportDeviceStates` call. While EdgeCore is
//! unreachable the queue grows; nothing is lost, and nothing is sent twice by one process.
//! Reports whose calls succeeded at EdgeCore but whose acknowledgement did not reach the queue
//! (a crash in between; the uplink acknowledges a batch of up to 64 at once) are sent again
//! after a restart: twin updates carry values, not deltas, so the repetition is harmless.
//!
//! The queue is bounded ([`ReportQueue`] implementations take `max_reports`): when full, a
//! push first drops the oldest twin report that a newer report of the same device covers (same
//! properties or more): the cloud loses an intermediate value, never the latest one. Only if
//! none is covered, the oldest twin report goes. State reports are dropped last. Drops are
//! counted ([`ReportQueue::dropped`]).
//!
//! [`SqliteQueue`] keeps the queue in a SQLite file (WAL, `synchronous=FULL`: a push that
//! returned survives power loss); [`MemoryQueue`] keeps it in memory, for tests.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use crate::proto::v1beta1 as pb;

/// Default bound of a queue, in reports (100,000 twin reports of ~200 bytes: ~20 MB).
pub const DEFAULT_MAX_REPORTS: u64 = 100_000;
/// Oldest rows looked at to choose which one to drop when the queue is full.
pub const DROP_WINDOW: usize = 1024;

/// One report for EdgeCore.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Twins (`ReportDeviceStatus`).
    Twins(pb::ReportDeviceStatusRequest),
    /// A device state (`ReportDeviceStates`).
    State(pb::ReportDeviceStatesRequest),
}

impl Report {
    /// `namespace/name` of the device.
    pub fn device(&self) -> String {
        match self {
            Report::Twins(r) => format!("{}/{}", r.device_namespace, r.device_name),
            Report::State(r) => format!("{}/{}", r.device_namespace, r.device_name),
        }
    }

    /// Sorted property names of a twin report (empty for a state report).
    pub fn properties(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Report::Twins(r) => r
                .reported_device
                .iter()
                .flat_map(|s| s.twins.iter().map(|t| t.property_name.clone()))
                .collect(),
            Report::State(_) => Vec::new(),
        };
        names.sort();
        names.dedup();
        names
    }

    /// `twins` or `state`: the `kind` column of `dmi_reports`.
    pub fn kind(&self) -> &'static str {
        match self {
            Report::Twins(_) => "twins",
            Report::State(_) => "state",
        }
    }

    /// The request, protobuf-encoded: the `body` column of `dmi_reports`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Report::Twins(r) => r.encode_to_vec(),
            Report::State(r) => r.encode_to_vec(),
        }
    }

    /// A report from its `kind` and `body` columns.
    pub fn decode(kind: &str, body: &[u8]) -> Result<Self, QueueError> {
        let bad = |e: prost::DecodeError| QueueError(format!("stored {kind} report: {e}"));
        match kind {
            "twins" => Ok(Report::Twins(
                pb::ReportDeviceStatusRequest::decode(body).map_err(bad)?,
            )),
            "state" => Ok(Report::State(
                pb::ReportDeviceStatesRequest::decode(body).map_err(bad)?,
            )),
            other => Err(QueueError(format!(
                "stored report of unknown kind {other:?}"
            ))),
        }
    }
}

/// A report with its queue id (ids grow with every push and are never reused).
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Queue id.
    pub id: u64,
    /// The report.
    pub report: Report,
}

/// A queue failure (the store could not be read or written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("report queue: {0}")]
pub struct QueueError(pub String);

/// A durable, ordered, bounded queue of reports. Calls block (SQLite): call them from
/// `spawn_blocking` or a thread of their own.
pub trait ReportQueue: Send + Sync + 'static {
    /// Appends a report (dropping one first if the queue is full); durable when it returns.
    fn push(&self, report: &Report) -> Result<u64, QueueError>;
    /// Up to `limit` reports, oldest first.
    fn oldest(&self, limit: usize) -> Result<Vec<Queued>, QueueError>;
    /// Removes a report that EdgeCore has taken.
    fn ack(&self, id: u64) -> Result<(), QueueError>;
    /// Removes reports that EdgeCore has taken, in one write where the store allows.
    fn ack_many(&self, ids: &[u64]) -> Result<(), QueueError> {
        ids.iter().try_for_each(|id| self.ack(*id))
    }
    /// Reports waiting.
    fn len(&self) -> Result<u64, QueueError>;
    /// Reports dropped because the queue was full, since it was created.
    fn dropped(&self) -> Result<u64, QueueError>;
    /// Whether no report waits.
    fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.len()? == 0)
    }
}

/// What the drop decision needs of a queued report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowInfo {
    /// Queue id.
    pub id: u64,
    /// `namespace/name`.
    pub device: String,
    /// `twins` or `state`.
    pub kind: String,
    /// Sorted property names (twins).
    pub properties: Vec<String>,
}

/// Which of `rows` (oldest first) to drop to make room: the oldest twin report covered by a
/// newer twin report of the same device, else the oldest twin report, else the oldest report.
pub fn choose_drop(rows: &[RowInfo]) -> Option<u64> {
    let covered = rows.iter().enumerate().find(|(i, old)| {
        old.kind == "twins"
            && rows[i + 1..].iter().any(|new| {
                new.kind == "twins"
                    && new.device == old.device
                    && old.properties.iter().all(|p| new.properties.contains(p))
            })
    });
    covered
        .map(|(_, r)| r)
        .or_else(|| rows.iter().find(|r| r.kind == "twins"))
        .or_else(|| rows.first())
        .map(|r| r.id)
}

/// A queue in memory (not durable): for tests and tools.
#[derive(Debug)]
pub struct MemoryQueue {
    max: u64,
    inner: Mutex<(VecDeque<Queued>, u64, u64)>,
}

impl MemoryQueue {
    /// An empty queue of at most `max_reports` reports.
    pub fn new(max_reports: u64) -> Self {
        Self {
            max: max_reports.max(1),
            inner: Mutex::new((VecDeque::new(), 0, 0)),
        }
    }
}

fn info(q: &Queued) -> RowInfo {
    RowInfo {
        id: q.id,
        device: q.report.device(),
        kind: q.report.kind().to_owned(),
        properties: q.report.properties(),
    }
}

impl ReportQueue for MemoryQueue {
    fn push(&self, report: &Report) -> Result<u64, QueueError> {
        let mut g = self
            .inner
            .lock()
            .expect("report queue lock is never poisoned");
        let (rows, next, dropped) = &mut *g;
        if rows.len() as u64 >= self.max {
            let infos: Vec<RowInfo> = rows.iter().take(DROP_WINDOW).map(info).collect();
            if let Some(id) = choose_drop(&infos) {
                rows.retain(|r| r.id != id);
                *dropped += 1;
            }
        }
        *next += 1;
        rows.push_back(Queued {
            id: *next,
            report: report.clone(),
        });
        Ok(*next)
    }

    fn oldest(&self, limit: usize) -> Result<Vec<Queued>, QueueError> {
        let g = self
            .inner
            .lock()
            .expect("report queue lock is never poisoned");
        Ok(g.0.iter().take(limit).cloned().collect())
    }

    fn ack(&self, id: u64) -> Result<(), QueueError> {
        let mut g = self
            .inner
            .lock()
            .expect("report queue lock is never poisoned");
        g.0.retain(|r| r.id != id);
        Ok(())
    }

    fn len(&self) -> Result<u64, QueueError> {
        Ok(self
            .inner
            .lock()
            .expect("report queue lock is never poisoned")
            .0
            .len() as u64)
    }

    fn dropped(&self) -> Result<u64, QueueError> {
        Ok(self
            .inner
            .lock()
            .expect("report queue lock is never poisoned")
            .2)
    }
}

/// A queue in a SQLite file: table `dmi_reports` (the schema the agent's state store takes
/// over, see `docs/kubeedge.md`).
#[derive(Debug)]
pub struct SqliteQueue {
    max: u64,
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dmi_reports (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT    NOT NULL,
    device        TEXT    NOT NULL,
    properties    TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dmi_counters (
    key   TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

fn sql(op: &str) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
    move |e| QueueError(format!("{op}: {e}"))
}

/// [`DROP_WINDOW`] as the SQLite integer the query binds.
const WINDOW_SQL: i64 = 1024;
const _: () = assert!(WINDOW_SQL.unsigned_abs() == DROP_WINDOW as u64);

/// A report id as the SQLite row id it is: ids come from row ids, so one above `i64::MAX` names
/// no report and is refused rather than wrapped to a negative row id.
fn row_id(id: u64) -> Result<i64, QueueError> {
    i64::try_from(id).map_err(|_| {
        QueueError(format!(
            "report id {id} is not a queue row id (at most {})",
            i64::MAX
        ))
    })
}

/// A SQLite row id as a report id: row ids of the queue's table are positive.
fn report_id(row: i64) -> Result<u64, QueueError> {
    u64::try_from(row).map_err(|_| QueueError(format!("queue row id {row} is negative")))
}

impl SqliteQueue {
    /// Opens (creating if needed) the queue in the SQLite file `path`, bounded to
    /// `max_reports`.
    pub fn open(path: &Path, max_reports: u64) -> Result<Self, QueueError> {
        let conn = Connection::open(path)
            .map_err(|e| QueueError(format!("opening {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("busy timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql("WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QueueError(format!(
                "{} cannot use WAL (journal mode stays {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("synchronous=FULL"))?;
        conn.execute_batch(SCHEMA)
            .map_err(sql("creating the schema"))?;
        Ok(Self {
            max: max_reports.max(1),
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .expect("report queue lock is never poisoned")
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl ReportQueue for SqliteQueue {
    fn push(&self, report: &Report) -> Result<u64, QueueError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let len: i64 = tx
            .query_row("SELECT COUNT(*) FROM dmi_reports", [], |r| r.get(0))
            .map_err(sql("counting reports"))?;
        if u64::try_from(len).unwrap_or(0) >= self.max {
            let mut stmt = tx
                .prepare(
                    "SELECT id, device, kind, properties FROM dmi_reports ORDER BY id LIMIT ?1",
                )
                .map_err(sql("reading the oldest reports"))?;
            let rows = stmt
                .query_map([WINDOW_SQL], |r| {
                    let props: String = r.get(3)?;
                    Ok(RowInfo {
                        // Row ids of the queue's table are positive (AUTOINCREMENT from 1).
                        id: r.get::<_, i64>(0)?.unsigned_abs(),
                        device: r.get(1)?,
                        kind: r.get(2)?,
                        properties: props
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("reading the oldest reports"))?;
            drop(stmt);
            if let Some(id) = choose_drop(&rows) {
                tx.execute("DELETE FROM dmi_reports WHERE id = ?1", [row_id(id)?])
                    .map_err(sql("dropping a report"))?;
                tx.execute(
                    "INSERT INTO dmi_counters (key, value) VALUES ('dropped', 1)
                     ON CONFLICT (key) DO UPDATE SET value = value + 1",
                    [],
                )
                .map_err(sql("counting a drop"))?;
            }
        }
        tx.execute(
            "INSERT INTO dmi_reports (kind, device, properties, body, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                report.kind(),
                report.device(),
                report.properties().join(","),
                report.encode(),
                now_ms()
            ],
        )
        .map_err(sql("queueing a report"))?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(sql("commit"))?;
        report_id(id)
    }

    fn oldest(&self, limit: usize) -> Result<Vec<Queued>, QueueError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT id, kind, body FROM dmi_reports ORDER BY id LIMIT ?1")
            .map_err(sql("reading reports"))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(sql("reading reports"))?;
        rows.into_iter()
            .map(|(id, kind, body)| {
                Ok(Queued {
                    id: report_id(id)?,
                    report: Report::decode(&kind, &body)?,
                })
            })
            .collect()
    }

    fn ack(&self, id: u64) -> Result<(), QueueError> {
        self.lock()
            .execute("DELETE FROM dmi_reports WHERE id = ?1", [row_id(id)?])
            .map(drop)
            .map_err(sql("acknowledging a report"))
    }

    fn ack_many(&self, ids: &[u64]) -> Result<(), QueueError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql("begin"))?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM dmi_reports WHERE id = ?1")
                .map_err(sql("acknowledging reports"))?;
            for id in ids {
                stmt.execute([row_id(*id)?])
                    .map_err(sql("acknowledging reports"))?;
            }
        }
        tx.commit().map_err(sql("commit"))
    }

    fn len(&self) -> Result<u64, QueueError> {
        self.lock()
            .query_row("SELECT COUNT(*) FROM dmi_reports", [], |r| {
                r.get::<_, i64>(0)
            })
            // COUNT(*) is never negative.
            .map(i64::unsigned_abs)
            .map_err(sql("counting reports"))
    }

    fn dropped(&self) -> Result<u64, QueueError> {
        self.lock()
            .query_row(
                "SELECT value FROM dmi_counters WHERE key = 'dropped'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            // The counter only ever grows from 0.
            .map(|n| n.map_or(0, i64::unsigned_abs))
            .map_err(sql("reading the drop count"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twins(device: &str, props: &[(&str, &str)]) -> Report {
        Report::Twins(pb::ReportDeviceStatusRequest {
            device_name: device.into(),
            device_namespace: "default".into(),
            reported_device: Some(pb::DeviceStatus {
                twins: props
                    .iter()
                    .map(|(name, value)| pb::Twin {
                        property_name: (*name).into(),
                        observed_desired: None,
                        reported: Some(pb::TwinProperty {
                            value: (*value).into(),
                            metadata: Default::default(),
                        }),
                    })
                    .collect(),
                report_to_cloud: true,
                report_cycle: 0,
            }),
        })
    }

    fn state(device: &str, state: &str) -> Report {
        Report::State(pb::ReportDeviceStatesRequest {
            device_name: device.into(),
            device_namespace: "default".into(),
            state: state.into(),
        })
    }

    #[test]
    fn sqlite_queue_survives_reopening_in_order_and_forgets_acknowledged_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dmi.db");
        let q = SqliteQueue::open(&path, 100).unwrap();
        let a = q.push(&twins("a", &[("led", "on")])).unwrap();
        let b = q.push(&state("a", "online")).unwrap();
        let c = q.push(&twins("a", &[("led", "off")])).unwrap();
        assert!(a < b && b < c);
        q.ack(a).unwrap();
        let d = q.push(&state("a", "unknown")).unwrap();
        let e = q.push(&state("a", "online")).unwrap();
        q.ack_many(&[d, e]).unwrap();
        drop(q);
        let q = SqliteQueue::open(&path, 100).unwrap();
        let left = q.oldest(10).unwrap();
        assert_eq!(
            left.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![b, c],
            "acknowledged report gone, the others in order"
        );
        assert_eq!(left[0].report, state("a", "online"));
        assert_eq!(left[1].report, twins("a", &[("led", "off")]));
        // Ids are never reused, even after the newest was acknowledged.
        q.ack(c).unwrap();
        assert!(q.push(&state("a", "offline")).unwrap() > c);
    }

    #[test]
    fn an_ack_id_beyond_sqlite_row_ids_is_refused_by_value_and_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&dir.path().join("q.db"), 100).unwrap();
        let a = q.push(&state("a", "online")).unwrap();
        // `as i64` wrapped this to -1: a silent no-op ack instead of an error.
        let err = q.ack(u64::MAX).unwrap_err().to_string();
        assert!(err.contains(&u64::MAX.to_string()), "{err}");
        // One bad id in a batch fails the batch: the good id is not acknowledged either.
        let err = q.ack_many(&[a, 1 << 63]).unwrap_err().to_string();
        assert!(err.contains(&(1u64 << 63).to_string()), "{err}");
        assert_eq!(q.len().unwrap(), 1);
        assert_eq!(q.oldest(10).unwrap()[0].id, a);
    }

    #[test]
    fn a_full_queue_drops_a_covered_twin_report_first_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        for q in [
            Box::new(MemoryQueue::new(3)) as Box<dyn ReportQueue>,
            Box::new(SqliteQueue::open(&dir.path().join("q.db"), 3).unwrap()),
        ] {
            q.push(&state("a", "online")).unwrap();
            q.push(&twins("a", &[("led", "on")])).unwrap();
            q.push(&twins("b", &[("temp", "20")])).unwrap();
            // Full: a's first twin report is not covered yet by anything newer.
            q.push(&twins("a", &[("led", "off"), ("level", "3")]))
                .unwrap();
            let kept: Vec<Report> = q
                .oldest(10)
                .unwrap()
                .into_iter()
                .map(|r| r.report)
                .collect();
            assert_eq!(
                kept,
                vec![
                    state("a", "online"),
                    twins("b", &[("temp", "20")]),
                    twins("a", &[("led", "off"), ("level", "3")]),
                ],
                "the covered report of a went; the state and b's only report stay"
            );
            // Nothing covered now: the oldest twin report goes, states stay.
            q.push(&state("b", "offline")).unwrap();
            let kinds: Vec<String> = q
                .oldest(10)
                .unwrap()
                .into_iter()
                .map(|r| format!("{}:{}", r.report.kind(), r.report.device()))
                .collect();
            assert_eq!(
                kinds,
                vec!["state:default/a", "twins:default/a", "state:default/b"]
            );
            assert_eq!(q.dropped().unwrap(), 2);
            assert_eq!(q.len().unwrap(), 3);
        }
    }
}
