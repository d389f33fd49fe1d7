//! Isolation selection: which tier a workload runs in, from what it asks for, what its
//! artifact can run in, what the board profile offers and what the host really runs.
//!
//! The agent probes once at start ([`IsolationProbe::detect`]): Wasm always works (the engine
//! is built in); containers need a working OCI runtime (crun or runc, each tried with a real
//! container) and a cgroup filesystem; microVMs need the microVM runtime with a usable QEMU.
//! A tier the board profile does not list (`isolation` in `boards/*.toml`) is unavailable
//! whatever the host has.
//!
//! **The `strongest` rule.** Tiers are ordered by the boundary an escape must cross:
//! `microvm` (a guest kernel behind hardware virtualisation or QEMU's emulator) is stronger than
//! `container` (a separate process in its own namespaces and cgroups, on the host kernel),
//! which is stronger than `wasm` (a software sandbox inside the agent's process). `strongest`
//! picks, among the tiers the workload's artifact can run in, the strongest one that is
//! available; if none is, the deploy is rejected naming what the artifact's own tier lacks.
//! Today a Wasm module runs only in `wasm` and a container image only in `container` (no
//! microVM boots an OCI root filesystem yet), so `strongest` chooses the kind's own tier when it
//! is available; the rule is written for the day an artifact fits more than one.

use lichen_devices::board::{BoardProfile, Isolation};

use super::container::HostProbe;
use crate::deployment::{IsolationChoice, WorkloadSpec};

pub use crate::deployment::Tier;

/// The board profile's name for `tier`.
fn board_isolation(tier: Tier) -> Isolation {
    match tier {
        Tier::Wasm => Isolation::Wasm,
        Tier::Container => Isolation::Container,
        Tier::Microvm => Isolation::Microvm,
    }
}

/// The tiers an artifact of `kind` can run in, strongest first.
pub fn tiers_for(kind: Tier) -> &'static [Tier] {
    match kind {
        Tier::Wasm => &[Tier::Wasm],
        Tier::Container => &[Tier::Container],
        Tier::Microvm => &[Tier::Microvm],
    }
}

/// Whether containers can run here: the OCI runtime in use, or the missing piece.
pub fn container_outcome(containers: &HostProbe) -> Result<String, String> {
    match (containers.usable_runtime(), containers.cgroup.layout) {
        (_, super::container::CgroupLayout::Missing) => {
            Err("a cgroup filesystem: none is mounted at /sys/fs/cgroup".to_string())
        }
        (Some(oci), layout) => Ok(format!("{} ({}) on {layout}", oci.kind, oci.version)),
        (None, _) => Err(format!(
            "a working OCI runtime: {}",
            containers.runtime_summary()
        )),
    }
}

/// Whether microVMs can run here (blocks: the microVM probe may boot a trial guest): QEMU and
/// the accelerator, or the missing piece.
pub fn probe_microvm() -> Result<String, String> {
    microvm_outcome(super::microvm::probe_cached())
}

/// [`probe_microvm`] on a given probe.
pub fn microvm_outcome(probe: &super::microvm::MicrovmProbe) -> Result<String, String> {
    match probe.problem() {
        Some(problem) => Err(format!("a usable KVM or QEMU: {problem}")),
        None => Ok(probe.summary()),
    }
}

/// The tiers `spec` may run in, by its `isolation` and its kind: the ones to probe first.
pub fn wanted(spec: &WorkloadSpec) -> Vec<Tier> {
    match spec.isolation {
        None | Some(IsolationChoice::Strongest) => tiers_for(spec.kind()).to_vec(),
        Some(IsolationChoice::Tier(tier)) => vec![tier],
    }
}

/// Why a workload cannot run in the tier it asks for (the field is `isolation`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsolationError {
    /// The tier lacks a piece on this board or host (in words, from [`IsolationProbe::missing`]).
    #[error("\"{tier}\" isolation needs {piece}")]
    Missing {
        /// The tier asked for.
        tier: Tier,
        /// What it lacks.
        piece: String,
    },
    /// A container limit needs a cgroup controller the host does not have.
    #[error("{limit} needs the \"{controller}\" cgroup controller, which this host does not have")]
    NoController {
        /// The limit's field (`limits.memory`, `limits.cpus`, `limits.pids`).
        limit: &'static str,
        /// The controller.
        controller: &'static str,
    },
}

/// What the host offers for one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierProbe {
    /// The tier.
    pub tier: Tier,
    /// `Ok(what runs it)` or `Err(the missing piece)`, in words.
    pub outcome: Result<String, String>,
}

/// What this agent can run, probed once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationProbe {
    /// The board profile's name.
    pub board: String,
    /// The tiers the board profile lists.
    pub board_tiers: Vec<Tier>,
    /// Each tier's outcome on this host, weakest first.
    pub tiers: Vec<TierProbe>,
    /// cgroup controllers containers can be limited with.
    pub cgroup_controllers: Vec<String>,
}

impl IsolationProbe {
    /// Nothing probed yet on `board`, whose cgroup controllers are `cgroup_controllers`.
    pub fn new(board: &BoardProfile, cgroup_controllers: Vec<String>) -> Self {
        IsolationProbe {
            board: board.name.clone(),
            board_tiers: Tier::ALL
                .into_iter()
                .filter(|t| board.supports(board_isolation(*t)))
                .collect(),
            tiers: Vec::new(),
            cgroup_controllers,
        }
    }

    /// Probes the host for `board`, from the container probe `containers` and the microVM
    /// outcome `microvm` (`Err` with the missing piece when it cannot run).
    pub fn detect(
        board: &BoardProfile,
        containers: &HostProbe,
        microvm: Result<String, String>,
    ) -> Self {
        let mut probe = Self::new(board, containers.cgroup.controllers.clone());
        probe.record(Tier::Wasm, Ok("Wasmtime, built in".to_string()));
        probe.record(Tier::Container, container_outcome(containers));
        probe.record(Tier::Microvm, microvm);
        probe
    }

    /// Records what the host offers for `tier`.
    pub fn record(&mut self, tier: Tier, outcome: Result<String, String>) {
        self.tiers.retain(|p| p.tier != tier);
        self.tiers.push(TierProbe { tier, outcome });
        self.tiers.sort_by_key(|p| p.tier);
    }

    /// Whether `tier` has been probed.
    pub fn probed(&self, tier: Tier) -> bool {
        self.tiers.iter().any(|p| p.tier == tier)
    }

    /// Why `tier` cannot run here (the board does not offer it, or the host lacks a piece),
    /// or `None` when it can.
    pub fn missing(&self, tier: Tier) -> Option<String> {
        if !self.board_tiers.contains(&tier) {
            let offered: Vec<&str> = self.board_tiers.iter().map(|t| t.as_str()).collect();
            return Some(format!(
                "board \"{}\" does not offer it (its profile lists {})",
                self.board,
                offered.join(", ")
            ));
        }
        match self
            .tiers
            .iter()
            .find(|p| p.tier == tier)
            .map(|p| &p.outcome)
        {
            Some(Ok(_)) => None,
            Some(Err(piece)) => Some(piece.clone()),
            None => Some("it was not probed".to_string()),
        }
    }

    /// The tier `spec` runs in, or why it cannot run on this board: the message names the
    /// missing piece, such as `"container" isolation needs a working OCI runtime: ...`.
    pub fn select(&self, spec: &WorkloadSpec) -> Result<Tier, IsolationError> {
        let candidates = tiers_for(spec.kind());
        let asked = match spec.isolation {
            None => candidates[0],
            Some(IsolationChoice::Strongest) => {
                let mut best = None;
                for &tier in candidates {
                    if self.missing(tier).is_none() && best.is_none_or(|b| tier > b) {
                        best = Some(tier);
                    }
                }
                match best {
                    Some(tier) => tier,
                    // Report what the artifact's own tier lacks.
                    None => candidates[0],
                }
            }
            Some(IsolationChoice::Tier(tier)) => tier,
        };
        if let Some(piece) = self.missing(asked) {
            return Err(IsolationError::Missing { tier: asked, piece });
        }
        if asked == Tier::Container {
            let limits = &spec.limits;
            for (set, controller, limit) in [
                (limits.memory_bytes.is_some(), "memory", "limits.memory"),
                (limits.cpu_millis.is_some(), "cpu", "limits.cpus"),
                (limits.pids.is_some(), "pids", "limits.pids"),
            ] {
                if set && !self.cgroup_controllers.iter().any(|c| c == controller) {
                    return Err(IsolationError::NoController { limit, controller });
                }
            }
        }
        Ok(asked)
    }

    /// One line per tier for `doctor`: `ok` or `missing` with the reason.
    pub fn summary(&self) -> Vec<(Tier, bool, String)> {
        Tier::ALL
            .into_iter()
            .map(|tier| match self.missing(tier) {
                None => {
                    let what = self
                        .tiers
                        .iter()
                        .find(|p| p.tier == tier)
                        .and_then(|p| p.outcome.clone().ok())
                        .unwrap_or_default();
                    (tier, true, what)
                }
                Some(piece) => (tier, false, format!("needs {piece}")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::{CgroupLayout, CgroupProbe, RuntimeCheck, RuntimeKind};

    fn host(runc_works: bool) -> HostProbe {
        HostProbe {
            cgroup: CgroupProbe {
                layout: CgroupLayout::V2,
                controllers: vec!["memory".into(), "pids".into()],
                unified_controllers: Vec::new(),
                swap_limit: true,
            },
            runtimes: vec![
                RuntimeCheck {
                    kind: RuntimeKind::Crun,
                    runtime: None,
                    problem: Some("crun is not installed".into()),
                    trial: None,
                },
                RuntimeCheck {
                    kind: RuntimeKind::Runc,
                    runtime: runc_works.then(|| crate::runtime::container::OciRuntime {
                        kind: RuntimeKind::Runc,
                        path: "/usr/sbin/runc".into(),
                        version: "runc version 1.1.5".into(),
                    }),
                    problem: (!runc_works).then(|| "runc is not installed".into()),
                    trial: None,
                },
            ],
        }
    }

    fn spec(kind: Tier, isolation: Option<IsolationChoice>) -> WorkloadSpec {
        let text = match kind {
            Tier::Wasm => "[[workloads]]\nname = \"a\"\nmodule = \"a.wasm\"\n",
            Tier::Container => {
                "[[workloads]]\nname = \"a\"\nkind = \"container\"\nrootfs = \"r\"\ncommand = [\"/bin/true\"]\n"
            }
            Tier::Microvm => {
                "[[workloads]]\nname = \"a\"\nkind = \"microvm\"\nkernel = \"k\"\ninitramfs = \"i\"\n"
            }
        };
        let mut spec = crate::deployment::parse("d.toml", text, std::path::Path::new("/"))
            .expect("parses")
            .spec
            .workloads
            .remove(0);
        spec.isolation = isolation;
        spec
    }

    fn board(name: &str) -> BoardProfile {
        BoardProfile::builtin(name).expect("built-in profile")
    }

    #[test]
    fn each_kind_runs_in_its_tier_when_the_host_has_it() {
        let probe = IsolationProbe::detect(&board("sim"), &host(true), Err("x".into()));
        assert_eq!(probe.select(&spec(Tier::Wasm, None)), Ok(Tier::Wasm));
        let strongest = Some(IsolationChoice::Strongest);
        assert_eq!(
            probe.select(&spec(Tier::Container, strongest)),
            Ok(Tier::Container)
        );
        assert_eq!(probe.select(&spec(Tier::Wasm, strongest)), Ok(Tier::Wasm));
    }

    #[test]
    fn a_missing_piece_is_named() {
        let probe = IsolationProbe::detect(
            &board("sim"),
            &host(false),
            Err("a usable KVM or QEMU: qemu-system-x86_64 not found".into()),
        );
        let err = probe
            .select(&spec(Tier::Container, None))
            .expect_err("no OCI runtime")
            .to_string();
        assert!(
            err.starts_with("\"container\" isolation needs a working OCI runtime: crun is not installed; runc is not installed"),
            "{err}"
        );
        let err = probe
            .select(&spec(Tier::Container, Some(IsolationChoice::Strongest)))
            .expect_err("strongest finds nothing either")
            .to_string();
        assert!(err.contains("needs a working OCI runtime"), "{err}");
        assert_eq!(
            probe.missing(Tier::Microvm).as_deref(),
            Some("a usable KVM or QEMU: qemu-system-x86_64 not found")
        );
        // A limit needs its controller.
        let probe = IsolationProbe::detect(&board("sim"), &host(true), Err("x".into()));
        let mut wants_cpu = spec(Tier::Container, None);
        wants_cpu.limits.cpu_millis = Some(500);
        assert_eq!(
            probe.select(&wants_cpu).map_err(|e| e.to_string()),
            Err(
                "limits.cpus needs the \"cpu\" cgroup controller, which this host does not have"
                    .into()
            )
        );
    }

    #[test]
    fn a_tier_the_board_does_not_list_is_refused_whatever_the_host_has() {
        let probe = IsolationProbe::detect(&board("qemu-x86-test"), &host(true), Ok("qemu".into()));
        assert_eq!(
            probe.missing(Tier::Microvm).as_deref(),
            Some("board \"qemu-x86-test\" does not offer it (its profile lists wasm, container)")
        );
        let summary = probe.summary();
        assert_eq!(summary.len(), 3);
        assert!(summary[0].1 && summary[1].1 && !summary[2].1, "{summary:?}");
    }
}
