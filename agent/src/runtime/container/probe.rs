//! Finds the OCI runtimes on this host (crun first, runc next), checks that each really runs
//! a trivial container (`trial`), and reads the cgroup layout. Probed by what works, not by
//! what exists. Without the `containers` feature only the cgroup layout is read.

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::cgroup::CgroupProbe;

/// Which OCI runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    /// crun (C, small and fast; preferred).
    Crun,
    /// runc (Go, the reference runtime).
    Runc,
}

impl RuntimeKind {
    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            RuntimeKind::Crun => "crun",
            RuntimeKind::Runc => "runc",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.binary())
    }
}

/// An OCI runtime binary found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRuntime {
    /// crun or runc.
    pub kind: RuntimeKind,
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// The first line of `--version`, for example `runc version 1.1.5+ds1`.
    pub version: String,
}

/// The outcome of trying one runtime.
#[derive(Debug, Clone)]
pub struct RuntimeCheck {
    /// Which runtime was looked for.
    pub kind: RuntimeKind,
    /// The binary, if it is in `PATH`.
    pub runtime: Option<OciRuntime>,
    /// Why it cannot be used, in words; `None` when the trial container ran.
    pub problem: Option<String>,
    /// Start-to-exit time of the trial container (`true`), when it ran.
    pub trial: Option<Duration>,
}

impl RuntimeCheck {
    /// Whether this runtime ran the trial container.
    pub fn works(&self) -> bool {
        self.runtime.is_some() && self.problem.is_none()
    }
}

/// What the host offers for containers.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// The cgroup layout and its controllers.
    pub cgroup: CgroupProbe,
    /// crun then runc, each with its outcome.
    pub runtimes: Vec<RuntimeCheck>,
}

impl HostProbe {
    /// The runtime to use: the first that works, crun before runc.
    pub fn usable_runtime(&self) -> Option<&OciRuntime> {
        self.runtimes
            .iter()
            .find(|c| c.works())
            .and_then(|c| c.runtime.as_ref())
    }

    /// One sentence for `doctor` about the runtimes: which one is used and why others are not.
    pub fn runtime_summary(&self) -> String {
        let mut parts = Vec::new();
        let chosen = self.usable_runtime().map(|r| r.kind);
        for check in &self.runtimes {
            match (&check.runtime, &check.problem) {
                (None, _) => parts.push(format!("{} is not installed", check.kind)),
                (Some(rt), None) => parts.push(format!(
                    "{} works ({}, `true` ran in {} ms){}",
                    check.kind,
                    rt.version,
                    check.trial.map_or(0, |d| d.as_millis()),
                    if chosen == Some(check.kind) {
                        ", used"
                    } else {
                        ""
                    }
                )),
                (Some(_), Some(problem)) => parts.push(match chosen {
                    Some(used) => format!("{problem}; using {used}"),
                    None => problem.clone(),
                }),
            }
        }
        parts.join("; ")
    }
}

/// Probes once per process and keeps the answer (the agent probes at start; `doctor` reuses it).
pub fn probe_cached() -> &'static HostProbe {
    static PROBE: OnceLock<HostProbe> = OnceLock::new();
    PROBE.get_or_init(probe)
}

/// Probes the host now: the cgroup layout, then crun and runc, each running `/bin/true` in a
/// throwaway bundle whose rootfs binds the host's `/usr`, `/bin` and `/lib*` read-only.
/// Blocks for the trial runs (tens of milliseconds each).
pub fn probe() -> HostProbe {
    let cgroup = CgroupProbe::detect();
    #[cfg(feature = "containers")]
    let runtimes = [RuntimeKind::Crun, RuntimeKind::Runc]
        .into_iter()
        .map(|kind| super::trial::check_runtime(kind, &cgroup))
        .collect();
    // No container runtime in this build: nothing to try.
    #[cfg(not(feature = "containers"))]
    let runtimes = Vec::new();
    HostProbe { cgroup, runtimes }
}
