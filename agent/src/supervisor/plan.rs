//! The reconcile plan: what one source's desired workloads mean for the running ones. A plain
//! function of its inputs (no I/O, no locks), so every rule has a unit test below; `apply` and
//! `sources` carry the plan out.
//!
//! The rules, for the workloads of one source:
//! - A desired workload that runs under the same name, in the same tier and has not ended is
//!   `Unchanged` when its spec and artifact digest are equal, otherwise `Reload`ed in place
//!   (a Wasm hot reload; the operator's containers and microVMs get their runtime's update).
//!   For the pods and devices sources a changed container or microVM is started afresh, and a
//!   workload that failed or completed counts as ended.
//! - Any other desired workload is `Start`ed (replacing whatever of that name runs).
//! - With [`Scope::Whole`] (an operator deployment), the source's running workloads the
//!   deployment no longer lists are stopped; other sources' workloads are never touched.

use std::collections::BTreeMap;

use super::Source;
use crate::deployment::{WorkloadSpec, WorkloadState};
use crate::runtime::Tier;

/// A workload the source wants, with the tier picked for it and its prepared artifact's digest.
#[derive(Debug, Clone, Copy)]
pub(super) struct Desired<'a> {
    pub spec: &'a WorkloadSpec,
    pub tier: Tier,
    pub digest: &'a str,
}

/// What the plan needs to know of a running workload.
#[derive(Debug, Clone)]
pub(super) struct Current<'a> {
    pub source: Source,
    pub tier: Tier,
    pub spec: &'a WorkloadSpec,
    pub digest: &'a str,
    /// Its worker has ended (stopped, or a finished task).
    pub finished: bool,
    /// Its state, read for sources other than the operator only (`None` for the operator's).
    pub state: Option<WorkloadState>,
}

/// Whether the desired list is the source's whole set or one workload of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// The whole set: running workloads of the source that it does not list stop.
    Whole,
    /// One workload added or replaced: nothing else changes.
    One,
}

/// What happens to one desired workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Runs as it is.
    Unchanged,
    /// The running workload takes the new spec or artifact in place.
    Reload,
    /// Started (after stopping whatever of that name runs).
    Start,
}

/// The plan for one source: an action per desired workload, in order, and what stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    pub actions: Vec<Action>,
    pub stop: Vec<String>,
}

impl Plan {
    /// Wasm workloads reloaded in place: each holds a second instance slot during its reload.
    pub fn wasm_reloads(&self, desired: &[Desired<'_>]) -> usize {
        self.actions
            .iter()
            .zip(desired)
            .filter(|(action, d)| **action == Action::Reload && d.tier == Tier::Wasm)
            .count()
    }
}

/// The plan for `source`'s `desired` workloads against the `running` ones (of every source).
pub(super) fn plan(
    source: Source,
    scope: Scope,
    desired: &[Desired<'_>],
    running: &BTreeMap<String, Current<'_>>,
) -> Plan {
    let actions = desired
        .iter()
        .map(|d| {
            let Some(current) = running.get(&d.spec.name) else {
                return Action::Start;
            };
            let ended = current.finished
                || (source != Source::Operator
                    && current.state.is_some_and(WorkloadState::is_finished));
            if current.tier != d.tier || ended {
                return Action::Start;
            }
            if current.spec == d.spec && current.digest == d.digest {
                Action::Unchanged
            } else if source == Source::Operator || d.tier == Tier::Wasm {
                Action::Reload
            } else {
                Action::Start
            }
        })
        .collect();
    let stop = match scope {
        Scope::One => Vec::new(),
        Scope::Whole => running
            .iter()
            .filter(|(name, current)| {
                current.source == source && !desired.iter().any(|d| d.spec.name == **name)
            })
            .map(|(name, _)| name.clone())
            .collect(),
    };
    Plan { actions, stop }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> WorkloadSpec {
        let text = format!("[[workloads]]\nname = \"{name}\"\nmodule = \"m.wasm\"\n");
        crate::deployment::parse("d.toml", &text, std::path::Path::new("/"))
            .expect("a test spec parses")
            .spec
            .workloads
            .remove(0)
    }

    fn current<'a>(
        source: Source,
        tier: Tier,
        spec: &'a WorkloadSpec,
        digest: &'a str,
    ) -> Current<'a> {
        Current {
            source,
            tier,
            spec,
            digest,
            finished: false,
            state: Some(WorkloadState::Running),
        }
    }

    #[test]
    fn equal_spec_and_digest_is_unchanged_and_a_new_digest_reloads() {
        let a = spec("a");
        let running = BTreeMap::from([(
            "a".to_string(),
            current(Source::Operator, Tier::Wasm, &a, "d1"),
        )]);
        let same = [Desired {
            spec: &a,
            tier: Tier::Wasm,
            digest: "d1",
        }];
        let p = plan(Source::Operator, Scope::Whole, &same, &running);
        assert_eq!(
            p,
            Plan {
                actions: vec![Action::Unchanged],
                stop: vec![]
            }
        );
        let new = [Desired {
            spec: &a,
            tier: Tier::Wasm,
            digest: "d2",
        }];
        let p = plan(Source::Operator, Scope::Whole, &new, &running);
        assert_eq!(p.actions, vec![Action::Reload]);
        assert_eq!(p.wasm_reloads(&new), 1);
    }

    #[test]
    fn a_changed_spec_reloads_and_another_tier_or_an_ended_worker_starts() {
        let a = spec("a");
        let mut b = a.clone();
        b.config.insert("step".into(), "2".into());
        let mut running = BTreeMap::from([(
            "a".to_string(),
            current(Source::Operator, Tier::Wasm, &a, "d"),
        )]);
        let changed = [Desired {
            spec: &b,
            tier: Tier::Wasm,
            digest: "d",
        }];
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &changed, &running).actions,
            vec![Action::Reload]
        );
        let moved = [Desired {
            spec: &a,
            tier: Tier::Container,
            digest: "d",
        }];
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &moved, &running).actions,
            vec![Action::Start]
        );
        running.get_mut("a").unwrap().finished = true;
        let same = [Desired {
            spec: &a,
            tier: Tier::Wasm,
            digest: "d",
        }];
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &same, &running).actions,
            vec![Action::Start]
        );
    }

    #[test]
    fn a_whole_deployment_stops_only_its_own_source_unlisted_workloads() {
        let a = spec("a");
        let gone = spec("gone");
        let pod = spec("pod");
        let running = BTreeMap::from([
            (
                "a".to_string(),
                current(Source::Operator, Tier::Wasm, &a, "d"),
            ),
            (
                "gone".to_string(),
                current(Source::Operator, Tier::Wasm, &gone, "d"),
            ),
            (
                "pod".to_string(),
                current(Source::Pods, Tier::Wasm, &pod, "d"),
            ),
        ]);
        let desired = [Desired {
            spec: &a,
            tier: Tier::Wasm,
            digest: "d",
        }];
        let p = plan(Source::Operator, Scope::Whole, &desired, &running);
        assert_eq!(p.stop, vec!["gone".to_string()]);
        let p = plan(Source::Pods, Scope::One, &desired, &running);
        assert!(p.stop.is_empty());
        let fresh = spec("new");
        let desired = [Desired {
            spec: &fresh,
            tier: Tier::Wasm,
            digest: "d",
        }];
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &desired, &running).actions,
            vec![Action::Start]
        );
    }

    #[test]
    fn pods_restart_a_changed_container_and_restart_a_failed_workload() {
        let c = spec("c");
        let mut changed = c.clone();
        changed.config.insert("x".into(), "1".into());
        let mut running = BTreeMap::from([(
            "c".to_string(),
            current(Source::Pods, Tier::Container, &c, "d"),
        )]);
        let desired = [Desired {
            spec: &changed,
            tier: Tier::Container,
            digest: "d",
        }];
        assert_eq!(
            plan(Source::Pods, Scope::One, &desired, &running).actions,
            vec![Action::Start]
        );
        // The operator's container takes its runtime's update instead.
        running.get_mut("c").unwrap().source = Source::Operator;
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &desired, &running).actions,
            vec![Action::Reload]
        );
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &desired, &running).wasm_reloads(&desired),
            0
        );
        // A failed workload: the operator leaves an equal one as it is, a pod starts afresh.
        running.get_mut("c").unwrap().state = Some(WorkloadState::Failed);
        let same = [Desired {
            spec: &c,
            tier: Tier::Container,
            digest: "d",
        }];
        assert_eq!(
            plan(Source::Operator, Scope::Whole, &same, &running).actions,
            vec![Action::Unchanged]
        );
        assert_eq!(
            plan(Source::Pods, Scope::One, &same, &running).actions,
            vec![Action::Start]
        );
    }
}
