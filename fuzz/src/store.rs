//! The state store under what guests, the hub and deployments write into it: key-value writes
//! and telemetry of events, outbox pushes and deletes, hub commands (inbox), hub state, guest
//! log lines, event-log entries and deployments, with names, keys, payloads and timestamps at
//! their edges, issued in concurrent batches (so the writer's group commit puts several in one
//! transaction) and across restarts (the store closed and opened again on the same file).
//!
//! Properties beyond "no panic", checked against a model after every batch and after every
//! restart: each request succeeds exactly when it should; what succeeded is there (key-value
//! data, hub state, inbox, outbox rows, log lines), what failed left no trace, and a failing
//! request in a batch takes nothing of the others with it.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Unstructured;
use lichen_agent::store::{
    CommandRecord, EventCommit, GuestLogLine, KvWrite, NewDeployment, NewWorkload, OutboxRecord,
    StateStore, StoreOptions, TelemetryRecord,
};

use crate::input::{int, one_in, pick};

/// Log lines kept per workload: small, so trimming happens.
const KEEP_LINES: usize = 5;
const WORKLOADS: &[&str] = &["a", "b", "c", "é-ghost"];
const KINDS: &[&str] = &["telemetry", "state", "cmd-result", "event"];

/// The store as it should be.
#[derive(Debug, Default, Clone)]
struct Model {
    deployed: BTreeSet<String>,
    kv: BTreeMap<(String, String, String), Vec<u8>>,
    hub_state: BTreeMap<String, String>,
    inbox: BTreeSet<String>,
    /// Outbox rows, in no particular order.
    outbox: Vec<Row>,
    logs: BTreeMap<String, Vec<String>>,
}

/// One write request and what the model expects of it.
#[derive(Debug)]
enum Request {
    Deploy(Vec<String>),
    Commit(EventCommit),
    Push(OutboxRecord),
    Delete(Vec<i64>),
    Command(String, OutboxRecord),
    HubState(String, String),
    Logs(Vec<GuestLogLine>),
    Event(Option<String>, String, String),
}

/// The `store` target.
pub fn store(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("lichen.db");
    let options = StoreOptions {
        max_log_lines_per_workload: KEEP_LINES,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut store = Some(StateStore::open(&path, options.clone()).expect("a new store opens"));
    let mut model = Model::default();
    for _ in 0..12 {
        if u.is_empty() {
            break;
        }
        if one_in(&mut u, 8) {
            drop(store.take());
            store = Some(StateStore::open(&path, options.clone()).expect("the store reopens"));
            check(
                store.as_ref().expect("open"),
                &model,
                &[],
                "after a restart",
            );
            continue;
        }
        let current = store.as_ref().expect("open");
        let before: BTreeMap<i64, Row> = current
            .outbox_after(0, usize::MAX)
            .expect("reading the outbox")
            .into_iter()
            .map(|r| (r.id, (r.kind, r.workload, r.stream, r.payload)))
            .collect();
        let ids: Vec<i64> = before.keys().copied().collect();
        let batch: Vec<Request> = (0..int(&mut u, 1..=6))
            .map(|_| request(&mut u, &ids))
            .collect();
        let described = format!("after {batch:?}");
        let results = runtime.block_on(submit(current, batch));
        let mut deletable = Vec::new();
        for (request, ok) in results {
            if let (Request::Delete(ids), true) = (&request, ok) {
                deletable.extend(ids.iter().filter_map(|id| before.get(id)).cloned());
            }
            apply(&mut model, request, ok);
        }
        check(current, &model, &deletable, &described);
        model.outbox = current
            .outbox_after(0, usize::MAX)
            .expect("outbox")
            .into_iter()
            .map(|r| (r.kind, r.workload, r.stream, r.payload))
            .collect();
    }
}

/// An outbox row as the model sees it: kind, workload, stream, payload.
type Row = (String, String, String, Vec<u8>);

/// Submits the batch concurrently (in order), so the writer may group them; returns each
/// request with whether it succeeded.
async fn submit(store: &StateStore, batch: Vec<Request>) -> Vec<(Request, bool)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, request) in batch.into_iter().enumerate() {
        let store = store.clone();
        tasks.spawn(async move {
            let ok = match &request {
                Request::Deploy(names) => store
                    .apply_deployment(NewDeployment {
                        source_name: "deploy.toml".into(),
                        source_text: names.join(","),
                        digest: "d".into(),
                        description: None,
                        workloads: names
                            .iter()
                            .map(|name| NewWorkload {
                                name: name.clone(),
                                spec_json: "{}".into(),
                                module_digest: "m".into(),
                            })
                            .collect(),
                    })
                    .await
                    .is_ok(),
                Request::Commit(commit) => store.commit_event(commit.clone()).await.is_ok(),
                Request::Push(record) => store.push_outbox(record.clone()).await.is_ok(),
                Request::Delete(ids) => store.delete_outbox(ids.clone()).await.is_ok(),
                Request::Command(id, record) => {
                    store.command_done(id, record.clone()).await.is_ok()
                }
                Request::HubState(key, value) => store.set_hub_state(key, value).await.is_ok(),
                Request::Logs(lines) => store.append_logs(lines.clone()).await.is_ok(),
                Request::Event(workload, kind, detail) => store
                    .log_event(workload.as_deref(), kind, detail)
                    .await
                    .is_ok(),
            };
            (index, request, ok)
        });
        // Let the task reach the writer's queue before the next one: submission order.
        tokio::task::yield_now().await;
    }
    let mut results: Vec<(usize, Request, bool)> = tasks.join_all().await;
    results.sort_by_key(|(index, _, _)| *index);
    results.into_iter().map(|(_, r, ok)| (r, ok)).collect()
}

fn text(u: &mut Unstructured<'_>) -> String {
    match int(u, 0..=3) {
        0 => String::new(),
        1 => "k".repeat(pick(u, &[1usize, 256, 10_000])),
        _ => pick(u, &["x", "y", "é", "a\0b", "🦀", "'; DROP TABLE kv; --"]).to_owned(),
    }
}

fn timestamp(u: &mut Unstructured<'_>) -> u64 {
    pick(
        u,
        &[
            0,
            1,
            1_767_225_600_000,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX,
        ],
    )
}

fn record(u: &mut Unstructured<'_>) -> OutboxRecord {
    OutboxRecord {
        kind: pick(u, KINDS).to_owned(),
        workload: pick(u, WORKLOADS).to_owned(),
        stream: text(u),
        payload: text(u).into_bytes(),
        created_at_ms: timestamp(u),
    }
}

fn request(u: &mut Unstructured<'_>, ids: &[i64]) -> Request {
    match int(u, 0..=8) {
        0 => {
            let mut names: Vec<String> = WORKLOADS[..3]
                .iter()
                .filter(|_| one_in(u, 2))
                .map(|n| (*n).to_owned())
                .collect();
            if one_in(u, 6) && !names.is_empty() {
                names.push(names[0].clone());
            }
            Request::Deploy(names)
        }
        1 | 2 => Request::Commit(EventCommit {
            workload: pick(u, WORKLOADS).to_owned(),
            kv: (0..int(u, 0..=3))
                .map(|_| KvWrite {
                    bucket: pick(u, &["default", "", "b"]).to_owned(),
                    key: pick(u, &["n", "m", "", "é"]).to_owned(),
                    value: (!one_in(u, 3)).then(|| text(u).into_bytes()),
                })
                .collect(),
            telemetry: (0..int(u, 0..=2))
                .map(|_| TelemetryRecord {
                    stream: text(u),
                    payload: text(u).into_bytes(),
                    created_at_ms: timestamp(u),
                })
                .collect(),
            events_handled: pick(u, &[0, 1, 7]),
            command: one_in(u, 3).then(|| CommandRecord {
                inbox_id: pick(u, &["hub:1", "hub:2", "n:3", ""]).to_owned(),
                result: record(u),
            }),
        }),
        3 => Request::Push(record(u)),
        4 => {
            let n = int(u, 0..=3);
            Request::Delete(
                (0..n)
                    .map(|_| {
                        if ids.is_empty() || one_in(u, 4) {
                            pick(u, &[-1, 0, i64::MAX, i64::MIN])
                        } else {
                            pick(u, ids)
                        }
                    })
                    .collect(),
            )
        }
        5 => Request::Command(
            pick(u, &["hub:1", "hub:2", "n:3", ""]).to_owned(),
            record(u),
        ),
        6 => Request::HubState(pick(u, &["applied-version", "", "x"]).to_owned(), text(u)),
        7 => Request::Logs(
            (0..int(u, 0..=4))
                .map(|i| GuestLogLine {
                    workload: pick(u, WORKLOADS).to_owned(),
                    at_ms: timestamp(u),
                    level: "info".into(),
                    context: text(u),
                    message: format!("line {i} {}", text(u)),
                })
                .collect(),
        ),
        _ => Request::Event(
            (!one_in(u, 2)).then(|| pick(u, WORKLOADS).to_owned()),
            text(u),
            text(u),
        ),
    }
}

fn fits(ms: u64) -> bool {
    i64::try_from(ms).is_ok()
}

/// Checks that `request` succeeded exactly when it should have, and applies it to the model.
fn apply(model: &mut Model, request: Request, ok: bool) {
    let expected = match &request {
        Request::Deploy(names) => {
            let unique: BTreeSet<&String> = names.iter().collect();
            unique.len() == names.len()
        }
        // A commit that carries a hub command already handled is refused whole (the command's
        // writes must happen once).
        Request::Commit(c) => {
            model.deployed.contains(&c.workload)
                && c.telemetry.iter().all(|t| fits(t.created_at_ms))
                && c.command.as_ref().is_none_or(|command| {
                    !model.inbox.contains(&command.inbox_id) && fits(command.result.created_at_ms)
                })
        }
        Request::Push(r) => fits(r.created_at_ms),
        Request::Command(id, r) => model.inbox.contains(id) || fits(r.created_at_ms),
        // Lines of workloads the store does not have are dropped before their time is read.
        Request::Logs(lines) => lines
            .iter()
            .all(|l| !model.deployed.contains(&l.workload) || fits(l.at_ms)),
        Request::Delete(_) | Request::HubState(..) | Request::Event(..) => true,
    };
    assert_eq!(
        ok, expected,
        "{request:?} succeeded: {ok}, expected {expected}"
    );
    if !ok {
        return;
    }
    match request {
        Request::Deploy(names) => {
            let listed: BTreeSet<String> = names.into_iter().collect();
            model.kv.retain(|(w, _, _), _| listed.contains(w));
            model.logs.retain(|w, _| listed.contains(w));
            model.deployed = listed;
        }
        Request::Commit(c) => {
            if let Some(command) = c.command {
                model.inbox.insert(command.inbox_id);
                push(model, command.result);
            }
            for write in c.kv {
                let key = (c.workload.clone(), write.bucket, write.key);
                match write.value {
                    Some(v) => {
                        model.kv.insert(key, v);
                    }
                    None => {
                        model.kv.remove(&key);
                    }
                }
            }
            for t in c.telemetry {
                model
                    .outbox
                    .push(("telemetry".into(), c.workload.clone(), t.stream, t.payload));
            }
        }
        Request::Push(r) => push(model, r),
        // What a delete removed is checked against the rows read before the batch.
        Request::Delete(_) => {}
        Request::Command(id, r) => {
            if model.inbox.insert(id) {
                push(model, r);
            }
        }
        Request::HubState(key, value) => {
            model.hub_state.insert(key, value);
        }
        Request::Logs(lines) => {
            for line in lines {
                if model.deployed.contains(&line.workload) {
                    let kept = model.logs.entry(line.workload).or_default();
                    kept.push(line.message);
                    let excess = kept.len().saturating_sub(KEEP_LINES);
                    kept.drain(..excess);
                }
            }
        }
        Request::Event(..) => {}
    }
}

fn push(model: &mut Model, r: OutboxRecord) {
    if r.kind == "state" {
        model.outbox.retain(|(kind, ..)| kind != "state");
    }
    model.outbox.push((r.kind, r.workload, r.stream, r.payload));
}

/// Compares the store with the model. Outbox rows are compared by content: every row in the
/// store must be one the model expects, and a row the model expects may be missing only if a
/// delete of the batch named it (`deletable`).
fn check(store: &StateStore, model: &Model, deletable: &[Row], after: &str) {
    let workloads: BTreeSet<String> = store
        .workloads()
        .expect("reading the workloads")
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(workloads, model.deployed, "workloads {after}");
    for workload in WORKLOADS {
        let kv: BTreeMap<(String, String), Vec<u8>> = store.load_kv(workload).expect("kv");
        let expected: BTreeMap<(String, String), Vec<u8>> = model
            .kv
            .iter()
            .filter(|((w, _, _), _)| w == workload)
            .map(|((_, b, k), v)| ((b.clone(), k.clone()), v.clone()))
            .collect();
        assert_eq!(kv, expected, "key-value data of {workload:?} {after}");
        let logs: Vec<String> = store
            .recent_logs(workload, usize::MAX)
            .expect("logs")
            .into_iter()
            .map(|l| l.message)
            .collect();
        let expected = model.logs.get(*workload).cloned().unwrap_or_default();
        assert_eq!(logs, expected, "log lines of {workload:?} {after}");
    }
    for (key, value) in &model.hub_state {
        assert_eq!(
            store.hub_state(key).expect("hub state").as_ref(),
            Some(value),
            "hub state {key:?} {after}"
        );
    }
    for id in &model.inbox {
        assert!(
            store.inbox_contains(id).expect("inbox"),
            "inbox {id:?} {after}"
        );
    }
    let mut rows: Vec<Row> = store
        .outbox_after(0, usize::MAX)
        .expect("outbox")
        .into_iter()
        .map(|r| (r.kind, r.workload, r.stream, r.payload))
        .collect();
    rows.sort();
    // Every row in the store is one the model expects (no write that failed left a row).
    let mut remaining = model.outbox.clone();
    for row in &rows {
        let at = remaining
            .iter()
            .position(|r| r == row)
            .unwrap_or_else(|| panic!("outbox row {row:?} {after} is no write that succeeded"));
        remaining.remove(at);
    }
    // And every row the model expects is there, unless a delete named it.
    let mut deletable = deletable.to_vec();
    for row in remaining {
        let at = deletable
            .iter()
            .position(|r| *r == row)
            .unwrap_or_else(|| panic!("outbox row {row:?} is missing {after}"));
        deletable.remove(at);
    }
}
