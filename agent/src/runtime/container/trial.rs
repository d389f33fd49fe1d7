//! The trial container of the host probe: each OCI runtime found runs `/bin/true` in a
//! throwaway bundle whose rootfs binds the host's `/usr`, `/bin` and `/lib*` read-only, and its
//! refusal is turned into a sentence about this host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::cgroup::CgroupProbe;
use super::probe::{OciRuntime, RuntimeCheck, RuntimeKind};
use super::{Bundle, ContainerSpec};

/// How long the trial container may take before the runtime is called broken.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// What crun 1.8 prints when the unified hierarchy of a hybrid host has controllers.
const CRUN_HYBRID: &str = "cgroups in hybrid mode not supported";

pub(super) fn check_runtime(kind: RuntimeKind, cgroup: &CgroupProbe) -> RuntimeCheck {
    let Some(path) = find_in_path(kind.binary()) else {
        return RuntimeCheck {
            kind,
            runtime: None,
            problem: Some(format!("{kind} is not installed")),
            trial: None,
        };
    };
    let version = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{kind} (version unknown)"));
    let runtime = OciRuntime {
        kind,
        path,
        version,
    };
    let (problem, trial) = match trial_run(&runtime, cgroup) {
        Ok(elapsed) => (None, Some(elapsed)),
        Err(err) => (Some(explain(kind, &err.to_string(), cgroup)), None),
    };
    RuntimeCheck {
        kind,
        runtime: Some(runtime),
        problem,
        trial,
    }
}

/// Turns a runtime's own error into a sentence that says what it means on this host.
fn explain(kind: RuntimeKind, message: &str, cgroup: &CgroupProbe) -> String {
    if message.contains(CRUN_HYBRID) {
        let controllers = if cgroup.unified_controllers.is_empty() {
            String::new()
        } else {
            format!(
                " (the unified hierarchy holds {})",
                cgroup.unified_controllers.join(", ")
            )
        };
        format!("{kind} refuses this host's hybrid cgroup layout{controllers}: {message:?}")
    } else {
        format!("{kind} cannot run a trivial container: {message}")
    }
}

/// Why the trial container did not run.
#[derive(Debug, thiserror::Error)]
enum TrialError {
    /// A directory of the trial bundle cannot be made.
    #[error("cannot create {path:?}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A host symlink (`/bin` on a merged-/usr host) cannot be read.
    #[error("cannot read {path:?}: {source}")]
    ReadLink {
        /// The link.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The same symlink cannot be made in the trial root.
    #[error("cannot link {name} in {rootfs:?}: {source}")]
    Link {
        /// The link's name.
        name: &'static str,
        /// The trial root.
        rootfs: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bundle cannot be written.
    #[error(transparent)]
    Bundle(#[from] super::ContainerError),
    /// The bundle's spec cannot be read, extended or saved.
    #[error(transparent)]
    Spec(#[from] oci_spec::OciSpecError),
    /// The runtime cannot be started.
    #[error("cannot run {path:?}: {source}")]
    Run {
        /// The runtime's binary.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `true` did not exit in time.
    #[error("`true` did not exit within {TRIAL_TIMEOUT:?}")]
    Timeout,
    /// The runtime's process cannot be waited for.
    #[error("cannot wait for {kind}: {source}")]
    Wait {
        /// The runtime.
        kind: RuntimeKind,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime's output cannot be read.
    #[error("cannot read {kind}'s output: {source}")]
    Output {
        /// The runtime.
        kind: RuntimeKind,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime failed, saying why (its last line on stderr).
    #[error("{0}")]
    Refused(String),
    /// The runtime failed silently.
    #[error("exited with {0}")]
    Exited(std::process::ExitStatus),
}

fn trial_run(runtime: &OciRuntime, cgroup: &CgroupProbe) -> Result<Duration, TrialError> {
    let dir = std::env::temp_dir().join(format!(
        "lichen-probe-{}-{}",
        std::process::id(),
        runtime.kind
    ));
    let result = trial_run_in(&dir, runtime, cgroup);
    // The runtime deleted the container (no --keep); the directory is ours.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn trial_run_in(
    dir: &Path,
    runtime: &OciRuntime,
    cgroup: &CgroupProbe,
) -> Result<Duration, TrialError> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|source| TrialError::Create {
        path: rootfs.clone(),
        source,
    })?;
    let mut binds = Vec::new();
    for name in ["usr", "bin", "sbin", "lib", "lib64", "lib32"] {
        let host = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&host).map_err(|source| TrialError::ReadLink {
                    path: host.clone(),
                    source,
                })?;
                std::os::unix::fs::symlink(&target, rootfs.join(name)).map_err(|source| {
                    TrialError::Link {
                        name,
                        rootfs: rootfs.clone(),
                        source,
                    }
                })?;
            }
            Ok(meta) if meta.is_dir() => binds.push(host),
            _ => {}
        }
    }
    let name = format!("probe-{}", std::process::id());
    let spec = ContainerSpec::new(&name, &rootfs, ["/bin/true"]);
    let id = format!("lichen-{name}-{}", runtime.kind);
    let cgroups_path = format!("/lichen/{id}");
    let bundle_dir = dir.join("bundle");
    let bundle = Bundle::write(&bundle_dir, &spec, &cgroups_path, cgroup)?;
    add_read_only_binds(&bundle, &binds)?;

    let started = Instant::now();
    let mut child = Command::new(&runtime.path)
        .arg("--root")
        .arg(dir.join("state"))
        .args(["run", "--bundle"])
        .arg(&bundle.dir)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| TrialError::Run {
            path: runtime.path.clone(),
            source,
        })?;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > TRIAL_TIMEOUT => {
                let _ = child.kill();
                let _ = Command::new(&runtime.path)
                    .arg("--root")
                    .arg(dir.join("state"))
                    .args(["delete", "--force", &id])
                    .output();
                return Err(TrialError::Timeout);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(source) => {
                return Err(TrialError::Wait {
                    kind: runtime.kind,
                    source,
                });
            }
        }
    }
    let elapsed = started.elapsed();
    let output = child
        .wait_with_output()
        .map_err(|source| TrialError::Output {
            kind: runtime.kind,
            source,
        })?;
    if output.status.success() {
        Ok(elapsed)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();
        Err(if message.is_empty() {
            TrialError::Exited(output.status)
        } else {
            TrialError::Refused(message)
        })
    }
}

/// Adds read-only bind mounts of host directories (same path inside) to a written bundle.
fn add_read_only_binds(bundle: &Bundle, dirs: &[PathBuf]) -> Result<(), TrialError> {
    let config = bundle.dir.join("config.json");
    let mut spec = oci_spec::runtime::Spec::load(&config)?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for dir in dirs {
        let mount = oci_spec::runtime::MountBuilder::default()
            .destination(dir.clone())
            .typ("bind")
            .source(dir.clone())
            .options(vec![
                "rbind".to_string(),
                "ro".to_string(),
                "nosuid".to_string(),
                "nodev".to_string(),
            ])
            .build()?;
        mounts.push(mount);
    }
    spec.set_mounts(Some(mounts));
    Ok(spec.save(&config)?)
}

/// The absolute path of `name` in `PATH`, if it is there.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::CgroupLayout;
    use crate::runtime::container::HostProbe;

    #[test]
    fn crun_hybrid_refusal_is_explained() {
        let cgroup = CgroupProbe {
            layout: CgroupLayout::Hybrid,
            controllers: vec!["memory".into()],
            unified_controllers: vec!["hugetlb".into()],
            swap_limit: true,
        };
        let text = explain(
            RuntimeKind::Crun,
            "cgroups in hybrid mode not supported, drop all controllers from cgroupv2",
            &cgroup,
        );
        assert!(
            text.starts_with("crun refuses this host's hybrid cgroup layout (the unified hierarchy holds hugetlb)"),
            "{text}"
        );
        let probe = HostProbe {
            cgroup,
            runtimes: vec![
                RuntimeCheck {
                    kind: RuntimeKind::Crun,
                    runtime: Some(OciRuntime {
                        kind: RuntimeKind::Crun,
                        path: "/usr/bin/crun".into(),
                        version: "crun version 1.8.1".into(),
                    }),
                    problem: Some(text),
                    trial: None,
                },
                RuntimeCheck {
                    kind: RuntimeKind::Runc,
                    runtime: Some(OciRuntime {
                        kind: RuntimeKind::Runc,
                        path: "/usr/sbin/runc".into(),
                        version: "runc version 1.1.5".into(),
                    }),
                    problem: None,
                    trial: Some(Duration::from_millis(22)),
                },
            ],
        };
        assert_eq!(
            probe.usable_runtime().map(|r| r.kind),
            Some(RuntimeKind::Runc)
        );
        let summary = probe.runtime_summary();
        assert!(summary.contains("; using runc;"), "{summary}");
        assert!(
            summary.ends_with("runc works (runc version 1.1.5, `true` ran in 22 ms), used"),
            "{summary}"
        );
    }
}
