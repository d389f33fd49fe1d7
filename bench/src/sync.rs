//! `lichen bench sync`: the hub link's figures, against a real Mosquitto on loopback (started
//! here, killed by its PID) and the agent's real SQLite outbox.
//!
//! 1. Durable ingest: 64 concurrent producers (workloads) each commit one 200-byte telemetry
//!    record per event through the state store, each awaiting its commit, the way a guest's
//!    event is acknowledged only once its effects are durable. Bytes written to disk per record
//!    are read from `/proc/self/io` (`write_bytes`: what reached the block layer) and from the
//!    growth of the database and WAL files.
//! 2. Catch-up: those records, buffered with no broker, drained by a `SyncSession` once the
//!    broker is there; time until the outbox is empty.
//! 3. Live drain: the same producers again while the session drains; records/s from the first
//!    commit until the outbox is empty.
//! 4. Loss: the real daemon (this binary's `run`) with a fast counter, through N rounds of broker
//!    restart and `kill -9` of the agent; a subscriber with a persistent session checks that
//!    every count arrives, in order, duplicates only with the same message id.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lichen_sync::SyncSession;

use super::{Table, fmt_count, fmt_duration, fmt_rate};
use crate::BenchArgs;
use lichen_agent::store::{
    EventCommit, NewDeployment, NewWorkload, SqliteOutbox, StateStore, StoreOptions,
    TelemetryRecord,
};

/// Concurrent producers (workloads) in the ingest and live-drain phases, unless `--count`
/// says otherwise.
const PRODUCERS: usize = 64;
/// Size of each telemetry record's payload.
const RECORD_BYTES: usize = 200;
/// Records ingested (and caught up) unless `--events` says otherwise.
const DEFAULT_RECORDS: u64 = 100_000;
/// Rounds of broker restart + `kill -9` unless `--iterations` says otherwise.
const DEFAULT_ROUNDS: usize = 20;

/// A `mosquitto` started for the benchmark, killed by its PID when dropped.
struct Broker {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
}

impl Broker {
    fn start(dir: &Path) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free loopback port")?
            .port();
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("mosquitto.conf");
        // As root, mosquitto drops to its own user, which could not write the persistence file
        // in our directory.
        let is_root = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        let user = if is_root { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 0\n{user}",
                dir.display()
            ),
        )?;
        let mut broker = Broker {
            child: None,
            port,
            conf,
            log: dir.join("mosquitto.log"),
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(mosquitto()?)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start mosquitto")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("mosquitto did not listen on port {} within 10 s", self.port)
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn mosquitto() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .context("mosquitto is not installed (Debian package `mosquitto`): the sync benchmark needs a real broker")
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// Bytes this process has caused to be written to storage (`/proc/self/io` `write_bytes`).
fn write_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// A 200-byte JSON telemetry record.
fn record(seq: u64) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq},\"pad\":\"");
    let mut out = head.into_bytes();
    out.resize(RECORD_BYTES - 2, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// `records` records from `producers` concurrent producers, each awaiting its commit.
async fn produce(store: &StateStore, records: u64, producers: usize) -> Result<Duration> {
    let per = records.div_ceil(producers as u64);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let now = u64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis(),
                )
                .unwrap_or(0);
                store
                    .commit_event(EventCommit {
                        workload: format!("w{p}"),
                        kv: Vec::new(),
                        telemetry: vec![TelemetryRecord {
                            stream: "s".into(),
                            payload: record(i),
                            created_at_ms: now,
                        }],
                        events_handled: 1,
                        command: None,
                    })
                    .await?;
            }
            Ok::<_, lichen_agent::store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await.context("producer task")??;
    }
    Ok(start.elapsed())
}

async fn wait_empty(store: &StateStore, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if store.outbox_len()? == 0 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "the outbox still holds {} rows after {within:?}",
                store.outbox_len()?
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the benchmark; returns its summary lines.
pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let producers = args.instances.unwrap_or(PRODUCERS).max(1);
    let records = args.events.unwrap_or(DEFAULT_RECORDS).max(producers as u64);
    let rounds = args.iterations.unwrap_or(DEFAULT_ROUNDS);
    let db = dir.join("lichen.db");
    let store = StateStore::open(&db, StoreOptions::default())?;
    store
        .apply_deployment(NewDeployment {
            source_name: "bench".into(),
            source_text: String::new(),
            digest: String::new(),
            description: None,
            workloads: (0..producers)
                .map(|p| NewWorkload {
                    name: format!("w{p}"),
                    spec_json: "{}".into(),
                    module_digest: "bench".into(),
                })
                .collect(),
        })
        .await?;
    let wal = dir.join("lichen.db-wal");

    // 1. Ingest, offline.
    let io_before = write_bytes();
    let files_before = file_len(&db) + file_len(&wal);
    let ingest = produce(&store, records, producers).await?;
    let ingested = store.outbox_len()?;
    let io_per_record = write_bytes()
        .zip(io_before)
        .map(|(after, before)| after.saturating_sub(before) as f64 / ingested.max(1) as f64);
    let files_per_record =
        (file_len(&db) + file_len(&wal)).saturating_sub(files_before) as f64 / ingested as f64;
    let ingest_rate = ingested as f64 / ingest.as_secs_f64();

    // 2. Catch-up: the broker comes, the session drains the backlog.
    let mut broker = Broker::start(&dir.join("broker"))?;
    let config = lichen_agent::hub::session_config(&broker.url(), "bench", None, None, None)?;
    let (session, handle, mut events) =
        SyncSession::new(config, Arc::new(SqliteOutbox::new(store.clone())))?;
    let events_task = tokio::spawn(async move { while events.recv().await.is_some() {} });
    {
        let handle = handle.clone();
        store.set_outbox_listener(move || handle.outbox_changed());
    }
    let started = Instant::now();
    let session_task = tokio::spawn(session.run());
    let catch_up = wait_empty(&store, Duration::from_secs(600)).await?;
    let catch_up_total = started.elapsed();
    let catch_up_rate = ingested as f64 / catch_up.as_secs_f64();

    // 3. Live drain: producing and draining at once.
    let start = Instant::now();
    produce(&store, records, producers).await?;
    let produced = records.div_ceil(producers as u64) * producers as u64;
    wait_empty(&store, Duration::from_secs(600)).await?;
    let live = start.elapsed();
    let live_rate = produced as f64 / live.as_secs_f64();
    handle.shutdown();
    let _ = session_task.await;
    events_task.abort();
    broker.stop();
    drop(store);

    // 4. Loss across broker restarts and kill -9.
    let loss = match loss_rounds(&dir.join("rounds"), rounds).await {
        Ok(l) => l,
        Err(e) => Loss {
            error: Some(format!("{e:#}")),
            ..Loss::default()
        },
    };

    let mut table = Table::new("Hub sync (lichen bench sync)");
    table.row(
        "durable outbox ingest",
        format!("{} records/s", fmt_rate(ingest_rate)),
        ">= 50,000/s",
        "SQLite WAL 124k single-row commits/s (NORMAL)",
    );
    table.row(
        "drain to the broker, producing at once",
        format!("{} records/s", fmt_rate(live_rate)),
        ">= 20,000/s",
        "rumqttc -> Mosquitto ~90k QoS 1/s burst",
    );
    table.row(
        format!("catch-up of {} buffered records", fmt_count(ingested)),
        format!(
            "{} ({} records/s; {} from session start)",
            fmt_duration(catch_up),
            fmt_rate(catch_up_rate),
            fmt_duration(catch_up_total)
        ),
        "-",
        "-",
    );
    table.row(
        "bytes written per 200-byte record",
        match io_per_record {
            Some(b) => format!("{b:.0} B (write_bytes); db+WAL growth {files_per_record:.0} B"),
            None => format!("db+WAL growth {files_per_record:.0} B (/proc/self/io unreadable)"),
        },
        "low (SD cards)",
        "-",
    );
    let loss_text = match &loss.error {
        Some(e) => format!("not measured: {e}"),
        None => format!(
            "{} lost of {} ({} duplicates, all with their first id; {} out of order)",
            loss.lost,
            fmt_count(loss.expected),
            loss.duplicates,
            loss.disorder
        ),
    };
    table.row(
        format!(
            "records lost, {} rounds of broker restart + kill -9",
            rounds
        ),
        loss_text.clone(),
        "0",
        "-",
    );
    table.note(format!(
        "ingest: {producers} producers (workloads; --count), each awaiting its commit before the next record (as a guest's event is acknowledged only once durable); synchronous=FULL in WAL mode, the store's setting: a record acknowledged to its producer survives power loss, not only a crash. NORMAL would be faster but can lose the last commits on power loss. Group commit puts the concurrent producers' records in one transaction, one fsync."
    ));
    table.note(
        "bytes written: the growth of /proc/self/io write_bytes (what reached the block layer, WAL frames and checkpoints) over the ingest phase divided by the records; db+WAL file growth for comparison (the WAL is reused after checkpoints, so it undercounts rewrites).",
    );
    table.note(format!(
        "loss: the real daemon with a counter ticking every 5 ms, a subscriber with a persistent session; each round runs online 1 s, stops the broker 0.5 s, restarts it and kill -9s the agent 0.2 s into its catch-up, then restarts the agent; {}",
        if loss.conflicts > 0 {
            format!("{} counts came with two different ids", loss.conflicts)
        } else {
            "every duplicate carried the same message id".to_owned()
        }
    ));
    table.print();
    Ok(vec![
        format!(
            "- sync: durable ingest {} records/s (synchronous=FULL, {producers} producers)",
            fmt_rate(ingest_rate)
        ),
        format!(
            "- sync: drain {} records/s while producing; catch-up of {} buffered records in {}",
            fmt_rate(live_rate),
            fmt_count(ingested),
            fmt_duration(catch_up)
        ),
        format!(
            "- sync: {} written per 200-byte record",
            io_per_record.map_or_else(
                || format!("{files_per_record:.0} B (db+WAL growth)"),
                |b| format!("{b:.0} B (write_bytes)")
            )
        ),
        format!("- sync: {rounds} rounds of broker restart + kill -9: {loss_text}"),
    ])
}

#[derive(Debug, Default)]
struct Loss {
    expected: u64,
    lost: u64,
    duplicates: u64,
    conflicts: u64,
    disorder: u64,
    error: Option<String>,
}

/// What the subscriber saw: count -> message sequences it came with, in arrival order.
type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

fn subscribe(port: u16, node: &str) -> Seen {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let seen: Seen = Arc::default();
    let mut options = MqttOptions::new("bench-watch", "127.0.0.1", port);
    options
        .set_clean_session(false)
        .set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 100);
    let filter = format!("lichen/v1/{node}/telemetry/counter/count");
    let _ = client.subscribe(filter, QoS::AtLeastOnce);
    let out = seen.clone();
    std::thread::spawn(move || {
        let _client = client;
        for ev in connection.iter() {
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(env) = lichen_sync::Envelope::from_bytes(&p.payload) else {
                        continue;
                    };
                    if let Some(count) = env.payload["count"].as_u64()
                        && let Ok(mut s) = out.lock()
                    {
                        s.push((count, env.id.seq));
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    seen
}

/// The daemon under test, killed with SIGKILL when dropped.
struct Daemon {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let exe = std::env::current_exe().context("the benchmark's own binary")?;
        self.child = Some(
            Command::new(exe)
                .args(&self.args)
                .env("LICHEN_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start lichen run")?,
        );
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The counter's durable count in the daemon's state database.
fn durable_count(db: &Path) -> Result<u64> {
    let conn = rusqlite::Connection::open(db)?;
    let value: Vec<u8> = conn.query_row(
        "SELECT value FROM kv WHERE workload = 'counter' AND bucket = 'default' AND key = 'count'",
        [],
        |r| r.get(0),
    )?;
    String::from_utf8_lossy(&value)
        .trim()
        .parse()
        .context("the counter's count is not a number")
}

async fn loss_rounds(dir: &Path, rounds: usize) -> Result<Loss> {
    std::fs::create_dir_all(dir)?;
    let mut broker = Broker::start(&dir.join("broker"))?;
    let node = "bench-node";
    let seen = subscribe(broker.port, node);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let module = dir.join("counter.wasm");
    std::fs::write(&module, lichen_agent::embedded::COUNTER)?;
    let deployment = dir.join("counter.toml");
    std::fs::write(
        &deployment,
        format!(
            "[[workloads]]\nname = \"counter\"\nmodule = \"{}\"\ntriggers = [{{ interval = \"5ms\" }}]\n",
            module.display()
        ),
    )?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("[hub]\nurl = \"{}\"\nnode-id = \"{node}\"\n", broker.url()),
    )?;
    let state = dir.join("state");
    let path = |p: &Path| p.display().to_string();
    let mut daemon = Daemon {
        args: vec![
            "--socket".into(),
            path(&dir.join("lichen.sock")),
            "run".into(),
            "--config".into(),
            path(&config),
            "--state-dir".into(),
            path(&state),
            "--deploy".into(),
            path(&deployment),
        ],
        log: dir.join("daemon.log"),
        child: None,
    };
    daemon.spawn()?;
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        broker.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.spawn()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        daemon.kill9();
        daemon.spawn()?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    daemon.stop();
    let expected = durable_count(&state.join("lichen.db"))?;
    // Run again until every count up to the durable one has arrived.
    daemon.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let have = {
            let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let mut counts: Vec<u64> = s
                .iter()
                .map(|(c, _)| *c)
                .filter(|c| *c <= expected)
                .collect();
            counts.sort_unstable();
            counts.dedup();
            counts.len() as u64
        };
        if have >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.kill9();
    let s = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut by_count: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (count, seq) in &s {
        by_count.entry(*count).or_default().push(*seq);
    }
    let mut loss = Loss {
        expected,
        ..Loss::default()
    };
    for count in 1..=expected {
        match by_count.get(&count) {
            None => loss.lost += 1,
            Some(seqs) => {
                loss.duplicates += seqs.len() as u64 - 1;
                if seqs.iter().any(|s| *s != seqs[0]) {
                    loss.conflicts += 1;
                }
            }
        }
    }
    // In order: the first copy of each count comes after the first copy of the one before.
    let mut first_at: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, (count, _)) in s.iter().enumerate() {
        first_at.entry(*count).or_insert(i);
    }
    let firsts: Vec<usize> = first_at.values().copied().collect();
    loss.disorder = firsts.windows(2).filter(|w| w[0] > w[1]).count() as u64;
    Ok(loss)
}
