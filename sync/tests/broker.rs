//! `lichen-sync` against a real Mosquitto on loopback.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lichen_sync::testing::FakeOutbox;
use lichen_sync::{
    Envelope, Inbound, InboundError, MessageId, RowKind, SessionConfig, SessionEvent, SyncSession,
    TlsFiles, TopicKind, Topics,
};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use support::{Mosquitto, Watcher, make_ca, make_leaf, stop, wait_event};

fn config(port: u16) -> SessionConfig {
    let mut c = SessionConfig::new("n1", "127.0.0.1", port);
    c.keep_alive = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(2);
    c.backoff_initial = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(500);
    c.outbox_poll = Duration::from_millis(100);
    c
}

/// One message as the watcher saw it.
#[derive(Debug)]
struct Seen {
    stream: String,
    id: MessageId,
    bytes: Vec<u8>,
}

/// Receives telemetry until `unique` distinct ids arrived (counting those `already` seen);
/// returns everything seen.
async fn collect(
    watcher: &mut Watcher,
    already: Vec<Seen>,
    unique: usize,
    within: Duration,
) -> Vec<Seen> {
    let topics = Topics::new("n1").unwrap();
    let mut ids: std::collections::HashSet<MessageId> =
        already.iter().map(|s| s.id.clone()).collect();
    let mut seen = already;
    let deadline = tokio::time::Instant::now() + within;
    while ids.len() < unique {
        let Ok(Some((topic, bytes))) =
            tokio::time::timeout_at(deadline, watcher.messages.recv()).await
        else {
            panic!(
                "only {} of {unique} records arrived within {within:?}",
                ids.len()
            );
        };
        let Some(TopicKind::Telemetry { stream, .. }) = topics.parse(&topic) else {
            continue;
        };
        let env = Envelope::from_bytes(&bytes).expect("every record is an envelope");
        ids.insert(env.id.clone());
        seen.push(Seen {
            stream,
            id: env.id,
            bytes,
        });
    }
    seen
}

/// Asserts per-stream order (by first arrival) and that a repeated id repeats the same bytes.
/// Returns the number of duplicates.
fn assert_ordered_without_conflicting_duplicates(seen: &[Seen]) -> usize {
    let mut first: HashMap<&MessageId, &[u8]> = HashMap::new();
    let mut last_seq: BTreeMap<&str, u64> = BTreeMap::new();
    let mut duplicates = 0;
    for s in seen {
        assert_eq!(s.id.node, "n1");
        if let Some(bytes) = first.get(&s.id) {
            assert_eq!(*bytes, s.bytes.as_slice(), "duplicate {} differs", s.id);
            duplicates += 1;
            continue;
        }
        first.insert(&s.id, &s.bytes);
        let last = last_seq.entry(&s.stream).or_default();
        assert!(
            s.id.seq > *last,
            "stream {} out of order: {} after seq {last}",
            s.stream,
            s.id
        );
        *last = s.id.seq;
    }
    duplicates
}

async fn wait_empty(outbox: &FakeOutbox, within: Duration) {
    if let Err(left) = outbox.wait_rows(within, |n| n == 0).await {
        panic!("outbox still holds {left} rows after {within:?}");
    }
}

/// Drains session events in the background so the session never waits on the channel.
fn keep_events(
    mut events: tokio::sync::mpsc::Receiver<SessionEvent>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(e) = events.recv().await {
            all.push(format!("{e:?}"));
        }
        all
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_records_reach_a_subscriber_in_order_with_their_message_ids() {
    let broker = Mosquitto::start();
    let mut watcher = Watcher::connect(broker.port, "watcher", "lichen/v1/n1/#").await;
    let outbox = Arc::new(FakeOutbox::new());
    const N: usize = 10_000;
    for i in 0..N {
        let stream = ["a", "b", "c"][i % 3];
        outbox.push(
            RowKind::Telemetry,
            "w",
            stream,
            json!({ "i": i, "pad": "x".repeat(150) }),
        );
    }

    let (session, handle, events) = SyncSession::new(config(broker.port), outbox.clone()).unwrap();
    let events = keep_events(events);
    let started = Instant::now();
    let task = tokio::spawn(session.run());
    let seen = collect(&mut watcher, Vec::new(), N, Duration::from_secs(60)).await;
    wait_empty(&outbox, Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    println!(
        "{N} records of ~200 B published, acknowledged and deleted in {elapsed:?}: {:.0} msgs/s \
         (connect included, debug build)",
        N as f64 / elapsed.as_secs_f64()
    );

    assert_eq!(assert_ordered_without_conflicting_duplicates(&seen), 0);
    let mut seqs: Vec<u64> = seen.iter().map(|s| s.id.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "ids are the row ids"
    );
    assert_eq!(outbox.deleted(), N as u64);
    stop(handle, task).await;
    let events = events.await.unwrap();
    assert!(
        events.iter().any(|e| e.starts_with("Connected")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_while_records_are_queued_loses_nothing() {
    // Persistence so the watcher's queued messages survive the restart like a real hub's.
    let mut broker = Mosquitto::start_with(
        "persistence true\npersistence_location {dir}/\nautosave_interval 0\n",
    );
    let mut watcher = Watcher::connect(broker.port, "watcher", "lichen/v1/n1/telemetry/#").await;
    let outbox = Arc::new(FakeOutbox::new());
    let mut cfg = config(broker.port);
    cfg.max_inflight = 20;
    let (session, handle, events) = SyncSession::new(cfg, outbox.clone()).unwrap();
    let events = keep_events(events);
    let task = tokio::spawn(session.run());

    // A producer writes 2 records per millisecond-ish tick for ~3 s, across two streams.
    const TICKS: usize = 1500;
    let producer = {
        let (outbox, handle) = (outbox.clone(), handle.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            for i in 0..TICKS {
                tick.tick().await;
                for stream in ["temp", "door"] {
                    outbox.push(RowKind::Telemetry, "w", stream, json!({ "i": i }));
                }
                handle.outbox_changed();
            }
        })
    };
    // Records flow before the outage...
    let before = collect(&mut watcher, Vec::new(), 200, Duration::from_secs(30)).await;
    tokio::task::block_in_place(|| broker.stop());
    let queued_at_stop = outbox.len();
    // ...and pile up in the outbox while the broker is away.
    let queued_offline = outbox
        .wait_rows(Duration::from_secs(30), |n| n >= queued_at_stop + 200)
        .await
        .unwrap_or_else(|rows| panic!("no records queued while offline: {rows} rows"));
    tokio::task::block_in_place(|| broker.restart());
    producer.await.unwrap();

    let seen = collect(&mut watcher, before, 2 * TICKS, Duration::from_secs(60)).await;
    wait_empty(&outbox, Duration::from_secs(20)).await;
    let duplicates = assert_ordered_without_conflicting_duplicates(&seen);
    println!(
        "broker restart: {} records, {queued_at_stop} queued when the broker stopped, \
         {queued_offline} after 1 s offline, {duplicates} duplicates (same id)",
        2 * TICKS
    );
    assert!(
        queued_offline > queued_at_stop,
        "records were queued while offline"
    );
    stop(handle, task).await;
    let events = events.await.unwrap();
    assert!(
        events.iter().any(|e| e.starts_with("Disconnected")),
        "the session saw the broker go: {events:#?}"
    );
    assert!(
        events.iter().filter(|e| e.starts_with("Connected")).count() >= 2,
        "and reconnected: {events:#?}"
    );
}

/// A hub-side client publishing raw payloads.
async fn hub_client(port: u16) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut options = MqttOptions::new("hub", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let task = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                // The broker is away (a test restarts it): reconnect at this pace.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    (client, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_desired_state_is_reported_and_the_session_keeps_working() {
    let broker = Mosquitto::start();
    let outbox = Arc::new(FakeOutbox::new());
    let (session, handle, mut events) =
        SyncSession::new(config(broker.port), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let mut seen = Vec::new();
    let t = Duration::from_secs(10);
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;

    let (hub, hub_task) = hub_client(broker.port).await;
    let desired = "lichen/v1/n1/desired";
    let good = json!({"id": "hub:2", "ts": 5, "payload": {"version": 2}}).to_string();
    hub.publish(desired, QoS::AtLeastOnce, false, "{not json")
        .await
        .unwrap();
    hub.publish(desired, QoS::AtLeastOnce, false, good)
        .await
        .unwrap();

    let rejected = wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Rejected(_))
    })
    .await;
    let SessionEvent::Rejected(err @ InboundError::Malformed { .. }) = rejected else {
        panic!("expected a malformed-message report, got {rejected:?}");
    };
    assert!(
        err.to_string()
            .starts_with("malformed message on \"lichen/v1/n1/desired\": "),
        "{err}"
    );
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::Desired(env)) = ev else {
        panic!("expected the good deployment, got {ev:?}");
    };
    assert_eq!(env.id, MessageId::new("hub", 2));
    assert_eq!(env.payload, json!({"version": 2}));

    // Commands: a QoS 1 duplicate is delivered once; the connection is the same throughout.
    let cmd = |seq: u64| json!({"id": format!("hub:{seq}"), "ts": 6, "payload": {"open": true}});
    for seq in [7, 7, 8] {
        hub.publish(
            "lichen/v1/n1/cmd/door",
            QoS::AtLeastOnce,
            false,
            cmd(seq).to_string(),
        )
        .await
        .unwrap();
    }
    for want in [7, 8] {
        let ev = wait_event(&mut events, &mut seen, t, |e| {
            matches!(e, SessionEvent::Inbound(_))
        })
        .await;
        let SessionEvent::Inbound(Inbound::Command {
            workload,
            envelope,
            ack,
        }) = ev
        else {
            panic!("expected a command, got {ev:?}");
        };
        assert_eq!((workload.as_str(), envelope.id.seq), ("door", want));
        ack.ack();
    }
    assert!(
        !seen.iter().any(|e| e.starts_with("Disconnected")),
        "the connection never dropped: {seen:#?}"
    );
    stop(handle, task).await;
    hub_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_a_wrong_ca_is_refused_with_a_clear_error() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_ca(d, "good");
    make_ca(d, "other");
    make_leaf(d, "good", "server", "localhost", "serverAuth");
    make_leaf(d, "good", "client", "n1", "clientAuth");
    let broker = Mosquitto::start_with(&format!(
        "cafile {d}/good-ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
         require_certificate true\npersistence false\n",
        d = d.display()
    ));
    let tls = |ca: &str, client: bool| TlsFiles {
        ca: d.join(format!("{ca}-ca.pem")),
        client: client.then(|| (d.join("client.pem"), d.join("client.key"))),
    };
    let t = Duration::from_secs(10);

    // The right CA and a client certificate: connected, and a record gets its PUBACK.
    let outbox = Arc::new(FakeOutbox::new());
    outbox.push(RowKind::Telemetry, "w", "s", json!(1));
    let mut cfg = config(broker.port);
    cfg.host = "localhost".into();
    cfg.tls = Some(tls("good", true));
    let (session, handle, mut events) = SyncSession::new(cfg.clone(), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let mut seen = Vec::new();
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Connected { .. })
    })
    .await;
    wait_empty(&outbox, t).await;
    stop(handle, task).await;

    // A CA that did not sign the broker's certificate: refused, saying so.
    cfg.tls = Some(tls("other", true));
    let (session, handle, mut events) = SyncSession::new(cfg.clone(), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(
            e,
            SessionEvent::ConnectFailed { .. } | SessionEvent::Connected { .. }
        )
    })
    .await;
    let SessionEvent::ConnectFailed { error, .. } = ev else {
        panic!("connected although the CA is wrong: {ev:?}");
    };
    println!("wrong CA: {error}");
    assert!(
        error.starts_with(&format!("mqtts://localhost:{}: ", broker.port)),
        "{error}"
    );
    assert!(error.contains("invalid peer certificate"), "{error}");
    assert!(
        error.contains("not trusted by the CA file") && error.contains("other-ca.pem"),
        "{error}"
    );
    stop(handle, task).await;

    // No client certificate where the broker requires one: refused too.
    cfg.tls = Some(tls("good", false));
    let (session, handle, mut events) = SyncSession::new(cfg, outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(
            e,
            SessionEvent::ConnectFailed { .. } | SessionEvent::Connected { .. }
        )
    })
    .await;
    assert!(matches!(ev, SessionEvent::ConnectFailed { .. }), "{ev:?}");
    stop(handle, task).await;
}

#[test]
fn unreadable_or_empty_tls_files_are_config_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let mut cfg = config(1);
    cfg.tls = Some(TlsFiles {
        ca: dir.path().join("missing.pem"),
        client: None,
    });
    let err = SyncSession::new(cfg.clone(), Arc::new(FakeOutbox::new()))
        .err()
        .expect("missing CA file");
    assert!(err.to_string().starts_with("cannot read CA file "), "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    cfg.tls = Some(TlsFiles {
        ca: empty.clone(),
        client: None,
    });
    let err = SyncSession::new(cfg, Arc::new(FakeOutbox::new()))
        .err()
        .expect("empty CA file");
    assert_eq!(
        err.to_string(),
        format!("CA file {} holds no PEM certificate", empty.display())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_subscriptions_bring_retained_chunks_and_survive_a_broker_restart() {
    let mut broker = Mosquitto::start_with(support::PERSISTENT);
    let outbox = Arc::new(FakeOutbox::new());
    let (session, handle, mut events) =
        SyncSession::new(config(broker.port), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let mut seen = Vec::new();
    let t = Duration::from_secs(10);
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;

    let topics = Topics::new("n1").unwrap();
    let digest = "ab".repeat(32);
    let (hub, hub_task) = hub_client(broker.port).await;
    for i in 0..3u32 {
        hub.publish(
            topics.artifact_chunk(&digest, i),
            QoS::AtLeastOnce,
            true,
            vec![i.to_le_bytes()[0]; 4],
        )
        .await
        .unwrap();
    }
    // Only chunk 1 is asked for: only chunk 1 comes (retained).
    handle.subscribe(vec![topics.artifact_chunk(&digest, 1)]);
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::ArtifactChunk {
        digest: d,
        index,
        bytes,
    }) = ev
    else {
        panic!("expected a chunk, got {ev:?}");
    };
    assert_eq!((d.as_str(), index, bytes), (digest.as_str(), 1, vec![1; 4]));

    // A subscription added while the broker is down is made on the next connection, together
    // with the earlier one, which the restart did not lose.
    broker.stop();
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Disconnected { .. })
    })
    .await;
    handle.unsubscribe(vec![topics.artifact_chunk(&digest, 1)]);
    handle.subscribe(vec![topics.artifact_chunk(&digest, 2)]);
    broker.restart();
    let ev = wait_event(&mut events, &mut seen, Duration::from_secs(20), |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::ArtifactChunk { index, .. }) = ev else {
        panic!("expected a chunk, got {ev:?}");
    };
    assert_eq!(
        index, 2,
        "chunk 1 was unsubscribed, chunk 0 never asked for"
    );
    // A later subscription's retained message comes after anything the earlier ones bring:
    // the next chunk seen must be this one.
    hub.publish(
        topics.artifact_chunk(&digest, 9),
        QoS::AtLeastOnce,
        true,
        vec![9; 4],
    )
    .await
    .unwrap();
    handle.subscribe(vec![topics.artifact_chunk(&digest, 9)]);
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::ArtifactChunk { index, .. }) = ev else {
        panic!("expected a chunk, got {ev:?}");
    };
    assert_eq!(index, 9, "a chunk that was not asked for came first");
    stop(handle, task).await;
    hub_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_acknowledged_only_when_the_agent_says_so() {
    let broker = Mosquitto::start_with(support::PERSISTENT);
    let outbox = Arc::new(FakeOutbox::new());
    let t = Duration::from_secs(10);
    let (hub, hub_task) = hub_client(broker.port).await;

    // One run of the agent: once subscribed, the hub publishes command `publish`; the run
    // takes every command handed over until that one (acknowledging them if `ack`), then
    // stops cleanly. A redelivered command comes before the new one, maybe before the SUBACK.
    let run = async |publish: u64, ack: bool| -> Vec<u64> {
        let (session, handle, mut events) =
            SyncSession::new(config(broker.port), outbox.clone()).unwrap();
        let task = tokio::spawn(session.run());
        let mut got = Vec::new();
        tokio::time::timeout(t, async {
            loop {
                match events.recv().await.expect("session runs") {
                    SessionEvent::Subscribed => hub
                        .publish(
                            "lichen/v1/n1/cmd/door",
                            QoS::AtLeastOnce,
                            false,
                            command(publish),
                        )
                        .await
                        .unwrap(),
                    SessionEvent::Inbound(Inbound::Command {
                        envelope, ack: a, ..
                    }) => {
                        got.push(envelope.id.seq);
                        if ack {
                            a.ack();
                        }
                        if envelope.id.seq == publish {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("command {publish} not handed over; got {got:?}"));
        stop(handle, task).await;
        got
    };
    // The agent "crashes" before making command 5 durable: no PUBACK.
    assert_eq!(run(5, false).await, [5]);
    // The broker redelivers it, before the new command 6; both are acknowledged now.
    assert_eq!(run(6, true).await, [5, 6], "5 redelivered first");
    // Nothing is pending any more: 7 is the first command handed over.
    assert_eq!(run(7, true).await, [7], "acknowledged for good");
    hub_task.abort();
}

fn command(seq: u64) -> String {
    json!({"id": format!("hub:{seq}"), "ts": 1, "payload": {}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_while_handled_is_held_until_the_agent_acknowledges_it() {
    let mut broker = Mosquitto::start_with(support::PERSISTENT);
    let outbox = Arc::new(FakeOutbox::new());
    let t = Duration::from_secs(10);
    let (session, handle, mut events) =
        SyncSession::new(config(broker.port), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let mut seen = Vec::new();
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;
    let (hub, hub_task) = hub_client(broker.port).await;
    let cmd = "lichen/v1/n1/cmd/door";
    hub.publish(cmd, QoS::AtLeastOnce, false, command(9))
        .await
        .unwrap();
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::Command { ack, .. }) = ev else {
        panic!("expected the command, got {ev:?}");
    };

    // The link drops while the agent still handles it: the broker redelivers it on the next
    // connection; the session does not hand it over twice and holds its PUBACK.
    broker.stop();
    broker.restart();
    wait_event(&mut events, &mut seen, Duration::from_secs(20), |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;
    // A new command after the redelivered one: once it is handed over, the copy of 9 has come.
    hub.publish(cmd, QoS::AtLeastOnce, false, command(10))
        .await
        .unwrap();
    let ev = wait_event(&mut events, &mut seen, Duration::from_secs(20), |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::Command {
        envelope,
        ack: ack10,
        ..
    }) = ev
    else {
        panic!("expected command 10, got {ev:?}");
    };
    assert_eq!(
        envelope.id,
        MessageId::new("hub", 10),
        "9 was handed over twice"
    );
    ack10.ack();
    hub_task.abort();
    // The agent dies before it made 9 durable (it never acknowledges).
    stop(handle, task).await;
    drop(ack);
    assert!(
        !seen
            .iter()
            .any(|e| e.starts_with("Inbound(Command") && e.contains("hub:9")),
        "handed over twice: {seen:#?}"
    );

    // The next run of the agent gets it again: it was not lost.
    let (session, handle, mut events) = SyncSession::new(config(broker.port), outbox).unwrap();
    let task = tokio::spawn(session.run());
    let ev = wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Inbound(_))
    })
    .await;
    let SessionEvent::Inbound(Inbound::Command { envelope, .. }) = ev else {
        panic!("expected command 9 again, got {ev:?}");
    };
    assert_eq!(
        envelope.id,
        MessageId::new("hub", 9),
        "the command was not acknowledged behind the agent's back"
    );
    stop(handle, task).await;
}

/// A hub-side client that can publish messages of up to `max` bytes.
async fn big_hub_client(port: u16, max: usize) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut options = MqttOptions::new("big-hub", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(max, max);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    (client, task)
}

/// The next inbound message; connection drops are failures.
async fn next_inbound(
    events: &mut tokio::sync::mpsc::Receiver<SessionEvent>,
    seen: &mut Vec<String>,
) -> SessionEvent {
    let ev = wait_event(events, seen, Duration::from_secs(30), |e| {
        matches!(
            e,
            SessionEvent::Inbound(_)
                | SessionEvent::Rejected(_)
                | SessionEvent::Disconnected { .. }
                | SessionEvent::ConnectFailed { .. }
        )
    })
    .await;
    assert!(
        !matches!(
            ev,
            SessionEvent::Disconnected { .. } | SessionEvent::ConnectFailed { .. }
        ),
        "the connection dropped: {ev:?}"
    );
    ev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_messages_are_refused_acknowledged_and_the_session_stays_up() {
    let broker = Mosquitto::start_with(support::PERSISTENT);
    let outbox = Arc::new(FakeOutbox::new());
    let (session, handle, mut events) =
        SyncSession::new(config(broker.port), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let mut seen = Vec::new();
    let t = Duration::from_secs(10);
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;
    let (hub, hub_task) = big_hub_client(broker.port, 64 << 20).await;
    let padded = |id: &str, bytes: usize| {
        let mut p = format!(r#"{{"id":"{id}","ts":1,"payload":""#).into_bytes();
        p.resize(bytes - 2, b'x');
        p.extend(b"\"}");
        p
    };

    // A retained desired state of 2 MiB: refused naming the limit, not a broken connection.
    let desired = "lichen/v1/n1/desired";
    hub.publish(desired, QoS::AtLeastOnce, true, padded("hub:1", 2 << 20))
        .await
        .unwrap();
    let ev = next_inbound(&mut events, &mut seen).await;
    let SessionEvent::Rejected(e) = ev else {
        panic!("expected the desired state refused, got {ev:?}");
    };
    assert_eq!(
        e.to_string(),
        "message of 2097152 bytes on \"lichen/v1/n1/desired\" is over the 1048576-byte limit for messages from the hub"
    );

    // A command of 50 MiB: refused with its id (read from its first bytes) and the limit.
    let cmd = "lichen/v1/n1/cmd/door";
    hub.publish(cmd, QoS::AtLeastOnce, false, padded("hub:2", 50 << 20))
        .await
        .unwrap();
    // Over the command limit (64 KiB) but under the packet limit; then not JSON at all.
    hub.publish(cmd, QoS::AtLeastOnce, false, padded("hub:3", 100 << 10))
        .await
        .unwrap();
    hub.publish(cmd, QoS::AtLeastOnce, false, "not json")
        .await
        .unwrap();
    hub.publish(cmd, QoS::AtLeastOnce, false, command(4))
        .await
        .unwrap();
    let mut refused = Vec::new();
    loop {
        match next_inbound(&mut events, &mut seen).await {
            SessionEvent::Inbound(Inbound::RefusedCommand {
                workload,
                id,
                error,
                ack,
            }) => {
                assert_eq!(workload, "door");
                refused.push((id.map(|i| i.to_string()), error));
                ack.ack();
            }
            SessionEvent::Inbound(Inbound::Command { envelope, ack, .. }) => {
                assert_eq!(envelope.id, MessageId::new("hub", 4));
                ack.ack();
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let [(id2, e2), (id3, e3), (id4, e4)] = &refused[..] else {
        panic!("three refused commands: {refused:#?}");
    };
    assert_eq!(id2.as_deref(), Some("hub:2"));
    assert!(
        e2.contains("command of 52428800 bytes") && e2.contains("1048576-byte limit"),
        "{e2}"
    );
    assert_eq!(id3.as_deref(), Some("hub:3"));
    assert!(
        e3.contains("over the 65536-byte limit for commands"),
        "{e3}"
    );
    assert_eq!(id4, &None);
    assert!(
        e4.starts_with("malformed command on \"lichen/v1/n1/cmd/door\""),
        "{e4}"
    );
    stop(handle, task).await;

    // The next connection: the retained desired state is refused again (the broker keeps it),
    // and no command comes back: every refused one was acknowledged.
    let (session, handle, mut events) = SyncSession::new(config(broker.port), outbox).unwrap();
    let task = tokio::spawn(session.run());
    wait_event(&mut events, &mut seen, t, |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;
    hub.publish(cmd, QoS::AtLeastOnce, false, command(5))
        .await
        .unwrap();
    let mut rejected = 0;
    loop {
        match next_inbound(&mut events, &mut seen).await {
            SessionEvent::Rejected(e) => {
                assert!(e.to_string().contains("desired"), "{e}");
                rejected += 1;
            }
            SessionEvent::Inbound(Inbound::Command { envelope, .. }) => {
                assert_eq!(
                    envelope.id,
                    MessageId::new("hub", 5),
                    "a refused command came back"
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rejected, 1, "the retained desired state, once");
    stop(handle, task).await;
    hub_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_commands_keeps_the_session_and_hands_each_over_once() {
    // No in-flight limit on the broker's side: it sends as fast as it can, and only the
    // session's backpressure holds it.
    let broker = Mosquitto::start_with("persistence false\nmax_inflight_messages 0\n");
    let outbox = Arc::new(FakeOutbox::new());
    let (session, handle, mut events) =
        SyncSession::new(config(broker.port), outbox.clone()).unwrap();
    let task = tokio::spawn(session.run());
    let mut seen = Vec::new();
    wait_event(&mut events, &mut seen, Duration::from_secs(10), |e| {
        matches!(e, SessionEvent::Subscribed)
    })
    .await;
    const N: u64 = 10_000;
    let (hub, hub_task) = hub_client(broker.port).await;
    let publisher = tokio::spawn(async move {
        for seq in 1..=N {
            hub.publish(
                "lichen/v1/n1/cmd/door",
                QoS::AtLeastOnce,
                false,
                command(seq),
            )
            .await
            .unwrap();
        }
        hub
    });

    // The "agent": each command's result goes to the outbox (so results are published while
    // commands pour in), then the command is acknowledged from another task.
    let started = Instant::now();
    let mut handed: HashMap<u64, u32> = HashMap::new();
    while handed.len() < usize::try_from(N).unwrap() {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {N} commands after 60 s", handed.len()))
            .expect("session runs");
        match ev {
            SessionEvent::Inbound(Inbound::Command { envelope, ack, .. }) => {
                *handed.entry(envelope.id.seq).or_default() += 1;
                outbox.push(
                    RowKind::CmdResult,
                    "door",
                    "",
                    json!({"cmd": envelope.id.to_string(), "ok": true}),
                );
                handle.outbox_changed();
                tokio::spawn(async move { ack.ack() });
            }
            other => seen.push(format!("{other:?}")),
        }
    }
    let elapsed = started.elapsed();
    wait_empty(&outbox, Duration::from_secs(60)).await;
    println!(
        "{N} commands handed over and their results published in {elapsed:?} ({:.0}/s, debug build)",
        N as f64 / elapsed.as_secs_f64()
    );
    assert!(
        handed.values().all(|&n| n == 1),
        "a command was handed over twice"
    );
    assert!(
        !seen
            .iter()
            .any(|e| e.starts_with("Disconnected") || e.starts_with("ConnectFailed")),
        "the session dropped under the flood: {seen:#?}"
    );
    let hub = publisher.await.unwrap();
    drop(hub);
    stop(handle, task).await;
    hub_task.abort();
}
