//! The update at every daemon start: confirms the boot, or runs the health check of a new
//! slot's first boot and commits it or rolls it back, and logs the outcome as an event.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use lichen_update::board::{Board, Start};
use lichen_update::config::UpdateConfig;
use lichen_update::health::{HealthCheck, HubHealth, Observation, Verdict, WorkloadHealth};
use lichen_update::journal::{Outcome, OutcomeKind};

use super::reboot;
use crate::api::control::Control;
use crate::config::{AgentConfig, HubSection};
use crate::supervisor::Agent;
use crate::util::{error_chain, now_ms};

/// How often the health check looks at the workloads.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// How often the health check asks the hub (each probe is a connection).
const HUB_POLL: Duration = Duration::from_secs(5);

/// Asks the hub whether it answers (the daemon passes the hub link's probe, so `update` does
/// not depend on `hub`); `Err` says why not.
pub type HubProbe = fn(&HubSection) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Why the first boot of a new slot is not healthy.
#[derive(Debug, thiserror::Error)]
enum HealthError {
    /// The check saw something wrong (in words, from `lichen_update::health`).
    #[error("{0}")]
    Unhealthy(String),
    /// The deadline passed while it still waited.
    #[error("not healthy within {deadline}: still waiting for {what}")]
    Deadline {
        /// The deadline, in words.
        deadline: String,
        /// What it waited for.
        what: String,
    },
    /// The stored deployment cannot be read.
    #[error("cannot read the stored deployment: {0}")]
    Store(#[source] lichen_store::StoreError),
    /// The blocking task that reads it failed.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// At the daemon's start, when the config has `[update]`: what this boot is (see
/// `lichen_update::board`), done in the background so the API serves meanwhile.
pub fn start(
    agent: Agent,
    config: &AgentConfig,
    state_dir: &Path,
    probe: HubProbe,
) -> Option<tokio::task::JoinHandle<()>> {
    let section = config.update.clone()?;
    let hub = config.hub.clone();
    let state_dir = state_dir.to_path_buf();
    Some(tokio::spawn(async move {
        if let Err(err) = boot(&agent, &section, hub.as_ref(), probe, &state_dir).await {
            let text = error_chain(err.as_ref());
            tracing::error!("system update: {text}; this boot is not confirmed");
            event(&agent, "update-error", &text).await;
        }
    }))
}

async fn boot(
    agent: &Agent,
    section: &UpdateConfig,
    hub: Option<&HubSection>,
    probe: HubProbe,
    state_dir: &Path,
) -> Result<()> {
    let board = {
        let (section, state_dir) = (section.clone(), state_dir.to_path_buf());
        tokio::task::spawn_blocking(move || Board::open(&section, &state_dir)).await??
    };
    let board = std::sync::Arc::new(board);
    let start = {
        let board = board.clone();
        tokio::task::spawn_blocking(move || board.start(now_ms())).await??
    };
    match start {
        Start::Confirmed { outcome } => {
            if let Some(outcome) = outcome {
                report_outcome(agent, &outcome).await;
            }
            tracing::info!(slot = %board.booted(), version = %board.system().version, "system boot confirmed");
        }
        Start::AwaitingReboot(p) => {
            tracing::info!(version = %p.version, slot = %p.to, "an update is armed: the next reboot tries it");
        }
        Start::Rejected(p, reason) => {
            return fail_trial(agent, &board, &p, &reason).await;
        }
        Start::Trial(p) => {
            event(
                agent,
                "update-trial",
                &format!(
                    "first boot of slot {} (version {}): health check",
                    p.to, p.version
                ),
            )
            .await;
            match health_check(agent, hub, probe, board.health_deadline()).await {
                Ok(summary) => {
                    let summary = format!("state database open; {summary}");
                    let outcome = {
                        let (board, p) = (board.clone(), p.clone());
                        tokio::task::spawn_blocking(move || board.commit(&p, &summary, now_ms()))
                            .await??
                    };
                    report_outcome(agent, &outcome).await;
                }
                Err(reason) => return fail_trial(agent, &board, &p, &reason.to_string()).await,
            }
        }
    }
    let board2 = board.clone();
    tokio::task::spawn_blocking(move || board2.confirm()).await??;
    Ok(())
}

/// Records a failed first boot and reboots back to the old slot.
async fn fail_trial(
    agent: &Agent,
    board: &std::sync::Arc<Board>,
    pending: &lichen_update::journal::Pending,
    reason: &str,
) -> Result<()> {
    tracing::error!(slot = %pending.to, version = %pending.version, "health check failed: {reason}; rebooting to slot {}", pending.from);
    event(
        agent,
        "update-health-failed",
        &format!(
            "slot {} (version {}): {reason}; rebooting to slot {}",
            pending.to, pending.version, pending.from
        ),
    )
    .await;
    let command = {
        let (board, pending, reason) = (board.clone(), pending.clone(), reason.to_string());
        tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            board.reject(&pending, &reason)?;
            Ok(board.reboot_command(false))
        })
        .await??
    };
    tokio::task::spawn_blocking(move || reboot(&command)).await?
}

async fn report_outcome(agent: &Agent, outcome: &Outcome) {
    let kind = match outcome.result {
        OutcomeKind::Committed => "update-committed",
        OutcomeKind::RolledBack => "update-rolled-back",
        OutcomeKind::Interrupted => "update-interrupted",
        OutcomeKind::Failed => "update-failed",
    };
    if outcome.result == OutcomeKind::Committed {
        tracing::info!("{}", outcome.describe());
    } else {
        tracing::warn!("{}", outcome.describe());
    }
    event(agent, kind, &outcome.describe()).await;
}

async fn event(agent: &Agent, kind: &str, detail: &str) {
    if let Err(err) = agent.store().log_event(None, kind, detail).await {
        tracing::warn!("cannot log event {kind}: {err}");
    }
}

/// Runs the health check until it passes (its summary), fails or passes its deadline (why).
async fn health_check(
    agent: &Agent,
    hub: Option<&HubSection>,
    probe: HubProbe,
    deadline: Duration,
) -> Result<String, HealthError> {
    let until = Instant::now() + deadline;
    let mut hub_state = if hub.is_some() {
        HubHealth::NotAnswered("not asked yet".into())
    } else {
        HubHealth::NotConfigured
    };
    let mut hub_asked: Option<Instant> = None;
    let mut check: Option<HealthCheck> = None;
    loop {
        if let Some(hub) = hub
            && hub_state != HubHealth::Answered
            && hub_asked.is_none_or(|t| t.elapsed() >= HUB_POLL)
        {
            hub_asked = Some(Instant::now());
            let hub = hub.clone();
            hub_state = match tokio::task::spawn_blocking(move || probe(&hub)).await {
                Ok(Ok(())) => HubHealth::Answered,
                Ok(Err(why)) => HubHealth::NotAnswered(why.to_string()),
                Err(e) => HubHealth::NotAnswered(e.to_string()),
            };
        }
        let expected = {
            let store = agent.store().clone();
            tokio::task::spawn_blocking(move || store.current_deployment())
                .await?
                .map_err(HealthError::Store)?
                .map(|d| d.workloads.into_iter().map(|w| w.name).collect())
                .unwrap_or_default()
        };
        let seen = Observation {
            expected,
            workloads: agent
                .ps()
                .await
                .into_iter()
                .map(|w| WorkloadHealth {
                    name: w.name,
                    state: w.state,
                    events_handled: w.events_handled,
                    restarts: w.restarts,
                    traps: w.traps,
                    uptime_ms: w.uptime_ms,
                    last_error: w.last_error,
                })
                .collect(),
            hub: hub_state.clone(),
        };
        let check = check.get_or_insert_with(|| HealthCheck::new(&seen));
        match check.judge(&seen) {
            Verdict::Pass(summary) => return Ok(summary),
            Verdict::Fail(reason) => return Err(HealthError::Unhealthy(reason)),
            Verdict::Wait(what) => {
                if Instant::now() >= until {
                    return Err(HealthError::Deadline {
                        deadline: humantime::format_duration(deadline).to_string(),
                        what,
                    });
                }
            }
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}
