//! `lichen run`: the daemon. Locks the state directory, binds the API socket, opens the state,
//! serves containerd's Task API for Wasm pods (`[containerd]`, see `crate::pods`, in builds
//! with the `pods` feature), restores the
//! last deployment (or deploys the embedded default on a fresh node), serves the local API
//! and, optionally, metrics.
//!
//! The order matters: a second daemon on the same state directory (the lock) or the same socket
//! (the bind) exits with a clear message before it opens the store or starts any workload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::sync::watch;

use crate::api::control::Control;
use crate::config::AgentConfig;
use crate::embedded;
use crate::supervisor::{Agent, AgentOptions};

/// Options of `lichen run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Configuration file (TOML) [default: built-in settings].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the state database and artifact store [default: from the config, else
    /// /var/lib/lichen].
    #[arg(long, env = "LICHEN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (for example 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Deploy this file at start when no deployment is stored yet, instead of the embedded
    /// default.
    #[arg(long = "deploy", value_name = "FILE", conflicts_with = "no_default")]
    pub deployment: Option<PathBuf>,
    /// Start with no deployment when none is stored yet (no embedded default).
    #[arg(long = "empty")]
    pub no_default: bool,
    /// Print the effective configuration (TOML, every key with the defaults filled in) and
    /// exit without starting.
    #[arg(long)]
    pub print_config: bool,
}

pub use crate::state_dir::default_state_dir;

/// The embedded default deployment: `counter` and `thermostat` on the simulated board, their
/// modules named by the digests of the copies built into this binary.
pub fn default_deployment(counter_digest: &str, thermostat_digest: &str) -> String {
    format!(
        r#"# Lichen's embedded default deployment: two device functions on the simulated board.
description = "embedded default: counter and thermostat"

[[workloads]]
name = "counter"
module = "sha256:{counter_digest}"
triggers = [{{ interval = "1s" }}]
[workloads.config]
step = "1"

[[workloads]]
name = "thermostat"
module = "sha256:{thermostat_digest}"
triggers = [{{ interval = "2s" }}]
[workloads.config]
target = "21.5"
hysteresis = "0.5"
"#
    )
}

/// Opens an agent from a config file and a state directory.
pub async fn open_agent(config: &AgentConfig, state_dir: &Path) -> Result<Agent> {
    Agent::open(AgentOptions {
        state_dir: state_dir.to_path_buf(),
        engine: config.engine_options()?,
        logs: config.log_options()?,
        persisted_log_lines: config.logs.persisted_lines,
        board: config.board.clone(),
        images: config.image_limits()?,
    })
    .await
}

/// Imports the embedded examples and deploys the default deployment.
pub async fn deploy_embedded_default(agent: &Agent) -> Result<()> {
    let counter = agent.artifacts().add(embedded::COUNTER.to_vec()).await?;
    let thermostat = agent.artifacts().add(embedded::THERMOSTAT.to_vec()).await?;
    let text = default_deployment(counter.digest(), thermostat.digest());
    let report = agent
        .deploy_text("embedded-default.toml", &text, Path::new("/"))
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.error))?;
    tracing::info!(
        version = report.version,
        "deployed the embedded default: counter and thermostat on the simulated board"
    );
    Ok(())
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs, socket: &Path) -> Result<()> {
    let config = AgentConfig::load(args.config.as_deref())?;
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(default_state_dir);
    if args.print_config {
        let text = config
            .effective_toml(&state_dir)
            .context("cannot print the configuration")?;
        print!("{text}");
        return Ok(());
    }
    let _state_lock =
        crate::state_dir::LockedStateDir::lock(&state_dir).context("cannot start the agent")?;
    let bound = crate::api::server::bind(socket)
        .await
        .context("cannot start the agent")?;
    let agent = open_agent(&config, &state_dir).await?;
    tracing::info!(state_dir = %state_dir.display(), board = %config.board, "lichen {} starting", env!("CARGO_PKG_VERSION"));
    tracing::info!("flavour: {}", crate::flavour::describe());
    #[cfg(feature = "pods")]
    let (control, task_server) = {
        let pods = std::sync::Arc::new(crate::pods::PodRuntime::new(agent.clone()));
        let (task_server, task_server_state) =
            crate::pods::server::start(&config.containerd, pods.clone()).await;
        let control =
            crate::pods::control::NodeControl::new(agent.clone(), pods, task_server_state);
        (control, task_server)
    };
    #[cfg(not(feature = "pods"))]
    let control = {
        if config.containerd.task_server {
            tracing::info!(
                "no containerd task server: this lichen ({}) is built without pods (cargo feature `pods`)",
                crate::flavour::name()
            );
        }
        agent.clone()
    };

    if !agent.restore().await? {
        if let Some(file) = &args.deployment {
            let text = crate::files::read_text_bounded(
                file,
                crate::deployment::DeploymentSpec::MAX_TEXT_BYTES
                    .try_into()
                    .unwrap_or(u64::MAX),
            )
            .context("cannot read the deployment file")?;
            let base = file
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("."));
            agent
                .deploy_text(&file.display().to_string(), &text, &base)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.error))?;
        } else if !args.no_default && crate::flavour::COMPILER {
            deploy_embedded_default(&agent).await?;
        } else if !args.no_default {
            // The embedded examples come as source: a node without a compiler cannot run them.
            tracing::warn!(
                "no deployment stored, and this lichen ({}) has no compiler for the embedded default: \
                 waiting for a deployment precompiled for this node (`lichen hub deploy --precompile TARGET`, \
                 or `lichen import` of a bundle made with `lichen hub bundle --precompile TARGET`)",
                crate::flavour::name()
            );
        } else {
            tracing::info!("no deployment stored; waiting for `lichen deploy`");
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api = tokio::spawn({
        let control = control.clone();
        let done = shutdown(stop_rx.clone());
        async move { crate::api::server::serve_bound(control, bound, done).await }
    });
    let metrics = args.metrics.map(|addr| {
        let control = control.clone();
        let done = shutdown(stop_rx.clone());
        tracing::info!(%addr, "serving Prometheus metrics");
        tokio::spawn(async move { crate::api::server::serve_metrics(control, addr, done).await })
    });
    let summary = tokio::spawn(print_summaries(agent.clone()));
    let hub = match &config.hub {
        Some(section) => Some(
            crate::hub::HubLink::start(
                agent.clone(),
                section,
                crate::update::SystemSource::new(&config, &state_dir),
            )
            .await
            .context("cannot start the hub link")?,
        ),
        None => None,
    };
    #[cfg(feature = "kubeedge")]
    let kubeedge = match config.kubeedge.as_ref().filter(|k| k.enabled) {
        Some(section) => Some(crate::kubeedge::KubeEdge::start(&agent, section).await?),
        None => None,
    };
    #[cfg(not(feature = "kubeedge"))]
    if config.kubeedge.as_ref().is_some_and(|k| k.enabled) {
        anyhow::bail!(
            "the agent config has a [kubeedge] section, but this agent was built without the \
             `kubeedge` feature"
        );
    }
    // A/B boards: confirm this boot, or health-check a new slot's first boot.
    let update = crate::update::start(agent.clone(), &config, &state_dir, |hub| {
        crate::hub::probe(hub).map_err(Into::into)
    });

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
    }
    summary.abort();
    #[cfg(feature = "kubeedge")]
    if let Some(kubeedge) = kubeedge {
        kubeedge.shutdown().await;
    }
    if let Some(update) = update {
        update.abort();
    }
    if let Some(hub) = hub {
        hub.shutdown().await;
    }
    let _ = stop_tx.send(true);
    // containerd sees the task connections close and reports the pods' exits; their Wasm
    // ends with this process.
    #[cfg(feature = "pods")]
    if let Some(server) = task_server {
        server.shutdown().await;
    }
    agent.shutdown().await;
    if let Ok(Err(err)) = api.await {
        tracing::warn!("local API ended with an error: {err:#}");
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Logs one line per workload every 10 seconds, so a terminal running the daemon shows the
/// device functions at work.
async fn print_summaries(agent: Agent) {
    let mut interval = tokio::time::interval(Duration::from_secs(10));
    interval.tick().await;
    loop {
        interval.tick().await;
        for w in agent.ps().await {
            tracing::info!(
                workload = %w.name,
                state = %w.state,
                events = w.events_handled,
                restarts = w.restarts,
                memory_kib = w.memory_bytes / 1024,
                "status"
            );
        }
    }
}
