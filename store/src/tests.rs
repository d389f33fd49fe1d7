//! Tests of the state store against real SQLite files.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::Connection;

use super::migrations::LATEST_VERSION;
use super::*;

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state").join("lichen.db")
}

fn open(path: &Path) -> StateStore {
    StateStore::open(path, StoreOptions::default()).expect("test database opens")
}

fn deployment(names: &[&str]) -> NewDeployment {
    let text = format!("workloads = {names:?}");
    NewDeployment {
        source_name: "site.toml".to_owned(),
        digest: format!("digest-of-{text}"),
        source_text: text,
        description: Some("test".to_owned()),
        workloads: names
            .iter()
            .map(|name| NewWorkload {
                name: (*name).to_owned(),
                spec_json: format!("{{\"name\":\"{name}\"}}"),
                module_digest: format!("module-{name}"),
            })
            .collect(),
    }
}

fn put(workload: &str, key: &str, value: &[u8]) -> EventCommit {
    EventCommit {
        workload: workload.to_owned(),
        kv: vec![KvWrite {
            bucket: "default".to_owned(),
            key: key.to_owned(),
            value: Some(value.to_vec()),
        }],
        telemetry: Vec::new(),
        events_handled: 1,
        command: None,
    }
}

fn log_line(workload: &str, message: &str) -> GuestLogLine {
    GuestLogLine {
        workload: workload.to_owned(),
        at_ms: 1,
        level: "info".to_owned(),
        context: "test".to_owned(),
        message: message.to_owned(),
    }
}

fn names(rows: &[WorkloadRow]) -> Vec<&str> {
    rows.iter().map(|w| w.name.as_str()).collect()
}

fn user_version(path: &Path) -> i64 {
    let conn = Connection::open(path).expect("test database opens raw");
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("user_version reads")
}

#[test]
fn handles_and_write_futures_can_cross_threads() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync_clone::<StateStore>();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    // Built but never polled: only their types matter here.
    assert_send(&store.apply_deployment(deployment(&[])));
    assert_send(&store.commit_event(put("w", "k", b"v")));
    assert_send(&store.log_event(Some("w"), "k", "d"));
    assert_send(&store.append_logs(Vec::new()));
}

#[tokio::test]
async fn migrations_run_once_and_reopening_keeps_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    assert_eq!(store.path(), path);
    store
        .log_event(None, "started", "first run")
        .await
        .expect("event is logged");
    drop(store);
    assert_eq!(user_version(&path), LATEST_VERSION);

    // Re-running the CREATE TABLE steps would fail, so a clean reopen proves they ran once.
    let store = open(&path);
    store
        .log_event(None, "started", "second run")
        .await
        .expect("event is logged");
    let events = store.events(0, 10).expect("events read");
    let details: Vec<&str> = events.iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(details, ["first run", "second run"]);
    assert_eq!(user_version(&path), LATEST_VERSION);
}

#[test]
fn database_from_newer_agent_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lichen.db");
    let conn = Connection::open(&path).expect("raw open");
    conn.pragma_update(None, "user_version", LATEST_VERSION + 5)
        .expect("user_version set");
    drop(conn);

    let err = StateStore::open(&path, StoreOptions::default()).expect_err("newer schema refused");
    assert!(matches!(err, StoreError::TooNew { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("schema version {}", LATEST_VERSION + 5))
            && message.contains(&format!(
                "version {LATEST_VERSION} that this agent supports"
            ))
            && message.contains("lichen.db"),
        "{message}"
    );
    // Refusing changed nothing.
    assert_eq!(user_version(&path), LATEST_VERSION + 5);
}

#[tokio::test]
async fn applied_deployment_and_its_workloads_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    assert_eq!(store.current_deployment().expect("reads"), None);
    let version = store
        .apply_deployment(deployment(&["door", "alarm"]))
        .await
        .expect("deployment applies");
    assert_eq!(version, 1);
    drop(store);

    let store = open(&path);
    let current = store
        .current_deployment()
        .expect("reads")
        .expect("a deployment is applied");
    assert_eq!(current.version, 1);
    assert_eq!(current.source_name, "site.toml");
    assert_eq!(
        current.source_text,
        deployment(&["door", "alarm"]).source_text
    );
    assert_eq!(current.description.as_deref(), Some("test"));
    assert_eq!(names(&current.workloads), ["alarm", "door"]);
    assert!(
        current
            .workloads
            .iter()
            .all(|w| w.state == WorkloadState::Pending
                && w.deployment_version == 1
                && w.events_handled == 0)
    );
    assert_eq!(current.workloads[1].spec_json, "{\"name\":\"door\"}");
    assert_eq!(store.workloads().expect("reads"), current.workloads);

    let history = store.deployment_history(10).expect("reads");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].workload_count, 2);
    let events = store.events(0, 10).expect("reads");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "deployed");
    assert_eq!(events[0].detail, "version 1: door, alarm");
}

#[tokio::test]
async fn redeploy_keeps_listed_workloads_state_and_drops_unlisted_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["door", "alarm"]))
        .await
        .expect("v1 applies");
    store
        .commit_event(put("door", "opened", b"3"))
        .await
        .expect("door commit");
    store
        .commit_event(put("alarm", "armed", b"yes"))
        .await
        .expect("alarm commit");
    store
        .append_logs(vec![log_line("alarm", "armed"), log_line("door", "opened")])
        .await
        .expect("logs append");
    store
        .record_status(StatusUpdate {
            workload: "door".to_owned(),
            state: WorkloadState::Running,
            last_error: None,
            restarts: 2,
            traps: 1,
            event: None,
        })
        .await
        .expect("status records");

    let mut v2 = deployment(&["door"]);
    v2.workloads[0].module_digest = "module-door-v2".to_owned();
    assert_eq!(store.apply_deployment(v2).await.expect("v2 applies"), 2);

    let workloads = store.workloads().expect("reads");
    assert_eq!(names(&workloads), ["door"]);
    let door = &workloads[0];
    assert_eq!(
        (door.deployment_version, door.module_digest.as_str()),
        (2, "module-door-v2")
    );
    assert_eq!(
        (door.state, door.restarts, door.traps, door.events_handled),
        (WorkloadState::Running, 2, 1, 1)
    );
    let door_kv = store.load_kv("door").expect("reads");
    assert_eq!(
        door_kv.get(&("default".to_owned(), "opened".to_owned())),
        Some(&b"3".to_vec())
    );
    assert!(store.load_kv("alarm").expect("reads").is_empty());
    assert!(store.recent_logs("alarm", 10).expect("reads").is_empty());
    assert_eq!(store.recent_logs("door", 10).expect("reads").len(), 1);
    let history = store.deployment_history(10).expect("reads");
    let versions: Vec<(u64, usize)> = history
        .iter()
        .map(|h| (h.version, h.workload_count))
        .collect();
    assert_eq!(versions, [(2, 1), (1, 2)]);
}

#[tokio::test]
async fn one_commit_event_is_wholly_visible_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    store
        .apply_deployment(deployment(&["meter"]))
        .await
        .expect("applies");
    store
        .commit_event(put("meter", "gone", b"soon"))
        .await
        .expect("first commit");
    store
        .commit_event(EventCommit {
            workload: "meter".to_owned(),
            kv: vec![
                KvWrite {
                    bucket: "readings".to_owned(),
                    key: "last".to_owned(),
                    value: Some(b"42".to_vec()),
                },
                KvWrite {
                    bucket: "default".to_owned(),
                    key: "gone".to_owned(),
                    value: None,
                },
            ],
            telemetry: vec![
                TelemetryRecord {
                    stream: "power".to_owned(),
                    payload: b"42W".to_vec(),
                    created_at_ms: 1000,
                },
                TelemetryRecord {
                    stream: "power".to_owned(),
                    payload: b"43W".to_vec(),
                    created_at_ms: 1001,
                },
            ],
            events_handled: 5,
            command: None,
        })
        .await
        .expect("second commit");
    drop(store);

    let store = open(&path);
    let kv = store.load_kv("meter").expect("reads");
    assert_eq!(kv.len(), 1, "{kv:?}");
    assert_eq!(
        kv.get(&("readings".to_owned(), "last".to_owned())),
        Some(&b"42".to_vec())
    );
    assert_eq!(store.outbox_len().expect("reads"), 2);
    let outbox = store.outbox_peek(10).expect("reads");
    let payloads: Vec<&[u8]> = outbox.iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(payloads, [b"42W".as_slice(), b"43W".as_slice()]);
    assert!(
        outbox
            .iter()
            .all(|r| r.workload == "meter" && r.stream == "power")
    );
    assert_eq!(outbox[0].created_at_ms, 1000);
    assert_eq!(store.outbox_peek(1).expect("reads").len(), 1);
    assert_eq!(store.workloads().expect("reads")[0].events_handled, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_all_land_in_fewer_transactions_than_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["counter"]))
        .await
        .expect("applies");
    let before = store.stats();

    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .commit_event(put(
                        "counter",
                        &format!("k{i}"),
                        &i.to_string().into_bytes(),
                    ))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task ran").expect("commit lands");
    }

    let after = store.stats();
    let requests = after.requests - before.requests;
    let transactions = after.transactions - before.transactions;
    assert_eq!(requests, 1000);
    assert!(
        transactions < requests,
        "{transactions} transactions for {requests} requests"
    );
    // The writer's time counters grew, and the commits are part of its busy time.
    let busy = after.busy_ns - before.busy_ns;
    let commit = after.commit_ns - before.commit_ns;
    assert!(commit > 0, "no commit time counted");
    assert!(commit <= busy, "commit {commit} ns of {busy} ns busy");
    let kv = store.load_kv("counter").expect("reads");
    assert_eq!(kv.len(), 1000);
    assert_eq!(
        kv.get(&("default".to_owned(), "k999".to_owned())),
        Some(&b"999".to_vec())
    );
    assert_eq!(store.workloads().expect("reads")[0].events_handled, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_for_unknown_workload_fails_alone_within_its_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    store
        .apply_deployment(deployment(&["door"]))
        .await
        .expect("applies");

    // Hold the write lock so the writer stalls on a first request while the next ones queue up
    // behind it and form one batch.
    let mut blocker = Connection::open(&path).expect("raw open");
    let lock = blocker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("write lock taken");
    let before = store.stats();
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.log_event(None, "test", "stall").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let spawn_commit = |commit: EventCommit| {
        let store = store.clone();
        tokio::spawn(async move { store.commit_event(commit).await })
    };
    let ok1 = spawn_commit(put("door", "a", b"1"));
    let bad = spawn_commit(EventCommit {
        telemetry: vec![TelemetryRecord {
            stream: "s".to_owned(),
            payload: b"x".to_vec(),
            created_at_ms: 1,
        }],
        ..put("ghost", "a", b"1")
    });
    let ok2 = spawn_commit(put("door", "b", b"2"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    lock.commit().expect("write lock released");

    first.await.expect("task ran").expect("event logged");
    ok1.await.expect("task ran").expect("door commit lands");
    let err = bad
        .await
        .expect("task ran")
        .expect_err("ghost commit fails");
    ok2.await.expect("task ran").expect("door commit lands");

    assert!(
        matches!(err, StoreError::UnknownWorkload(ref w) if w == "ghost"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "workload \"ghost\" does not exist");
    let after = store.stats();
    assert_eq!(after.requests - before.requests, 4);
    assert!(
        after.transactions - before.transactions <= 2,
        "the three commits shared a transaction: {before:?} -> {after:?}"
    );
    assert_eq!(store.load_kv("door").expect("reads").len(), 2);
    assert!(store.load_kv("ghost").expect("reads").is_empty());
    assert_eq!(store.outbox_len().expect("reads"), 0);
}

#[tokio::test]
async fn failing_writes_change_nothing_and_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["door"]))
        .await
        .expect("applies");

    let err = store
        .apply_deployment(deployment(&["alarm", "alarm"]))
        .await
        .expect_err("duplicate names refused");
    assert_eq!(
        err.to_string(),
        "deployment lists workload \"alarm\" more than once"
    );
    assert_eq!(store.deployment_history(10).expect("reads").len(), 1);
    assert_eq!(names(&store.workloads().expect("reads")), ["door"]);

    let err = store
        .record_status(StatusUpdate {
            workload: "ghost".to_owned(),
            state: WorkloadState::Running,
            last_error: None,
            restarts: 0,
            traps: 0,
            event: Some(("started".to_owned(), "ghost started".to_owned())),
        })
        .await
        .expect_err("unknown workload refused");
    assert_eq!(err.to_string(), "workload \"ghost\" does not exist");

    let err = store
        .commit_event(EventCommit {
            events_handled: u64::MAX,
            command: None,
            ..put("door", "k", b"v")
        })
        .await
        .expect_err("counter overflow refused");
    assert!(err.to_string().contains("events_handled"), "{err}");
    assert!(store.load_kv("door").expect("reads").is_empty());

    // Only the first deployment's event was logged.
    let events = store.events(0, 10).expect("reads");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        store.workloads().expect("reads")[0].state,
        WorkloadState::Pending
    );
}

/// The `workloads.state` column keeps the wire name of each state byte for byte, and a name
/// this agent does not know (a row of a newer agent) reads as `Unknown` instead of failing.
#[tokio::test]
async fn stored_states_keep_their_wire_names_and_unknown_ones_read_as_unknown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    store
        .apply_deployment(deployment(&["door"]))
        .await
        .expect("applies");
    let column = || -> String {
        Connection::open(&path)
            .expect("opens")
            .query_row("SELECT state FROM workloads WHERE name = 'door'", [], |r| {
                r.get(0)
            })
            .expect("reads the column")
    };
    assert_eq!(column(), "pending");
    for state in WorkloadState::ALL {
        store
            .record_status(StatusUpdate {
                workload: "door".to_owned(),
                state,
                last_error: None,
                restarts: 0,
                traps: 0,
                event: None,
            })
            .await
            .expect("records");
        assert_eq!(column(), state.as_str());
        assert_eq!(store.workloads().expect("reads")[0].state, state);
    }
    Connection::open(&path)
        .expect("opens")
        .execute("UPDATE workloads SET state = 'hibernating'", [])
        .expect("writes a newer agent's state");
    assert_eq!(
        store.workloads().expect("reads")[0].state,
        WorkloadState::Unknown
    );
    assert_eq!(
        store.all_workloads().expect("reads")[0].0.state,
        WorkloadState::Unknown
    );
}

#[tokio::test]
async fn status_and_its_event_are_recorded_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["door"]))
        .await
        .expect("applies");
    store
        .record_status(StatusUpdate {
            workload: "door".to_owned(),
            state: WorkloadState::Failed,
            last_error: Some("trap: unreachable".to_owned()),
            restarts: 3,
            traps: 4,
            event: Some(("trapped".to_owned(), "unreachable".to_owned())),
        })
        .await
        .expect("records");
    let door = &store.workloads().expect("reads")[0];
    assert_eq!(door.state, WorkloadState::Failed);
    assert_eq!(door.last_error.as_deref(), Some("trap: unreachable"));
    assert_eq!((door.restarts, door.traps), (3, 4));

    let events = store.events(0, 10).expect("reads");
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].workload.as_deref(), Some("door"));
    assert_eq!(
        (events[1].kind.as_str(), events[1].detail.as_str()),
        ("trapped", "unreachable")
    );
    // The cursor skips what was already seen.
    let id = store
        .log_event(Some("door"), "note", "later")
        .await
        .expect("logs");
    let newer = store.events(events[1].id, 10).expect("reads");
    assert_eq!(newer.len(), 1);
    assert_eq!(newer[0].id, id);
}

#[tokio::test]
async fn log_trimming_keeps_the_newest_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StateStore::open(
        &db_path(&dir),
        StoreOptions {
            max_log_lines_per_workload: 5,
        },
    )
    .expect("opens");
    store
        .apply_deployment(deployment(&["door", "alarm"]))
        .await
        .expect("applies");
    store
        .append_logs((0..3).map(|i| log_line("door", &format!("m{i}"))).collect())
        .await
        .expect("appends");
    store
        .append_logs(vec![log_line("alarm", "other")])
        .await
        .expect("appends");
    store
        .append_logs((3..7).map(|i| log_line("door", &format!("m{i}"))).collect())
        .await
        .expect("appends");

    let lines = store.recent_logs("door", 100).expect("reads");
    let messages: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(messages, ["m2", "m3", "m4", "m5", "m6"]);
    let last_two = store.recent_logs("door", 2).expect("reads");
    let messages: Vec<&str> = last_two.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(messages, ["m5", "m6"]);
    assert_eq!(store.recent_logs("alarm", 100).expect("reads").len(), 1);

    // A batch collected before a redeploy keeps the lines of the workloads that remain.
    store
        .apply_deployment(deployment(&["door"]))
        .await
        .expect("applies");
    store
        .append_logs(vec![log_line("alarm", "late"), log_line("door", "m7")])
        .await
        .expect("appends");
    assert!(store.recent_logs("alarm", 100).expect("reads").is_empty());
    let lines = store.recent_logs("door", 1).expect("reads");
    assert_eq!(lines[0].message, "m7");
}

// --- crash safety -------------------------------------------------------------------------

/// Set in the child process to the database it should hammer.
const CRASH_CHILD_ENV: &str = "LICHEN_STORE_CRASH_CHILD_DB";

/// The workloads the crash child deploys as `version`: odd and even versions differ, so a
/// half-applied deployment would show.
fn crash_workloads(version: u64) -> Vec<&'static str> {
    if version % 2 == 1 {
        vec!["keeper", "odd-a", "odd-b"]
    } else {
        vec!["keeper", "even-c"]
    }
}

/// Not a test on its own: when [`CRASH_CHILD_ENV`] is set, this is the child process of
/// [`state_is_consistent_after_sigkill`], writing until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let store = open(Path::new(&path));
    let first = store
        .apply_deployment(deployment(&crash_workloads(1)))
        .await
        .expect("first deployment applies");
    assert_eq!(first, 1, "the child starts from an empty database");

    let deployer = tokio::spawn({
        let store = store.clone();
        async move {
            for version in 2.. {
                let applied = store
                    .apply_deployment(deployment(&crash_workloads(version)))
                    .await
                    .expect("deployment applies");
                assert_eq!(applied, version);
            }
        }
    });
    let mut writers = Vec::new();
    for task in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("t{task}-{i}");
                let mut commit = put("keeper", &key, &i.to_be_bytes());
                commit.telemetry.push(TelemetryRecord {
                    stream: "acks".to_owned(),
                    payload: key.clone().into_bytes(),
                    created_at_ms: i,
                });
                store.commit_event(commit).await.expect("keeper commit");
                println!("ack {key} {i}");
                // Workloads that come and go: their data must vanish with them, atomically.
                let _ = store.commit_event(put("odd-a", &key, b"x")).await;
            }
        }));
    }
    // A safety net so a parent that never kills us does not hang forever.
    tokio::time::sleep(Duration::from_secs(20)).await;
    deployer.abort();
    writers.iter().for_each(|w| w.abort());
}

#[test]
fn state_is_consistent_after_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args(["tests::crash_child", "--exact", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child test binary starts");
    let stdout = child.stdout.take().expect("stdout is piped");

    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut killed = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output reads");
        let Some(rest) = line.strip_prefix("ack ") else {
            continue;
        };
        let (key, value) = rest.split_once(' ').expect("ack lines are `ack KEY VALUE`");
        acked.push((
            key.to_owned(),
            value.parse().expect("ack values are numbers"),
        ));
        if acked.len() == 300 && !killed {
            child.kill().expect("SIGKILL is delivered");
            killed = true;
        }
    }
    let status = child.wait().expect("child is reaped");
    assert!(killed, "child stopped after {} acks: {status}", acked.len());

    let store = open(&path);
    let current = store
        .current_deployment()
        .expect("reads")
        .expect("the child applied deployments");
    let history = store.deployment_history(usize::MAX).expect("reads");
    assert_eq!(history.len() as u64, current.version);
    for summary in &history {
        assert_eq!(
            summary.workload_count,
            crash_workloads(summary.version).len(),
            "deployment {} is complete",
            summary.version
        );
    }
    let mut expected = crash_workloads(current.version);
    expected.sort_unstable();
    assert_eq!(names(&current.workloads), expected);
    assert_eq!(names(&store.workloads().expect("reads")), expected);
    let deployed = store
        .events(0, usize::MAX)
        .expect("reads")
        .into_iter()
        .filter(|e| e.kind == "deployed")
        .count();
    assert_eq!(deployed as u64, current.version, "one event per deployment");
    if !expected.contains(&"odd-a") {
        assert!(store.load_kv("odd-a").expect("reads").is_empty());
    }

    let kv = store.load_kv("keeper").expect("reads");
    for (key, value) in &acked {
        let stored = kv.get(&("default".to_owned(), key.clone()));
        assert_eq!(
            stored,
            Some(&value.to_be_bytes().to_vec()),
            "acknowledged {key} survived"
        );
    }
    let keeper = current
        .workloads
        .iter()
        .find(|w| w.name == "keeper")
        .expect("keeper is in every deployment");
    assert!(keeper.events_handled >= acked.len() as u64);
    assert_eq!(
        keeper.events_handled,
        kv.len() as u64,
        "counter and data agree"
    );
    let outbox = store.outbox_len().expect("reads");
    assert_eq!(outbox, kv.len() as u64, "telemetry and data agree");
    let unique: BTreeSet<&str> = acked.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(unique.len(), acked.len());
}

fn telemetry(workload: &str, payload: &[u8]) -> EventCommit {
    EventCommit {
        workload: workload.to_owned(),
        kv: Vec::new(),
        telemetry: vec![TelemetryRecord {
            stream: "s".to_owned(),
            payload: payload.to_vec(),
            created_at_ms: 7,
        }],
        events_handled: 1,
        command: None,
    }
}

fn record(kind: &str, workload: &str, payload: &str) -> OutboxRecord {
    OutboxRecord {
        kind: kind.to_owned(),
        workload: workload.to_owned(),
        stream: String::new(),
        payload: payload.as_bytes().to_vec(),
        created_at_ms: 9,
    }
}

#[tokio::test]
async fn outbox_serves_lichen_sync_in_id_order_and_deletes_through_the_writer() {
    use lichen_sync::{Outbox, RowId, RowKind};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["a"]))
        .await
        .expect("deploys");
    let woken = Arc::new(AtomicU64::new(0));
    {
        let woken = woken.clone();
        assert!(store.set_outbox_listener(move || {
            woken.fetch_add(1, Ordering::Relaxed);
        }));
    }
    store
        .commit_event(telemetry("a", br#"{"c":1}"#))
        .await
        .expect("commits");
    store
        .commit_event(telemetry("a", b"not json \xff"))
        .await
        .expect("commits");
    store
        .push_outbox(record("state", "", r#"{"applied":1}"#))
        .await
        .expect("pushes");
    assert_eq!(
        woken.load(Ordering::Relaxed),
        3,
        "each commit with rows wakes the listener"
    );

    let outbox = SqliteOutbox::new(store.clone());
    let rows = tokio::task::spawn_blocking(move || {
        let rows = outbox.next_rows(RowId(0), 10).expect("reads");
        outbox.delete(&[rows[0].id, RowId(999)]).expect("deletes");
        (rows, outbox.next_rows(RowId(0), 10).expect("reads again"))
    })
    .await
    .expect("blocking task");
    let (rows, after) = rows;
    assert_eq!(rows.len(), 3);
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(rows[0].kind, RowKind::Telemetry);
    assert_eq!(rows[0].payload, serde_json::json!({"c": 1}));
    assert_eq!(rows[0].created_ms, 7);
    assert_eq!(
        rows[1].payload,
        serde_json::json!("not json \u{fffd}"),
        "non-JSON telemetry travels as a JSON string"
    );
    assert_eq!(rows[2].kind, RowKind::State);
    assert_eq!(after.len(), 2, "the acknowledged row is gone");
    store
        .push_outbox(record("state", "", r#"{"applied":2}"#))
        .await
        .expect("pushes");
    let queued = store.outbox_peek(10).expect("reads");
    let states: Vec<_> = queued.iter().filter(|r| r.kind == "state").collect();
    assert_eq!(
        states.len(),
        1,
        "a newer reported state replaces the queued one"
    );
    assert_eq!(states[0].payload, br#"{"applied":2}"#);

    // Ids keep growing after deletes (AUTOINCREMENT): they are message sequence numbers.
    let id = store
        .push_outbox(record("event", "", "{}"))
        .await
        .expect("pushes");
    let last = i64::try_from(after.last().expect("rows left").id.0).expect("row ids fit i64");
    assert!(id > last);
}

#[tokio::test]
async fn handled_command_ids_survive_reopen_and_record_one_result() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = db_path(&dir);
    {
        let store = open(&path);
        assert!(!store.inbox_contains("hub:1").expect("reads"));
        let first = store
            .command_done("hub:1", record("cmd-result", "a", r#"{"ok":true}"#))
            .await
            .expect("records");
        assert!(first);
        store
            .set_hub_state("applied-version", "4")
            .await
            .expect("records");
    }
    let store = open(&path);
    assert!(store.inbox_contains("hub:1").expect("reads"));
    let again = store
        .command_done("hub:1", record("cmd-result", "a", r#"{"ok":true}"#))
        .await
        .expect("records");
    assert!(!again, "a handled id queues no second result");
    assert_eq!(store.outbox_len().expect("counts"), 1);
    assert_eq!(
        store
            .hub_state("applied-version")
            .expect("reads")
            .as_deref(),
        Some("4")
    );
}

#[tokio::test]
async fn a_hub_command_commits_with_its_writes_once_and_a_second_copy_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["a"]))
        .await
        .expect("deploys");
    let handled = |value: &[u8]| EventCommit {
        command: Some(CommandRecord {
            inbox_id: "hub:7".to_owned(),
            result: record("cmd-result", "a", r#"{"cmd":"hub:7","ok":true}"#),
        }),
        ..put("a", "k", value)
    };
    store
        .commit_event(handled(b"first"))
        .await
        .expect("commits");
    assert!(store.inbox_contains("hub:7").expect("reads"));
    assert_eq!(store.outbox_len().expect("counts"), 1, "the result");
    // A second copy (a redelivery that raced the first): nothing of it is written.
    let err = store
        .commit_event(handled(b"second"))
        .await
        .expect_err("already handled");
    assert!(
        matches!(err, StoreError::CommandHandled(ref id) if id == "hub:7"),
        "{err}"
    );
    let kv = store.load_kv("a").expect("reads");
    assert_eq!(
        kv.get(&("default".to_owned(), "k".to_owned()))
            .map(Vec::as_slice),
        Some(&b"first"[..]),
        "the second copy's write was rolled back"
    );
    assert_eq!(store.outbox_len().expect("counts"), 1, "one result");
    assert_eq!(store.workloads().expect("reads")[0].events_handled, 1);
}

#[tokio::test]
async fn quota_reads_measure_and_list_the_oldest_telemetry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["a"]))
        .await
        .expect("deploys");
    store
        .push_outbox(record("state", "", "0123456789"))
        .await
        .expect("pushes");
    for _ in 0..3 {
        store
            .commit_event(telemetry("a", b"0123456789"))
            .await
            .expect("commits");
    }
    assert_eq!(
        store.outbox_bytes().expect("measures"),
        4 * (10 + OUTBOX_ROW_OVERHEAD)
    );
    let oldest = store.oldest_telemetry(80).expect("reads");
    assert_eq!(
        oldest.len(),
        2,
        "two telemetry rows cover 80 bytes: {oldest:?}"
    );
    assert!(
        oldest
            .iter()
            .all(|r| r.kind == "telemetry" && r.workload == "a")
    );
    let dropped = store
        .delete_outbox(oldest.iter().map(|r| r.id).collect())
        .await
        .expect("deletes");
    assert_eq!(dropped, 2);
    assert_eq!(store.outbox_len().expect("counts"), 2);
}

#[tokio::test]
async fn the_database_and_its_wal_and_shm_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // As an older agent left it: readable by every local user.
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = open(&path);
    store
        .log_event(None, "started", "a write, so the WAL exists")
        .await
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let fresh = dir.path().join("fresh").join("lichen.db");
    let store = open(&fresh);
    store.log_event(None, "started", "x").await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", fresh.display()));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_commits_queues_every_telemetry_row_once_in_order() {
    // 200 workloads commit at once, 3 records each: the writer's batches insert them in
    // multi-row chunks plus a remainder; every row must land once, each workload's in the
    // order it gave them, and every commit is counted.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    let names: Vec<String> = (0..200).map(|i| format!("w{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    store
        .apply_deployment(deployment(&refs))
        .await
        .expect("applies");
    let tasks: Vec<_> = names
        .iter()
        .map(|name| {
            let store = store.clone();
            let mut commit = put(name, "k", b"v");
            commit.telemetry = (0..3)
                .map(|n| TelemetryRecord {
                    stream: format!("s{n}"),
                    payload: format!("{name}-{n}").into_bytes(),
                    created_at_ms: 1000 + n,
                })
                .collect();
            tokio::spawn(async move { store.commit_event(commit).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task ran").expect("commit lands");
    }
    let rows = store.outbox_peek(10_000).expect("reads");
    assert_eq!(rows.len(), 600);
    for name in &names {
        let mine: Vec<&OutboxRow> = rows.iter().filter(|r| &r.workload == name).collect();
        let payloads: Vec<String> = mine
            .iter()
            .map(|r| String::from_utf8(r.payload.clone()).expect("utf-8"))
            .collect();
        assert_eq!(
            payloads,
            vec![
                format!("{name}-0"),
                format!("{name}-1"),
                format!("{name}-2")
            ]
        );
        assert!(mine.windows(2).all(|w| w[0].id < w[1].id));
        assert!(mine.iter().all(|r| r.kind == "telemetry"));
    }
    let counted: u64 = store
        .workloads()
        .expect("reads")
        .iter()
        .map(|w| w.events_handled)
        .sum();
    assert_eq!(counted, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_counts_of_a_version_3_database_carry_over_and_go_with_their_workload() {
    // A database written before the counters moved to their own table keeps its counts and
    // adds to them; a workload removed and deployed again starts from zero.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    {
        let store = open(&path);
        store
            .apply_deployment(deployment(&["old", "gone"]))
            .await
            .expect("applies");
    }
    {
        // What version 3 had: the count in the workloads row, no counters table.
        let conn = Connection::open(&path).expect("opens");
        conn.execute_batch(
            "UPDATE workloads SET events_handled = 41;
             DROP TABLE workload_counters;
             PRAGMA user_version = 3;",
        )
        .expect("rolls back to version 3");
    }
    let store = open(&path);
    assert_eq!(user_version(&path), LATEST_VERSION);
    store
        .commit_event(put("old", "k", b"v"))
        .await
        .expect("commits");
    store
        .commit_event(put("gone", "k", b"v"))
        .await
        .expect("commits");
    let count = |name: &str| {
        store
            .workloads()
            .expect("reads")
            .into_iter()
            .find(|w| w.name == name)
            .map(|w| w.events_handled)
    };
    assert_eq!(count("old"), Some(42));
    assert_eq!(count("gone"), Some(42));
    store
        .apply_deployment(deployment(&["old"]))
        .await
        .expect("removes gone");
    store
        .apply_deployment(deployment(&["old", "gone"]))
        .await
        .expect("deploys gone again");
    store
        .commit_event(put("gone", "k", b"v"))
        .await
        .expect("commits");
    assert_eq!(
        count("gone"),
        Some(1),
        "a new workload of the same name starts at 0"
    );
    assert_eq!(count("old"), Some(42));
}

/// The event commits of one group commit go in multi-row statements (batch.rs): repeated keys
/// and counter additions apply in queue order, a delete runs after the puts queued before it,
/// telemetry keeps the queue's order, and an unknown workload still fails alone.
#[tokio::test]
async fn batched_event_commits_apply_in_queue_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    store
        .apply_deployment(deployment(&["door", "fan"]))
        .await
        .expect("applies");

    // Hold the write lock so the commits queue up behind the writer's first request and form
    // one batch (the current-thread runtime runs the spawned tasks in spawn order).
    let mut blocker = Connection::open(&path).expect("raw open");
    let lock = blocker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("write lock taken");
    let before = store.stats();
    let mut commits = Vec::new();
    for i in 0..70u32 {
        let workload = if i % 2 == 0 { "door" } else { "fan" };
        let mut commit = put(workload, &format!("k{}", i % 10), i.to_string().as_bytes());
        commit.telemetry = vec![TelemetryRecord {
            stream: "s".to_owned(),
            payload: i.to_string().into_bytes(),
            created_at_ms: u64::from(i) + 1,
        }];
        commits.push(commit);
    }
    commits.push(EventCommit {
        kv: vec![KvWrite {
            bucket: "default".to_owned(),
            key: "k2".to_owned(),
            value: None,
        }],
        ..put("door", "unused", b"")
    });
    commits.push(put("ghost", "k1", b"never"));
    commits.push(put("fan", "k1", b"late"));
    let tasks: Vec<_> = commits
        .into_iter()
        .map(|commit| {
            let store = store.clone();
            tokio::spawn(async move { store.commit_event(commit).await })
        })
        .collect();
    tokio::task::yield_now().await;
    lock.commit().expect("write lock released");
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task ran"));
    }

    let ghost = results.remove(71).expect_err("the ghost's commit fails");
    assert!(
        matches!(ghost, StoreError::UnknownWorkload(ref w) if w == "ghost"),
        "{ghost:?}"
    );
    for result in results {
        result.expect("commit lands");
    }
    let after = store.stats();
    assert_eq!(after.requests - before.requests, 73);
    assert!(
        after.transactions - before.transactions < 73,
        "the commits shared transactions: {before:?} -> {after:?}"
    );
    let value = |kv: &std::collections::BTreeMap<(String, String), Vec<u8>>, key: &str| {
        kv.get(&("default".to_owned(), key.to_owned()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let door = store.load_kv("door").expect("reads");
    assert_eq!(door.len(), 4, "{door:?}");
    assert_eq!(value(&door, "k0").as_deref(), Some("60"));
    assert_eq!(value(&door, "k2"), None);
    assert_eq!(value(&door, "k8").as_deref(), Some("68"));
    let fan = store.load_kv("fan").expect("reads");
    assert_eq!(fan.len(), 5, "{fan:?}");
    assert_eq!(value(&fan, "k1").as_deref(), Some("late"));
    assert_eq!(value(&fan, "k9").as_deref(), Some("69"));
    assert!(store.load_kv("ghost").expect("reads").is_empty());
    let counts: Vec<(String, u64)> = store
        .workloads()
        .expect("reads")
        .into_iter()
        .map(|w| (w.name, w.events_handled))
        .collect();
    assert_eq!(
        counts,
        vec![("door".to_owned(), 36), ("fan".to_owned(), 36)]
    );
    let outbox = store.outbox_peek(100).expect("reads");
    let payloads: Vec<String> = outbox
        .iter()
        .map(|row| String::from_utf8_lossy(&row.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..70).map(|i: u32| i.to_string()).collect();
    assert_eq!(payloads, expected);
}

/// A batch of nothing but status rows commits without an fsync of its own (nothing waits on
/// it as durable); any other write is synced again, and both are there after a reopen.
#[tokio::test]
async fn status_rows_alone_commit_unsynced_and_other_writes_synced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = open(&path);
    store
        .apply_deployment(deployment(&["door"]))
        .await
        .expect("applies");
    let before = store.stats();
    store
        .record_status(StatusUpdate {
            workload: "door".to_owned(),
            state: WorkloadState::Running,
            last_error: None,
            restarts: 1,
            traps: 0,
            event: Some(("started".to_owned(), "version 1 running".to_owned())),
        })
        .await
        .expect("records");
    let status_only = store.stats();
    assert_eq!(status_only.unsynced_batches - before.unsynced_batches, 1);
    store
        .commit_event(put("door", "a", b"1"))
        .await
        .expect("commits");
    store
        .log_event(Some("door"), "note", "synced")
        .await
        .expect("logs");
    let synced = store.stats();
    assert_eq!(synced.unsynced_batches, status_only.unsynced_batches);
    assert_eq!(synced.transactions - before.transactions, 3);
    drop(store);

    let store = open(&path);
    let door = &store.workloads().expect("reads")[0];
    assert_eq!((door.state, door.restarts), (WorkloadState::Running, 1));
    assert_eq!(door.events_handled, 1);
    let kinds: Vec<String> = store
        .events(0, 10)
        .expect("reads")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["deployed", "started", "note"]);
}

#[tokio::test]
async fn taps_are_made_by_their_first_subscriber_and_then_see_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&db_path(&dir));
    store
        .apply_deployment(deployment(&["meter"]))
        .await
        .expect("applies");
    let status = |restarts| StatusUpdate {
        workload: "meter".to_owned(),
        state: WorkloadState::Running,
        last_error: None,
        restarts,
        traps: 0,
        event: None,
    };
    let reading = |payload: &[u8]| EventCommit {
        workload: "meter".to_owned(),
        kv: Vec::new(),
        telemetry: vec![TelemetryRecord {
            stream: "power".to_owned(),
            payload: payload.to_vec(),
            created_at_ms: 1,
        }],
        events_handled: 1,
        command: None,
    };
    // Nobody listens yet: the writes go through and nothing is kept for later subscribers.
    store
        .record_status(status(1))
        .await
        .expect("status records");
    store.commit_event(reading(b"1")).await.expect("commits");

    let mut changes = store.status_changes();
    let mut tap = store.telemetry_tap();
    store
        .record_status(status(2))
        .await
        .expect("status records");
    store.commit_event(reading(b"2")).await.expect("commits");
    let wait = Duration::from_secs(10);
    let change = tokio::time::timeout(wait, changes.recv())
        .await
        .expect("a status change within 10 s")
        .expect("the channel is open");
    assert_eq!((change.workload.as_str(), change.restarts), ("meter", 2));
    let record = tokio::time::timeout(wait, tap.recv())
        .await
        .expect("a telemetry record within 10 s")
        .expect("the channel is open");
    assert_eq!(
        (
            record.workload.as_str(),
            record.stream.as_str(),
            record.payload.as_slice()
        ),
        ("meter", "power", b"2".as_slice())
    );
    // A second subscriber shares the same channel: it sees what follows, not what was.
    let mut late = store.status_changes();
    store
        .record_status(status(3))
        .await
        .expect("status records");
    let next =
        |rx: &mut tokio::sync::broadcast::Receiver<StatusUpdate>| rx.try_recv().map(|c| c.restarts);
    assert_eq!(next(&mut changes), Ok(3));
    assert_eq!(next(&mut late), Ok(3));
    assert!(late.try_recv().is_err());
}
