//! `guests`: the JavaScript (componentize-js) and Python (componentize-py) example device
//! functions, as a node meets them. Per guest: the component's size; compiling it on the node
//! (wall time and the process's peak RSS while compiling, from `VmHWM` after resetting it
//! through `/proc/self/clear_refs`); and loading the artifact the hub precompiled for this
//! node (`lichen hub deploy --precompile`'s own function, stored as the hub link stores it),
//! the way a restarted agent does: a fresh artifact store on the same directory (one `stat`,
//! map, link), p50 and p99 over `--iterations` loads. Then the agent's RSS with 50 live
//! instances of the Python guest (`--count` changes it).
//!
//! The components come from `scripts/build-foreign-guests`: `examples/js-button-led.wasm` and
//! `examples/py-sensor.wasm` under the current directory, or under the directory
//! `LICHEN_FOREIGN_GUESTS` names. A missing one makes the group fail, saying how to build it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lichen_agent::api::control::Control;
use lichen_agent::api::types::WorkloadState;
use lichen_agent::runtime::wasm::{ArtifactStore, EngineOptions, WasmEngine};
use lichen_agent::util::{human_bytes, process_rss_bytes};

use super::{Samples, Table, api, fmt_duration, load_phases, open_agent, same_module_text};
use crate::BenchArgs;

/// Live instances of the Python guest for the memory figure (`--count` changes it).
const INSTANCES: usize = 50;
/// Loads of each precompiled artifact (`--iterations` changes it).
const LOADS: usize = 20;

/// Where the guest `name` was built.
fn guest_file(name: &str) -> PathBuf {
    std::env::var_os("LICHEN_FOREIGN_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples"))
        .join(format!("{name}.wasm"))
}

fn read_guest(name: &str) -> Result<Vec<u8>> {
    let path = guest_file(name);
    lichen_agent::files::read_bounded(&path, ArtifactStore::MAX_MODULE_BYTES).with_context(|| {
        format!(
            "cannot read {}: build it with scripts/build-foreign-guests (run from the repository, or set LICHEN_FOREIGN_GUESTS to its directory)",
            path.display()
        )
    })
}

/// Peak RSS of this process since the last reset, from `/proc/self/status`.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak RSS to the current RSS (Linux 4.0 and later).
fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset the peak RSS")
}

/// The figures of one guest.
struct Figures {
    size: usize,
    compile: Duration,
    peak_above: u64,
    peak: u64,
    compiled_size: usize,
    loads: Samples,
    compiled_by_load: u64,
    /// The same load by phase, p50s: Lichen's identity check, Wasmtime's mapping, linking.
    phases: [Duration; 3],
}

fn engine(options: &EngineOptions) -> Result<Arc<WasmEngine>> {
    Ok(Arc::new(WasmEngine::new(EngineOptions {
        max_instances: 4,
        ..*options
    })?))
}

async fn measure(dir: &Path, bytes: Vec<u8>, loads: usize) -> Result<Figures> {
    let options = EngineOptions::default();
    let size = bytes.len();
    let digest = lichen_sync::sha256_hex(&bytes);

    // On the node: the artifact store's own path (digest, compile, write, link).
    let store = Arc::new(ArtifactStore::open(&dir.join("node"), engine(&options)?)?);
    reset_peak_rss()?;
    let before = process_rss_bytes().unwrap_or(0);
    let started = Instant::now();
    let artifact = store
        .add(bytes.clone())
        .await
        .context("the guest does not compile")?;
    let compile = started.elapsed();
    let peak = peak_rss_bytes().unwrap_or(0);
    drop(artifact);
    drop(store);

    // Off the node: compiled by `hub deploy --precompile host`'s function, stored as the hub
    // link stores it (source without compiling, compiled form checked by mapping it once).
    let compiled = precompile_for(&digest, bytes.clone(), &options)?;
    let compiled_size = compiled.len();
    let precompiled_dir = dir.join("precompiled");
    let store = Arc::new(ArtifactStore::open(&precompiled_dir, engine(&options)?)?);
    store.add_source(bytes).await?;
    store.add_precompiled(&digest, compiled).await?;
    drop(store);

    // A restarted agent, `loads` times: a fresh store on the same directory each time.
    let engine = engine(&options)?;
    let mut samples = Vec::with_capacity(loads);
    let mut compiled_by_load = 0;
    for _ in 0..loads {
        let fresh = Arc::new(ArtifactStore::open(&precompiled_dir, engine.clone())?);
        let started = Instant::now();
        let artifact = fresh
            .load(&digest)
            .await
            .context("cannot load the precompiled guest")?;
        samples.push(started.elapsed());
        drop(artifact);
        compiled_by_load += fresh.counts().compiled;
    }
    // The same load by phase, each from a fresh store: where a large guest's load goes.
    let phases = load_phases(&precompiled_dir, &engine, &digest, loads)?;
    Ok(Figures {
        size,
        compile,
        peak_above: peak.saturating_sub(before),
        peak,
        compiled_size,
        loads: Samples::new(samples),
        compiled_by_load,
        phases: [
            phases.check.percentile(50.0),
            phases.map.percentile(50.0),
            phases.link.percentile(50.0),
        ],
    })
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let count = args.instances.unwrap_or(INSTANCES).max(1);
    let loads = args.iterations.unwrap_or(LOADS).max(1);
    let mut table = Table::new(
        "guests: JavaScript (componentize-js) and Python (componentize-py) device functions",
    );
    let mut summary = instances(dir, count, &mut table).await?;
    for (name, language, before) in [
        (
            "js-button-led",
            "JavaScript",
            "28-37 s, 460 MB peak (the footprint issue, before)",
        ),
        ("py-sensor", "Python", "-"),
    ] {
        let bytes = read_guest(name)?;
        let f = measure(&dir.join(name), bytes, loads).await?;
        table.row(
            format!("{language} `{name}`: component size"),
            human_bytes(f.size as u64),
            "-",
            "-",
        );
        table.row(
            format!("{language} `{name}`: compile on the node"),
            format!(
                "{:.1} s, peak RSS {} ({} above the process before)",
                f.compile.as_secs_f64(),
                human_bytes(f.peak),
                human_bytes(f.peak_above)
            ),
            "the node never compiles it",
            before,
        );
        table.row(
            format!("{language} `{name}`: load of its precompiled artifact, p50"),
            format!(
                "{} (p99 {}, {} compiled file; compiled on load: {})",
                fmt_duration(f.loads.percentile(50.0)),
                fmt_duration(f.loads.percentile(99.0)),
                human_bytes(f.compiled_size as u64),
                f.compiled_by_load
            ),
            "<= 150 us (a Rust component's)",
            "-",
        );
        table.row(
            format!(
                "{language} `{name}`: the load by phase, p50: check / map (Wasmtime's deserialize_file) / link"
            ),
            format!(
                "{} / {} / {}",
                fmt_duration(f.phases[0]),
                fmt_duration(f.phases[1]),
                fmt_duration(f.phases[2])
            ),
            "-",
            "-",
        );
        summary.push(format!(
            "- guests, {name}: {} component, compiled on the node in {:.1} s at peak RSS {}, precompiled load p50 {}.",
            human_bytes(f.size as u64),
            f.compile.as_secs_f64(),
            human_bytes(f.peak),
            fmt_duration(f.loads.percentile(50.0))
        ));
    }

    table.note(
        "compile: the node's own path (artifact store: digest, compile, write the compilation, link against the world); load: the artifact compiled by `lichen hub deploy --precompile host`'s function, a fresh artifact store on the same directory each time (stat, map, link)",
    );
    table.print();
    Ok(summary)
}

/// The agent with `count` live instances of the Python guest, precompiled as the hub ships
/// it (the node compiles nothing), measured first in a fresh process: its RSS before and
/// after the deployment.
async fn instances(dir: &Path, count: usize, table: &mut Table) -> Result<Vec<String>> {
    // The agent with `count` live instances of the Python guest (no triggers, no grants: the
    // instances are idle after `init`), its RSS before and after.
    let bytes = read_guest("py-sensor")?;
    let digest = lichen_sync::sha256_hex(&bytes);
    // The hub's side, done here first: what the compiler freed goes back to the kernel
    // before the agent opens (the agent's default engine settings are `EngineOptions`').
    let compiled = precompile_for(&digest, bytes.clone(), &EngineOptions::default())?;
    lichen_agent::util::release_free_heap();
    let agent = open_agent(
        &dir.join("agent"),
        Some(u32::try_from(count)?.saturating_add(8)),
    )
    .await?;
    agent.artifacts().add_source(bytes).await?;
    agent
        .artifacts()
        .add_precompiled(&digest, compiled)
        .await
        .context("cannot add the precompiled Python guest")?;
    let before = process_rss_bytes().unwrap_or(0);
    let names: Vec<String> = (0..count).map(|i| format!("py-{i}")).collect();
    let text = same_module_text("bench guests: Python instances", &names, &digest);
    agent
        .deploy_text("bench-guests.toml", &text, Path::new("/"))
        .await
        .map_err(api)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ps = agent.ps().await;
        let running = ps
            .iter()
            .filter(|w| w.state == WorkloadState::Running)
            .count();
        if running == count {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {running} of {count} Python instances started in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = process_rss_bytes().unwrap_or(0);
    agent.shutdown().await;
    let each = after.saturating_sub(before) / count as u64;
    table.row(
        format!("{count} live instances of `py-sensor`: whole agent RSS"),
        format!(
            "{} ({} before deploying; {} per instance)",
            human_bytes(after),
            human_bytes(before),
            human_bytes(each)
        ),
        "as low as copy-on-write images allow",
        "442 MB (debug build; the footprint issue, before)",
    );
    Ok(vec![format!(
        "- guests, {count} py-sensor instances: agent RSS {} ({} per instance).",
        human_bytes(after),
        human_bytes(each)
    )])
}

/// `bytes` (module `digest`) compiled by `lichen hub deploy --precompile host`'s function for
/// an engine with `options`.
fn precompile_for(digest: &str, bytes: Vec<u8>, options: &EngineOptions) -> Result<Vec<u8>> {
    let source = lichen_agent::hub::artifacts::LocalArtifact {
        digest: digest.to_owned(),
        path: "guest.wasm".into(),
        bytes,
    };
    let engines = lichen_agent::hub::precompile::parse_targets(&["host".to_owned()], *options)?;
    let (mut compiled, _) =
        lichen_agent::hub::precompile::precompile(std::slice::from_ref(&source), &engines)?;
    Ok(compiled.pop().context("one compiled artifact")?.bytes)
}
