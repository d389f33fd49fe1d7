//! `density`: process RSS with N live instances; `dispatch`: ticks per second across them,
//! each tick committed (a kv write and a telemetry row) through the store's group commit.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{
    Table, api, engine_setup, fmt_count, fmt_duration, fmt_rate, histogram, module_bytes,
    open_agent, same_module_text,
};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::api::types::SendRequest;
use lichen_agent::api::types::WorkloadState;
use lichen_agent::runtime::microvm::ResourceUsage;
use lichen_agent::runtime::wasm::{Artifact, CallOutcome, Delivery, Instance};
use lichen_agent::supervisor::Agent;
use lichen_agent::util::{human_bytes, process_rss_bytes};
use lichen_host_apis::{Command, Event};

const MIB: u64 = 1 << 20;
/// The memory budget the "largest N" figure is for.
const BUDGET: u64 = 256 * MIB;
/// Engine-alone instances made before the measured ones and not counted.
const ALONE_WARMUP: usize = 8;
/// How long dispatch waits without progress before it gives up.
const STALL: Duration = Duration::from_secs(30);

pub(super) async fn run(
    dir: &Path,
    args: &BenchArgs,
    density: bool,
    dispatch: bool,
) -> Result<Vec<String>> {
    let count = args.instances.unwrap_or(1000).max(1);
    let (bytes, label) = module_bytes(args)?;
    let custom_module = args.module.is_some();
    // Room for every instance plus headroom: hot reload, and the engine-alone instances.
    let max_instances = u32::try_from(count + count / 8 + 16).context("--count is too large")?;
    let agent = open_agent(dir, Some(max_instances)).await?;
    let artifact = agent
        .artifacts()
        .add(bytes)
        .await
        .with_context(|| format!("cannot add {label}"))?;
    let digest = artifact.digest().to_string();
    let reserved = agent.artifacts().engine().options().reserved_memory_bytes();

    let names: Vec<String> = (0..count).map(|i| format!("d-{i:05}")).collect();
    let text = same_module_text("bench density", &names, &digest);

    // Let the open settle (log persister, store writer) before the baseline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline_rss = process_rss_bytes().context("cannot read the process RSS")?;
    let baseline_pss = own_pss()?;
    // The engine alone first, so that its instances find no heap the deploy freed; they
    // stay until the end. The pool has room for `count / 8 + 16` more (`max_instances`),
    // these and their warm-up.
    let engine_alone = if density {
        Some(engine_alone(&agent, &artifact, (count / 8).max(1)).await?)
    } else {
        None
    };
    let rss_before = process_rss_bytes().context("cannot read the process RSS")?;
    let pss_before = own_pss()?;
    let started = Instant::now();
    agent
        .deploy_text("bench-density.toml", &text, Path::new("/"))
        .await
        .map_err(api)?;
    let deployed = started.elapsed();
    // One command each, all at once: every instance is instantiated and has run.
    let mut sends = tokio::task::JoinSet::new();
    for name in &names {
        let agent = agent.clone();
        let name = name.clone();
        sends.spawn(async move {
            agent
                .send(
                    &name,
                    SendRequest {
                        command: "get".into(),
                        payload: String::new(),
                    },
                )
                .await
        });
    }
    let mut errors = 0u64;
    let mut first_error = None;
    while let Some(result) = sends.join_next().await {
        if let Err(err) = result.context("a send task failed")? {
            errors += 1;
            first_error.get_or_insert(err.error);
        }
    }
    let all_live = started.elapsed();
    let statuses = agent.ps().await;
    let running = statuses
        .iter()
        .filter(|s| s.state == WorkloadState::Running)
        .count();
    let linear: u64 = statuses.iter().map(|s| s.memory_bytes).sum();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = process_rss_bytes().context("cannot read the process RSS")?;
    let pss_after = own_pss()?;
    let delta = rss_after.saturating_sub(rss_before);
    let per_instance = delta / count as u64;
    let pss_per_instance = pss_after.saturating_sub(pss_before) / count as u64;
    // The whole process with the workloads, without the engine-alone instances.
    let rss_with = baseline_rss + delta;
    let pss_with = baseline_pss + pss_after.saturating_sub(pss_before);

    let mut summary = Vec::new();
    if density {
        let fits = BUDGET
            .saturating_sub(baseline_rss)
            .checked_div(per_instance)
            .unwrap_or(u64::MAX);
        let (whole_1000, whole_label) = if count == 1000 {
            (rss_with, "measured")
        } else {
            (baseline_rss + 1000 * per_instance, "extrapolated")
        };
        let mut table = Table::new(format!(
            "density: {count} live instances in one agent ({label})"
        ));
        table.row(
            "process RSS before the deploy (agent open, module compiled)",
            human_bytes(baseline_rss),
            "-",
            "-",
        );
        table.row(
            format!("process RSS with {count} live instances"),
            human_bytes(rss_with),
            "-",
            "-",
        );
        table.row(
            "RSS per instance ((after - before) / N)",
            human_bytes(per_instance),
            "-",
            "engine alone: 21-25 KiB (reference); seed analysis: ~6 MB (reference)",
        );
        table.row(
            format!("whole RSS with 1000 instances ({whole_label})"),
            human_bytes(whole_1000),
            "<= 48 MiB",
            "engine alone: 41-46 MiB (reference); seed model: 1000 modules = 6 GB (reference)",
        );
        table.row(
            "PSS per instance (pages shared between instances counted once)",
            human_bytes(pss_per_instance),
            "-",
            "-",
        );
        table.row(
            format!("whole PSS with 1000 instances ({whole_label})"),
            human_bytes(if count == 1000 {
                pss_with
            } else {
                baseline_pss + 1000 * pss_per_instance
            }),
            "-",
            "-",
        );
        if let Some(alone) = &engine_alone {
            table.row(
                format!(
                    "engine alone, this module: RSS / PSS per instance ({} made directly: store, instantiate, init, one get)",
                    alone.count
                ),
                format!(
                    "{} / {}",
                    human_bytes(alone.rss_each),
                    human_bytes(alone.pss_each)
                ),
                "-",
                "engine alone: 21-25 KiB, another module (reference)",
            );
            table.row(
                "agent's own part per instance (RSS per instance - engine alone)",
                human_bytes(per_instance.saturating_sub(alone.rss_each)),
                "-",
                "-",
            );
            table.row(
                "floor for 1000: baseline + 1000 x engine alone (RSS)",
                human_bytes(baseline_rss + 1000 * alone.rss_each),
                "-",
                "-",
            );
        }
        table.row(
            "largest N in 256 MiB (extrapolated)",
            fmt_count(fits),
            ">= 1000",
            "seed analysis: 50+ modules on a 512 MB Pi Zero",
        );
        table.row(
            "guest linear memory per instance (ps)",
            human_bytes(linear / count as u64),
            "-",
            "-",
        );
        table.row(
            format!("deploy {count} workloads, then first reply from each"),
            fmt_duration(all_live),
            "-",
            "-",
        );
        table.row(
            format!("deploy call alone ({count} workloads)"),
            fmt_duration(deployed),
            "-",
            "-",
        );
        table.note(format!(
            "{running} of {count} workloads running; each answered one `get`; no triggers"
        ));
        table.note(
            "the engine-alone instances are made before the deploy and kept: the figures with the workloads leave out what they added",
        );
        table.note(
            "RSS counts a page once per mapping: the module's memory-image pages that instances only read are shared, but each instance's mapping of them adds to RSS; PSS counts them once",
        );
        table.note(format!(
            "largest N = (256 MiB - RSS before) / RSS per instance, a linear extrapolation; the engine's pool must be sized for it (wasm.max-instances, {max_instances} here)"
        ));
        table.note(format!(
            "virtual address space reserved for linear memories: {} ({max_instances} slots x 2 memories x (32 MiB + 64 KiB guard))",
            human_bytes(reserved)
        ));
        if errors > 0 {
            table.note(format!(
                "{errors} commands got an error; the first: {}",
                first_error.clone().unwrap_or_default()
            ));
        }
        table.print();
        summary.push(format!(
            "- Density: {count} live instances add {} of RSS, {} each; whole process {} with {count} (baseline {}); PSS {} each, {} whole; about {} instances fit in 256 MiB, extrapolated (target 1000 within 48 MiB RSS, issue 10; the seed model puts 1000 modules at 6 GB).",
            human_bytes(delta),
            human_bytes(per_instance),
            human_bytes(rss_with),
            human_bytes(baseline_rss),
            human_bytes(pss_per_instance),
            human_bytes(pss_with),
            fmt_count(fits),
        ));
        if let Some(alone) = &engine_alone {
            summary.push(format!(
                "- Engine alone, this module: {} of RSS each ({} PSS), so the agent's own part is {} each; floor for 1000 with this baseline: {}.",
                human_bytes(alone.rss_each),
                human_bytes(alone.pss_each),
                human_bytes(per_instance.saturating_sub(alone.rss_each)),
                human_bytes(baseline_rss + 1000 * alone.rss_each),
            ));
        }
    }
    drop(engine_alone);
    if dispatch {
        summary.push(run_dispatch(&agent, &names, args, custom_module).await?);
        if !custom_module {
            summary.push(run_read_only_dispatch(&agent, &names, args).await?);
        }
    }
    agent.shutdown().await;
    Ok(summary)
}

/// Memory of instances made straight on the engine, without the agent's workers.
struct EngineAlone {
    count: u64,
    rss_each: u64,
    pss_each: u64,
    /// Kept live while the workloads are measured.
    _instances: Vec<Instance>,
}

/// Makes `count` instances of `artifact` directly on the agent's engine (a store with its
/// WASI and device state, instantiate, `init`, one `get`, as each workload's first instance
/// gets) and measures what they add: the engine's own cost per instance for this module, the
/// floor under the agent's figure.
async fn engine_alone(agent: &Agent, artifact: &Artifact, count: usize) -> Result<EngineAlone> {
    let engine = agent.artifacts().engine().clone();
    let pre = artifact
        .component()
        .context("the module is not a component: the engine-alone figure needs one")?;
    let setup = engine_setup("engine-alone", 32 << 20, Duration::from_secs(1));
    let get = Event::Command(Command {
        id: "engine-alone".into(),
        name: "get".into(),
        payload: Vec::new(),
    });
    let make = |i: usize| {
        let engine = engine.clone();
        let get = get.clone();
        let setup = setup.clone();
        async move {
            let mut instance = Instance::instantiate(engine.engine(), pre, &setup)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot instantiate engine-alone instance {i}: {e}")
                })?;
            match instance.init().await {
                CallOutcome::Ok(_) => {}
                other => anyhow::bail!("engine-alone instance {i}: init failed: {other:?}"),
            }
            if let CallOutcome::Trap(trap) = instance.handle(&get).await {
                anyhow::bail!("engine-alone instance {i}: `get` trapped: {trap}");
            }
            Ok(instance)
        }
    };
    // The first instances fault in what every later one shares (the guest's code, the
    // engine's paths): made first, kept, not counted.
    let mut instances = Vec::with_capacity(count + ALONE_WARMUP);
    for i in 0..ALONE_WARMUP {
        instances.push(make(i).await?);
    }
    let rss_before = process_rss_bytes().context("cannot read the process RSS")?;
    let pss_before = own_pss()?;
    for i in ALONE_WARMUP..ALONE_WARMUP + count {
        instances.push(make(i).await?);
    }
    let rss_after = process_rss_bytes().context("cannot read the process RSS")?;
    let pss_after = own_pss()?;
    let count = count as u64;
    Ok(EngineAlone {
        count,
        rss_each: rss_after.saturating_sub(rss_before) / count,
        pss_each: pss_after.saturating_sub(pss_before) / count,
        _instances: instances,
    })
}

/// This process's proportional set size, in bytes.
fn own_pss() -> Result<u64> {
    ResourceUsage::of_process(std::process::id())
        .pss_bytes
        .context("cannot read the process PSS (/proc/self/smaps_rollup)")
}

/// Sends `get` commands (they read state and write nothing) round-robin across `names` and
/// waits until all are handled: the dispatch cost without a SQLite commit per event.
async fn run_read_only_dispatch(
    agent: &Agent,
    names: &[String],
    args: &BenchArgs,
) -> Result<String> {
    let events = args.events.unwrap_or(200_000).max(1);
    let metrics = agent.metrics().clone();
    let target = metrics.events_handled.load(Ordering::Relaxed) + events;
    let transactions_before = agent.store().stats().transactions;
    let senders = agent.event_senders(names).await.map_err(api)?;
    let started = Instant::now();
    let count =
        usize::try_from(events).with_context(|| format!("--events {events} is too many"))?;
    for (i, sender) in senders.iter().cycle().take(count).enumerate() {
        sender
            .deliver(Delivery::Command {
                id: format!("bench-{i}"),
                name: "get".into(),
                payload: Vec::new(),
                hub: None,
            })
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot send command {i}"))?;
    }
    while metrics.events_handled.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if started.elapsed() > STALL * 10 {
            anyhow::bail!("read-only dispatch did not finish");
        }
    }
    let elapsed = started.elapsed();
    let rate = events as f64 / elapsed.as_secs_f64();
    let transactions = agent.store().stats().transactions - transactions_before;
    let mut table = Table::new(format!(
        "dispatch, read-only: {} `get` commands round-robin across {} instances",
        fmt_count(events),
        names.len()
    ));
    table.row(
        "events per second (inject -> all handled)",
        fmt_rate(rate),
        ">= 200,000",
        "component call 120 ns (reference)",
    );
    table.row(
        "SQLite transactions meanwhile",
        fmt_count(transactions),
        "-",
        "-",
    );
    table.print();
    Ok(format!(
        "Dispatch of read-only events: {} events/s across {} instances ({} `get` commands; nothing to commit, so no SQLite write per event).",
        fmt_rate(rate),
        names.len(),
        fmt_count(events)
    ))
}

/// Injects ticks round-robin across `names` and waits until all are handled.
async fn run_dispatch(
    agent: &Agent,
    names: &[String],
    args: &BenchArgs,
    custom_module: bool,
) -> Result<String> {
    let events = args.events.unwrap_or(200_000).max(1);
    let metrics = agent.metrics().clone();
    let handled_before = metrics.events_handled.load(Ordering::Relaxed);
    let stats_before = agent.store().stats();
    let outbox_before = agent.store().outbox_len().unwrap_or(0);
    let (handle_sum_before, handle_count_before) = histogram(agent, "lichen_handle_seconds");
    let target = handled_before + events;

    let senders = agent.event_senders(names).await.map_err(api)?;
    let started = Instant::now();
    let count =
        usize::try_from(events).with_context(|| format!("--events {events} is too many"))?;
    for (i, sender) in senders.iter().cycle().take(count).enumerate() {
        sender
            .deliver(Delivery::Tick)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot inject tick {i}"))?;
    }
    let injected = started.elapsed();
    let mut last = metrics.events_handled.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    while last < target {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = metrics.events_handled.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > STALL {
            anyhow::bail!(
                "dispatch stalled: {} of {events} ticks handled, none in {STALL:?}",
                last - handled_before
            );
        }
    }
    let elapsed = started.elapsed();
    let stats_after = agent.store().stats();
    let outbox_after = agent.store().outbox_len().unwrap_or(0);
    let (handle_sum, handle_count) = histogram(agent, "lichen_handle_seconds");
    let handle_mean = match handle_count - handle_count_before {
        0 => Duration::ZERO,
        n => Duration::from_secs_f64((handle_sum - handle_sum_before) / n as f64),
    };
    let rate = events as f64 / elapsed.as_secs_f64();
    let transactions = stats_after.transactions - stats_before.transactions;
    let requests = stats_after.requests - stats_before.requests;
    let per_transaction = requests as f64 / transactions.max(1) as f64;
    let events_per_transaction = events as f64 / transactions.max(1) as f64;
    // Where the writer thread's time went: busy (statements + commits) against the wall time,
    // and per transaction the statements apart from the COMMIT (WAL write + fsync).
    let busy_ns = stats_after.busy_ns - stats_before.busy_ns;
    let commit_ns = stats_after.commit_ns - stats_before.commit_ns;
    let writer_busy = busy_ns as f64 / 1e9 / elapsed.as_secs_f64();
    let per_txn = |ns: u64| Duration::from_nanos(ns / transactions.max(1));

    // Every tick must have been counted once in some counter's kv state.
    let counted = if custom_module {
        None
    } else {
        let mut total = 0u64;
        for name in names {
            let kv = agent.store().load_kv(name)?;
            total += kv
                .get(&("default".to_string(), "count".to_string()))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Some(total)
    };

    let count = names.len();
    let mut table = Table::new(format!(
        "dispatch: {} ticks round-robin across {count} instances",
        fmt_count(events)
    ));
    table.row(
        "events per second (inject -> all handled and committed)",
        fmt_rate(rate),
        ">= 200,000",
        "runwasi: 330 tasks/s; SQLite batches of 100: 915k rows/s",
    );
    table.row("total time", fmt_duration(elapsed), "-", "-");
    table.row("injection alone", fmt_duration(injected), "-", "-");
    table.row(
        "handle time per event, mean (call + commit wait)",
        fmt_duration(handle_mean),
        "-",
        "component call 120 ns (reference)",
    );
    table.row(
        "store write requests / transactions",
        format!("{} / {}", fmt_count(requests), fmt_count(transactions)),
        "-",
        "-",
    );
    table.row(
        "events per transaction (group commit)",
        format!("{events_per_transaction:.1}"),
        "-",
        "SQLite WAL NORMAL: 124k commits/s",
    );
    table.row(
        "writer thread busy (of the run's wall time)",
        format!("{:.0} %", writer_busy * 100.0),
        "-",
        "-",
    );
    table.row(
        "writer time per transaction: statements + answers / COMMIT (WAL write + fsync)",
        format!(
            "{} / {}",
            fmt_duration(per_txn(busy_ns.saturating_sub(commit_ns))),
            fmt_duration(per_txn(commit_ns))
        ),
        "-",
        "-",
    );
    table.row(
        "telemetry rows added to the outbox",
        fmt_count(outbox_after.saturating_sub(outbox_before)),
        fmt_count(events),
        "-",
    );
    if let Some(counted) = counted {
        table.row(
            "ticks counted in kv `count` (sum over instances)",
            fmt_count(counted),
            fmt_count(events),
            "-",
        );
    }
    table.note(
        "one task injects through each workload's event queue (it waits for queue room); the clock stops when the agents' handled-events counter has grown by the number injected; each counter tick increments kv `count` and publishes one telemetry row, committed before the next event of that instance",
    );
    table.note(format!(
        "{per_transaction:.1} write requests per transaction (requests include status and log writes)"
    ));
    table.print();
    Ok(format!(
        "- Dispatch: {} events/s across {count} instances ({} ticks, each a kv write + telemetry row committed; {events_per_transaction:.1} events per SQLite transaction; writer busy {:.0} %, {} statements + {} COMMIT per transaction; target >= 200,000 events/s).",
        fmt_rate(rate),
        fmt_count(events),
        writer_busy * 100.0,
        fmt_duration(per_txn(busy_ns.saturating_sub(commit_ns))),
        fmt_duration(per_txn(commit_ns)),
    ))
}
