//! `startup`: cold start, from the deploy of an already precompiled component to the reply
//! to its first event; and the engine alone (instantiate, `init`, precompiled load).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{
    Samples, Table, WorkloadText, api, deployment_text, engine_setup, fmt_duration, histogram,
    load_phases, module_bytes, open_agent,
};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::api::types::SendRequest;
use lichen_agent::runtime::wasm::{ArtifactStore, CallOutcome, Instance};

/// Cold starts done first and not counted (page faults, first allocations).
const WARMUP: usize = 5;
/// Instances created directly on the engine for the engine-only figures.
const ENGINE_ITERATIONS: usize = 2000;
/// Loads of the precompiled artifact from disk into a fresh artifact store.
const LOAD_ITERATIONS: usize = 50;
/// Durable commits timed alone (one event-log row each).
const COMMIT_ITERATIONS: usize = 50;

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let iterations = args.iterations.unwrap_or(200).max(1);
    let (bytes, label) = module_bytes(args)?;
    let agent = open_agent(dir, None).await?;
    let compile_started = Instant::now();
    let artifact = agent
        .artifacts()
        .add(bytes)
        .await
        .with_context(|| format!("cannot add {label}"))?;
    let compile = compile_started.elapsed();
    let digest = artifact.digest().to_string();

    let mut to_reply = Vec::with_capacity(iterations);
    let mut deploy_call = Vec::with_capacity(iterations);
    let mut errors = 0u64;
    let mut first_error = None;
    let mut previous: Option<String> = None;
    let mut stats_before = agent.store().stats();
    for i in 0..WARMUP + iterations {
        if i == WARMUP {
            stats_before = agent.store().stats();
        }
        // Stop the previous one outside the timing, so each deploy only starts one.
        if let Some(name) = previous.take() {
            agent.stop(&name).await.map_err(api)?;
        }
        let name = format!("start-{i:05}");
        let text = deployment_text(
            "bench startup",
            &[WorkloadText {
                name: &name,
                digest: &digest,
                config: &[],
            }],
        );
        let started = Instant::now();
        agent
            .deploy_text("bench-startup.toml", &text, Path::new("/"))
            .await
            .map_err(api)?;
        let deployed = Instant::now();
        let reply = agent
            .send(
                &name,
                SendRequest {
                    command: "get".into(),
                    payload: String::new(),
                },
            )
            .await;
        let replied = Instant::now();
        if let Err(err) = reply {
            errors += 1;
            first_error.get_or_insert(err.error);
        }
        if i >= WARMUP {
            to_reply.push(replied - started);
            deploy_call.push(deployed - started);
        }
        previous = Some(name);
    }
    let stats_after = agent.store().stats();
    // One durable commit alone (an event-log row: one transaction, one fsync): the floor
    // under the deploy call, which commits the deployment before it answers.
    let mut commit = Vec::with_capacity(COMMIT_ITERATIONS);
    for _ in 0..COMMIT_ITERATIONS {
        let started = Instant::now();
        agent
            .store()
            .log_event(None, "bench", "durable commit")
            .await
            .map_err(|e| anyhow::anyhow!("cannot log an event: {e}"))?;
        commit.push(started.elapsed());
    }
    let (worker_sum, worker_count) = histogram(&agent, "lichen_instantiate_seconds");
    let worker_mean = if worker_count > 0 {
        Duration::from_secs_f64(worker_sum / worker_count as f64)
    } else {
        Duration::ZERO
    };
    agent.shutdown().await;

    // The engine alone: a store, instantiate from the pre-instantiated component, `init`.
    let engine = agent.artifacts().engine().clone();
    let pre = artifact
        .component()
        .context("the module is not a component: the engine-only figures need one")?;
    let setup = engine_setup("engine-only", 16 << 20, Duration::from_millis(100));
    let mut instantiate = Vec::with_capacity(ENGINE_ITERATIONS);
    let mut with_init = Vec::with_capacity(ENGINE_ITERATIONS);
    let mut init_errors = 0u64;
    for _ in 0..ENGINE_ITERATIONS {
        let started = Instant::now();
        let mut instance = Instance::instantiate(engine.engine(), pre, &setup)
            .await
            .map_err(|e| anyhow::anyhow!("cannot instantiate: {e}"))?;
        let instantiated = Instant::now();
        if !matches!(instance.init().await, CallOutcome::Ok(_)) {
            init_errors += 1;
        }
        let initialised = Instant::now();
        drop(instance);
        instantiate.push(instantiated - started);
        with_init.push(initialised - started);
    }

    // A precompiled artifact loaded from disk by a fresh store, as at agent start: in a
    // task on a worker thread, as the agent's loads run.
    let artifacts = dir.join("artifacts");
    let load = {
        let (engine, digest) = (engine.clone(), digest.clone());
        tokio::spawn(async move {
            let mut load = Vec::with_capacity(LOAD_ITERATIONS);
            for _ in 0..LOAD_ITERATIONS {
                let store = Arc::new(ArtifactStore::open(&artifacts, engine.clone())?);
                let started = Instant::now();
                store
                    .load(&digest)
                    .await
                    .context("cannot load the precompiled artifact")?;
                load.push(started.elapsed());
            }
            anyhow::Ok(load)
        })
        .await
        .context("the load task failed")??
    };
    // The same load by phase, on this thread (no hand-off), each from a fresh
    // store: which part is Lichen's check, which Wasmtime's mapping, which the linking.
    let phases = load_phases(&dir.join("artifacts"), &engine, &digest, LOAD_ITERATIONS)?;
    // The hand-off alone: `load` runs its file work where blocking holds up no other task (a
    // stat and a mapping may wait on the disk): on a worker thread of this multi-thread
    // runtime, in place after handing the thread's scheduler core to another.
    let hand_off = tokio::spawn(async {
        let mut hand_off = Vec::with_capacity(LOAD_ITERATIONS);
        for _ in 0..LOAD_ITERATIONS {
            let started = Instant::now();
            lichen_agent::util::run_blocking(|| ())
                .await
                .context("the blocking work failed")?;
            hand_off.push(started.elapsed());
        }
        anyhow::Ok(hand_off)
    })
    .await
    .context("the hand-off task failed")??;
    let hand_off = Samples::new(hand_off);

    let to_reply = Samples::new(to_reply);
    let deploy_call = Samples::new(deploy_call);
    let instantiate = Samples::new(instantiate);
    let with_init = Samples::new(with_init);
    let load = Samples::new(load);
    let commit = Samples::new(commit);
    let transactions = stats_after.transactions - stats_before.transactions;
    let unsynced = stats_after.unsynced_batches - stats_before.unsynced_batches;
    let per_start = |n: u64| n as f64 / iterations as f64;

    let mut table = Table::new(format!(
        "startup: deploy of a precompiled component to its first reply ({iterations} cold starts, {label})"
    ));
    let seed = "seed analysis: 6-10 ms (Wasm), 300-500 ms (containers)";
    table.row(
        "deploy -> first reply, p50",
        fmt_duration(to_reply.percentile(50.0)),
        "<= 1 ms",
        seed,
    );
    table.row(
        "deploy -> first reply, p99",
        fmt_duration(to_reply.percentile(99.0)),
        "-",
        "-",
    );
    table.row(
        "deploy -> first reply, mean",
        fmt_duration(to_reply.mean()),
        "-",
        "-",
    );
    table.row(
        "deploy call alone (parse, record, spawn), p50",
        fmt_duration(deploy_call.percentile(50.0)),
        "-",
        "-",
    );
    table.row(
        "one durable SQLite commit alone (one fsync), p50",
        fmt_duration(commit.percentile(50.0)),
        "-",
        "-",
    );
    table.row(
        "state store transactions per cold start (with their own fsync)",
        format!(
            "{:.1} ({:.1})",
            per_start(transactions),
            per_start(transactions.saturating_sub(unsynced))
        ),
        "-",
        "-",
    );
    table.row(
        "worker: instantiate + init, mean (lichen_instantiate_seconds)",
        fmt_duration(worker_mean),
        "-",
        "-",
    );
    table.row(
        "engine only: instantiate, p50",
        fmt_duration(instantiate.percentile(50.0)),
        "-",
        "Wasmtime pooling: 7.3 us (reference), 3-5 us public (reference)",
    );
    table.row(
        "engine only: instantiate + init, p50",
        fmt_duration(with_init.percentile(50.0)),
        "-",
        "-",
    );
    table.row(
        "precompiled load from disk (fresh store), p50",
        fmt_duration(load.percentile(50.0)),
        "-",
        "63 us deserialize_file, 95 us from bytes",
    );
    table.row(
        "precompiled load by phase, p50: check / map (Wasmtime's deserialize_file) / link",
        format!(
            "{} / {} / {}",
            fmt_duration(phases.check.percentile(50.0)),
            fmt_duration(phases.map.percentile(50.0)),
            fmt_duration(phases.link.percentile(50.0))
        ),
        "-",
        "-",
    );
    table.row(
        "hand-off for blocking work alone (`run_blocking` of nothing: `block_in_place` here), p50",
        fmt_duration(hand_off.percentile(50.0)),
        "-",
        "-",
    );
    table.row(
        "compile (once, when the module is added)",
        fmt_duration(compile),
        "-",
        "22 ms for a 40 KB component",
    );
    table.note(format!(
        "each cold start deploys a deployment whose one workload has a new name (started, not reloaded), then sends it `get` and waits for the reply; the previous workload is stopped before the timer starts; {WARMUP} warm-up starts not counted"
    ));
    table.note(
        "a cold start includes parsing and validating the deployment, one SQLite transaction to record it (synced before the deploy call answers), spawning the worker, instantiate + init, a status row (its transaction is not synced on its own), the command",
    );
    table.note(format!(
        "durable commit alone: {COMMIT_ITERATIONS} event-log rows, each awaited before the next; transactions per cold start count the writer's commits over the timed starts, stops included (a status-only batch commits without its own fsync; the next synced commit makes it durable)"
    ));
    table.note(format!(
        "engine only: {ENGINE_ITERATIONS} instances made directly from the pre-instantiated component (a store, instantiate, init), each dropped before the next; precompiled load: {LOAD_ITERATIONS} loads, each by a fresh artifact store (identity check of the compiled file, Wasmtime's deserialize_file, link), its file work in place off the scheduler (`block_in_place`) as at agent start; by phase: the same on the bench's thread"
    ));
    if errors > 0 {
        table.note(format!(
            "{errors} first commands got an error instead of a reply (timed all the same); the first: {}",
            first_error.unwrap_or_default()
        ));
    }
    if init_errors > 0 {
        table.note(format!(
            "{init_errors} engine-only inits failed (empty config)"
        ));
    }
    table.print();

    Ok(vec![
        format!(
            "- Cold start (deploy of a precompiled component to its first reply): p50 {}, p99 {}, mean {} over {iterations} starts (target p50 <= 1 ms; references: the seed analysis claims 6-10 ms for Wasm, 300-500 ms for containers).",
            fmt_duration(to_reply.percentile(50.0)),
            fmt_duration(to_reply.percentile(99.0)),
            fmt_duration(to_reply.mean()),
        ),
        format!(
            "- Engine alone: instantiate p50 {}, instantiate + init p50 {}, precompiled load from disk p50 {} (references: Wasmtime instantiate 7.3 us, load 63-95 us).",
            fmt_duration(instantiate.percentile(50.0)),
            fmt_duration(with_init.percentile(50.0)),
            fmt_duration(load.percentile(50.0)),
        ),
    ])
}
