//! The health check of a new slot's first boot, as plain decisions: the agent observes its
//! workloads and hub and asks [`HealthCheck::judge`]; it owns the clock and the deadline.
//!
//! A check passes when every workload of the stored deployment runs and answers and the hub (when
//! one is configured) answers. A workload answers when it runs and has handled an event since
//! the check began, or has run for [`SETTLE_MS`] without a trap (one with no timer may get no
//! event). It fails at once when a workload has failed (no more restarts), or has restarted
//! [`RESTART_LIMIT`] times since the check began without handling an event. Anything else
//! waits; the agent fails the check at its deadline, with what it was still waiting for.

use std::collections::BTreeMap;

use lichen_deployment::WorkloadState;

/// Restarts without an event that fail a check.
pub const RESTART_LIMIT: u64 = 3;
/// A workload running this long (ms) without a trap answers even without an event.
pub const SETTLE_MS: u64 = 10_000;

/// One workload as the agent sees it (`lichen ps`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadHealth {
    /// Its name.
    pub name: String,
    /// Where it is in its life.
    pub state: WorkloadState,
    /// Events handled since it was deployed.
    pub events_handled: u64,
    /// Restarts after traps since it was deployed.
    pub restarts: u64,
    /// Traps since it was deployed.
    pub traps: u64,
    /// How long the running instance has run (ms).
    pub uptime_ms: Option<u64>,
    /// Its last error.
    pub last_error: Option<String>,
}

/// Whether the hub answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubHealth {
    /// No hub is configured.
    NotConfigured,
    /// It answered.
    Answered,
    /// It did not, and why.
    NotAnswered(String),
}

/// One observation of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The workloads of the stored deployment (each must be there and answer).
    pub expected: Vec<String>,
    /// Every workload the agent runs.
    pub workloads: Vec<WorkloadHealth>,
    /// The hub.
    pub hub: HubHealth,
}

/// What an observation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy; what was seen.
    Pass(String),
    /// Not yet; what is awaited.
    Wait(String),
    /// Unhealthy; why.
    Fail(String),
}

/// A check in progress.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Per workload: (events, restarts, traps) when the check began.
    baseline: BTreeMap<String, (u64, u64, u64)>,
}

impl HealthCheck {
    /// Starts a check from the first observation.
    pub fn new(first: &Observation) -> HealthCheck {
        HealthCheck {
            baseline: first
                .workloads
                .iter()
                .map(|w| (w.name.clone(), (w.events_handled, w.restarts, w.traps)))
                .collect(),
        }
    }

    /// Judges an observation.
    pub fn judge(&self, seen: &Observation) -> Verdict {
        for name in &seen.expected {
            if !seen.workloads.iter().any(|w| &w.name == name) {
                return Verdict::Fail(format!(
                    "workload {name:?} of the stored deployment was not restored (see `lichen events`)"
                ));
            }
        }
        let mut waiting = Vec::new();
        for w in &seen.workloads {
            let (events0, restarts0, traps0) =
                self.baseline.get(&w.name).copied().unwrap_or((0, 0, 0));
            let error = w.last_error.as_deref().unwrap_or("no error recorded");
            let new_events = w.events_handled > events0;
            match w.state {
                WorkloadState::Failed => {
                    return Verdict::Fail(format!("workload {:?} failed: {error}", w.name));
                }
                _ if w.restarts >= restarts0 + RESTART_LIMIT && !new_events => {
                    return Verdict::Fail(format!(
                        "workload {:?} restarted {} times without handling an event: {error}",
                        w.name,
                        w.restarts - restarts0
                    ));
                }
                WorkloadState::Running => {
                    let settled = w.uptime_ms.unwrap_or(0) >= SETTLE_MS && w.traps == traps0;
                    if !(new_events || settled) {
                        waiting.push(format!("workload {:?} to handle an event", w.name));
                    }
                }
                WorkloadState::Completed | WorkloadState::Stopped => {}
                other => waiting.push(format!("workload {:?} ({other}) to run", w.name)),
            }
        }
        if let HubHealth::NotAnswered(why) = &seen.hub {
            waiting.push(format!("the hub to answer ({why})"));
        }
        if !waiting.is_empty() {
            return Verdict::Wait(waiting.join(", "));
        }
        let hub = match seen.hub {
            HubHealth::Answered => "; the hub answered",
            _ => "",
        };
        Verdict::Pass(format!(
            "{} workload{} answered{hub}",
            seen.workloads.len(),
            if seen.workloads.len() == 1 { "" } else { "s" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, state: WorkloadState, events: u64, restarts: u64) -> WorkloadHealth {
        WorkloadHealth {
            name: name.into(),
            state,
            events_handled: events,
            restarts,
            traps: restarts,
            uptime_ms: Some(1000),
            last_error: (restarts > 0).then(|| "wasm trap: out of memory".into()),
        }
    }

    fn seen(workloads: Vec<WorkloadHealth>, hub: HubHealth) -> Observation {
        Observation {
            expected: workloads.iter().map(|w| w.name.clone()).collect(),
            workloads,
            hub,
        }
    }

    #[test]
    fn workloads_that_handle_events_pass() {
        let first = seen(
            vec![
                w("counter", WorkloadState::Running, 10, 0),
                w("thermostat", WorkloadState::Starting, 0, 0),
            ],
            HubHealth::NotConfigured,
        );
        let check = HealthCheck::new(&first);
        assert!(
            matches!(check.judge(&first), Verdict::Wait(ref why) if why.contains("counter") && why.contains("thermostat"))
        );
        let later = seen(
            vec![
                w("counter", WorkloadState::Running, 11, 0),
                w("thermostat", WorkloadState::Running, 1, 0),
            ],
            HubHealth::NotConfigured,
        );
        assert_eq!(
            check.judge(&later),
            Verdict::Pass("2 workloads answered".into())
        );
        let empty = seen(vec![], HubHealth::Answered);
        assert_eq!(
            HealthCheck::new(&empty).judge(&empty),
            Verdict::Pass("0 workloads answered; the hub answered".into())
        );
    }

    #[test]
    fn a_crash_looping_or_failed_workload_fails_the_check_with_its_error() {
        let first = seen(
            vec![w("counter", WorkloadState::Backoff, 0, 1)],
            HubHealth::NotConfigured,
        );
        let check = HealthCheck::new(&first);
        assert!(matches!(check.judge(&first), Verdict::Wait(_)));
        let looping = seen(
            vec![w("counter", WorkloadState::Backoff, 0, 4)],
            HubHealth::NotConfigured,
        );
        match check.judge(&looping) {
            Verdict::Fail(why) => {
                assert!(
                    why.contains("\"counter\" restarted 3 times") && why.contains("out of memory"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut missing = seen(vec![], HubHealth::NotConfigured);
        missing.expected = vec!["counter".into()];
        assert!(
            matches!(check.judge(&missing), Verdict::Fail(ref why) if why.contains("\"counter\" of the stored deployment was not restored"))
        );
        let failed = seen(
            vec![w("counter", WorkloadState::Failed, 0, 1)],
            HubHealth::NotConfigured,
        );
        assert!(matches!(check.judge(&failed), Verdict::Fail(ref why) if why.contains("failed")));
    }

    #[test]
    fn a_configured_hub_must_answer_and_a_quiet_workload_passes_once_settled() {
        let mut quiet = w("door", WorkloadState::Running, 0, 0);
        let first = seen(
            vec![quiet.clone()],
            HubHealth::NotAnswered("connection refused".into()),
        );
        let check = HealthCheck::new(&first);
        match check.judge(&first) {
            Verdict::Wait(why) => assert!(
                why.contains("connection refused") && why.contains("door"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        quiet.uptime_ms = Some(SETTLE_MS);
        let later = seen(vec![quiet], HubHealth::Answered);
        assert!(matches!(check.judge(&later), Verdict::Pass(_)));
    }
}
