//! Wiring: opens the state store, the artifact store and the engine, builds one runtime per
//! tier and probes what the host can run; shuts everything down at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use tokio::sync::Mutex;

use super::{Agent, AgentOptions, Inner, Workloads};
use crate::deployment::WorkloadSpec;
use crate::logs::LogHub;
use crate::metrics::Metrics;
#[cfg(feature = "containers")]
use crate::runtime::container::{ContainerRuntime, ContainerTier, ImageStore};
use crate::runtime::isolation::IsolationProbe;
#[cfg(feature = "microvms")]
use crate::runtime::microvm::MicrovmTier;
use crate::runtime::wasm::{ArtifactStore, WasmEngine, WasmRuntime, WorkerContext};
use crate::runtime::{Runtime, Tier};
use crate::store::{StateStore, StoreOptions};

impl Agent {
    /// Opens the state store and artifact store under the state directory and builds the
    /// engine. Starts nothing; call [`Agent::restore`].
    pub async fn open(options: AgentOptions) -> Result<Self> {
        crate::state_dir::create_private(&options.state_dir)?;
        let store = StateStore::open(
            &options.state_dir.join("lichen.db"),
            StoreOptions {
                max_log_lines_per_workload: options.persisted_log_lines,
            },
        )
        .context("cannot open the state store")?;
        let engine = Arc::new(WasmEngine::new(options.engine)?);
        let artifacts = Arc::new(ArtifactStore::open(
            &options.state_dir.join("artifacts"),
            engine.clone(),
        )?);
        let devices = Arc::new(crate::grants::DeviceHub::open(&options.board)?);
        let logs = Arc::new(LogHub::new(options.logs));
        logs.spawn_persister(store.clone());
        let ctx = WorkerContext {
            engine,
            store,
            logs: logs.clone(),
            metrics: Arc::new(Metrics::default()),
            max_memory_bytes: options.engine.max_memory_bytes,
            devices: devices.clone(),
            outputs: Arc::default(),
        };
        let mut isolation = IsolationProbe::new(devices.profile(), Vec::new());
        let mut runtimes: BTreeMap<Tier, Arc<dyn Runtime>> = BTreeMap::new();
        runtimes.insert(
            Tier::Wasm,
            Arc::new(WasmRuntime::new(ctx.clone(), artifacts.clone())),
        );
        #[cfg(feature = "containers")]
        {
            // The probe runs trial containers: off the async workers, once per process.
            let host = tokio::task::spawn_blocking(crate::runtime::container::probe_cached)
                .await
                .context("the isolation probe failed")?;
            isolation.cgroup_controllers = host.cgroup.controllers.clone();
            isolation.record(
                Tier::Container,
                crate::runtime::isolation::container_outcome(host),
            );
            let state_hash = crate::runtime::wasm::sha256_hex(
                options.state_dir.display().to_string().as_bytes(),
            );
            let oci = host.usable_runtime().map(|oci| {
                // One cgroup parent per state directory, so two agents never share a cgroup.
                ContainerRuntime::new(
                    oci.clone(),
                    host.cgroup.clone(),
                    crate::runtime::container::work_dir(&options.state_dir),
                )
                .with_cgroup_parent(&format!("lichen/{}", &state_hash[..12]))
            });
            runtimes.insert(
                Tier::Container,
                Arc::new(ContainerTier::new(
                    oci,
                    ImageStore::new(options.state_dir.join("images"))
                        .with_limits(options.images.clone()),
                    logs.clone(),
                    devices.profile().clone(),
                )),
            );
        }
        #[cfg(feature = "microvms")]
        runtimes.insert(
            Tier::Microvm,
            Arc::new(MicrovmTier::new(
                options.state_dir.join("microvm"),
                logs.clone(),
            )),
        );
        // A runtime this flavour leaves out is probed already: it is missing, and says why.
        for tier in Tier::ALL {
            if let Some(piece) = crate::flavour::missing_runtime(tier) {
                isolation.record(tier, Err(piece));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                imports: super::ImportRoute::default(),
                ctx,
                artifacts,
                runtimes,
                isolation: std::sync::Mutex::new(isolation),
                deploying: Mutex::new(()),
                workloads: Mutex::new(Workloads {
                    running: BTreeMap::new(),
                    stopped: BTreeMap::new(),
                }),
                board: options.board,
                next_command: AtomicU64::new(1),
                doctor_checks: std::sync::Mutex::new(Vec::new()),
                #[cfg(test)]
                prepare_hook: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Adds a check to `doctor`'s report (a part the daemon started beside the agent, such as
    /// the KubeEdge mapper, says how it is).
    pub fn add_doctor_check(&self, check: super::DoctorHook) {
        self.inner
            .doctor_checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(check);
    }

    /// Where `lichen import` goes: this agent's hub link routes it when it starts.
    pub fn imports(&self) -> &super::ImportRoute {
        &self.inner.imports
    }

    /// Where WASI commands that run streaming and unsliced send their output, by workload
    /// name (the containerd task server registers its pods' FIFOs here).
    pub fn command_outputs(&self) -> &Arc<crate::runtime::wasm::CommandOutputs> {
        &self.inner.ctx.outputs
    }

    /// The log hub of every workload's lines.
    pub fn log_hub(&self) -> &Arc<LogHub> {
        &self.inner.ctx.logs
    }

    /// The artifact store.
    pub fn artifacts(&self) -> &Arc<ArtifactStore> {
        &self.inner.artifacts
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.inner.ctx.store
    }

    /// The board's devices (on a `sim` board, tests drive and observe them here).
    pub fn devices(&self) -> &Arc<crate::grants::DeviceHub> {
        &self.inner.ctx.devices
    }

    /// Agent metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.ctx.metrics
    }

    /// The runtime of a tier, or why this agent has none.
    pub(super) fn runtime(&self, tier: Tier) -> Result<&Arc<dyn Runtime>, String> {
        self.inner.runtimes.get(&tier).ok_or_else(|| {
            crate::flavour::missing_runtime(tier)
                .unwrap_or_else(|| format!("this agent has no {tier} runtime"))
        })
    }

    /// What this agent's board and host can run, with every tier that `specs` may run in
    /// probed (each tier once per agent).
    pub(super) async fn isolation_for(&self, specs: &[WorkloadSpec]) -> IsolationProbe {
        let mut wanted: Vec<Tier> = specs
            .iter()
            .flat_map(crate::runtime::isolation::wanted)
            .collect();
        wanted.sort();
        wanted.dedup();
        for tier in wanted {
            if self.isolation().probed(tier) {
                continue;
            }
            let outcome = match self.runtime(tier) {
                Ok(runtime) => runtime.probe().await,
                Err(message) => Err(message),
            };
            self.inner
                .isolation
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(tier, outcome);
        }
        self.isolation()
    }

    /// What this agent's board and host can run, as probed so far.
    pub fn isolation(&self) -> IsolationProbe {
        self.inner
            .isolation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops every workload (delivering `stop`).
    pub async fn shutdown(&self) {
        let mut workloads = self.inner.workloads.lock().await;
        let running = std::mem::take(&mut workloads.running);
        for (_, old) in running {
            old.workload.stop().await;
        }
        for runtime in self.inner.runtimes.values() {
            runtime.release().await;
        }
        let lines = self.inner.ctx.logs.take_unpersisted();
        if !lines.is_empty() {
            let _ = self.store().append_logs(lines).await;
        }
    }
}
