//! What the benchmarks share to set up: state directories, an agent on them, the module they
//! deploy and the deployment files that name it, reading a histogram back from metrics, the
//! setup of instances made straight on the engine, and a precompiled load timed by phase.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use lichen_agent::api::types::ApiError;
use lichen_agent::config::AgentConfig;
use lichen_agent::logs::{LogHub, LogOptions};
use lichen_agent::metrics::Gauges;
use lichen_agent::runtime::wasm::{ArtifactStore, InstanceSetup, WasmEngine};
use lichen_agent::supervisor::Agent;
use lichen_host_apis::KvMap;

use crate::BenchArgs;
use crate::figures::Samples;

/// The benchmarks' state directories: under `--state-dir`, or under a temporary directory
/// named after the process that is removed at the end.
pub(crate) struct BenchDirs {
    root: PathBuf,
    remove: bool,
}

impl BenchDirs {
    pub(crate) fn new(state_dir: Option<&Path>) -> Result<Self> {
        let (root, remove) = match state_dir {
            Some(dir) => (dir.to_path_buf(), false),
            None => (
                std::env::temp_dir().join(format!("lichen-bench-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create benchmark directory {}", root.display()))?;
        Ok(Self { root, remove })
    }

    /// An empty directory `bench-<name>` (a previous run's is removed: its state would skew
    /// the figures).
    pub(crate) fn fresh(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(format!("bench-{name}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for BenchDirs {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Opens an agent on `dir` with the built-in config, its engine sized for `max_instances`
/// when given.
pub(crate) async fn open_agent(dir: &Path, max_instances: Option<u32>) -> Result<Agent> {
    let mut config = AgentConfig::load(None)?;
    if let Some(n) = max_instances {
        config.wasm.max_instances = n;
    }
    lichen_agent::daemon::open_agent(&config, dir)
        .await
        .context("cannot open the agent")
}

/// The module to measure: `--module`, else the embedded `counter` component.
pub(crate) fn module_bytes(args: &BenchArgs) -> Result<(Vec<u8>, String)> {
    match &args.module {
        Some(path) => Ok((
            std::fs::read(path)
                .with_context(|| format!("cannot read module {}", path.display()))?,
            path.display().to_string(),
        )),
        None => Ok((
            lichen_agent::embedded::COUNTER.to_vec(),
            "embedded counter component".to_string(),
        )),
    }
}

/// One workload of a generated deployment.
pub(crate) struct WorkloadText<'a> {
    pub(crate) name: &'a str,
    pub(crate) digest: &'a str,
    pub(crate) config: &'a [(&'a str, &'a str)],
}

/// Deployment TOML for `workloads`, none of them with a trigger.
pub(crate) fn deployment_text(description: &str, workloads: &[WorkloadText<'_>]) -> String {
    use std::fmt::Write;
    let mut text = format!("description = {description:?}\n");
    for w in workloads {
        let _ = write!(
            text,
            "\n[[workloads]]\nname = \"{}\"\nmodule = \"sha256:{}\"\n",
            w.name, w.digest
        );
        if !w.config.is_empty() {
            text.push_str("[workloads.config]\n");
            for (key, value) in w.config {
                let _ = writeln!(text, "{key} = {value:?}");
            }
        }
    }
    text
}

/// Deployment TOML in which each of `names` runs the module `digest`, with no config and no
/// trigger.
pub(crate) fn same_module_text(description: &str, names: &[String], digest: &str) -> String {
    let workloads: Vec<WorkloadText<'_>> = names
        .iter()
        .map(|name| WorkloadText {
            name,
            digest,
            config: &[],
        })
        .collect();
    deployment_text(description, &workloads)
}

pub(crate) fn api(err: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{} ({})", err.error, err.code)
}

/// A histogram's sum (seconds) and count from the agent's metrics.
pub(crate) fn histogram(agent: &Agent, name: &str) -> (f64, u64) {
    let text = agent.metrics().render(&Gauges {
        instances: 0,
        queue_depth: 0,
        rss_bytes: 0,
        outbox_rows: 0,
    });
    let value = |suffix: &str| {
        let key = format!("{name}_{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(str::trim)
    };
    let sum = value("sum").and_then(|v| v.parse::<f64>().ok());
    let count = value("count").and_then(|v| v.parse::<u64>().ok());
    (sum.unwrap_or(0.0), count.unwrap_or(0))
}

/// What an instance made straight on the engine (no worker, no deployment) is made from: no
/// configuration, an empty key-value map, a log hub of its own, no devices.
pub(crate) fn engine_setup(
    workload: &str,
    memory_limit: usize,
    time_slice: Duration,
) -> InstanceSetup {
    InstanceSetup {
        workload: Arc::from(workload),
        config: Arc::new(BTreeMap::new()),
        kv: Arc::new(Mutex::new(KvMap::new())),
        log: Arc::new(LogHub::new(LogOptions::default())),
        memory_limit,
        time_slice,
        devices: Arc::default(),
    }
}

/// A precompiled load's phases over several loads: Lichen's identity check of the compiled
/// file, Wasmtime's mapping (`deserialize_file`), linking against the world.
pub(crate) struct LoadPhaseSamples {
    pub(crate) check: Samples,
    pub(crate) map: Samples,
    pub(crate) link: Samples,
}

/// Loads `digest`'s compiled file `loads` times on this thread, each by a fresh artifact store
/// on `artifacts`, timing each phase.
pub(crate) fn load_phases(
    artifacts: &Path,
    engine: &Arc<WasmEngine>,
    digest: &str,
    loads: usize,
) -> Result<LoadPhaseSamples> {
    let (mut check, mut map, mut link) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..loads {
        let store = ArtifactStore::open(artifacts, engine.clone())?;
        let phases = store.time_compiled_load(digest)?;
        check.push(phases.check);
        map.push(phases.map);
        link.push(phases.link);
    }
    Ok(LoadPhaseSamples {
        check: Samples::new(check),
        map: Samples::new(map),
        link: Samples::new(link),
    })
}
