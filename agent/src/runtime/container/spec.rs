//! What a container workload asks for: its root filesystem, command, environment, limits,
//! device grants and whether it gets a user namespace.

use std::path::PathBuf;

use super::ContainerError;

/// A container to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// The workload's name: lowercase letters, digits, `-`, `_` and `.`, at most 64 characters.
    pub name: String,
    /// A plain directory holding the root filesystem; mounted read-only.
    pub rootfs: PathBuf,
    /// The command and its arguments, resolved inside the container.
    pub command: Vec<String>,
    /// `KEY=value` pairs added to a default `PATH`.
    pub env: Vec<(String, String)>,
    /// cgroup limits.
    pub limits: Limits,
    /// Device nodes the container may use, as host paths under `/dev`. Each becomes a node at
    /// the same path inside and an allow rule; everything else is denied by the device cgroup.
    /// Empty means no device beyond the standard `/dev/null`, `zero`, `full`, `random`,
    /// `urandom` and `tty` that every OCI runtime provides.
    pub devices: Vec<PathBuf>,
    /// Run in a new user namespace with this mapping of root, if set.
    pub user_namespace: Option<IdMapping>,
}

/// cgroup limits of a container; `None` leaves that resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Memory limit in bytes (swap is not allowed beyond it where the host can say so).
    pub memory_bytes: Option<u64>,
    /// CPU quota in cores, for example `0.5` for half a core.
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u32>,
}

/// A user namespace mapping: container ids `0..size` are host ids `host_uid..` / `host_gid..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    /// First host uid.
    pub host_uid: u32,
    /// First host gid.
    pub host_gid: u32,
    /// How many ids are mapped.
    pub size: u32,
}

impl ContainerSpec {
    /// A spec with no limits, no devices and no extra environment.
    pub fn new<I, S>(name: &str, rootfs: impl Into<PathBuf>, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ContainerSpec {
            name: name.to_string(),
            rootfs: rootfs.into(),
            command: command.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            limits: Limits::default(),
            devices: Vec::new(),
            user_namespace: None,
        }
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ContainerError> {
        let invalid = |reason: String| ContainerError::InvalidSpec {
            name: self.name.clone(),
            reason,
        };
        crate::runtime::check_process_name(&self.name).map_err(|e| invalid(e.to_string()))?;
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(invalid("the command is empty".into()));
        }
        if !self.rootfs.is_absolute() {
            return Err(invalid(format!(
                "the rootfs {:?} must be an absolute path",
                self.rootfs
            )));
        }
        if let Some((key, _)) = self
            .env
            .iter()
            .find(|(k, _)| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(invalid(format!("bad environment variable name {key:?}")));
        }
        if self.limits.memory_bytes == Some(0) {
            return Err(invalid(
                "a memory limit of 0 bytes cannot run anything".into(),
            ));
        }
        if let Some(cpus) = self.limits.cpus
            && !(cpus.is_finite() && cpus >= 0.01)
        {
            return Err(invalid(format!(
                "the CPU quota must be at least 0.01 cores, not {cpus}"
            )));
        }
        if self.limits.pids == Some(0) {
            return Err(invalid(
                "a pids limit of 0 cannot start the container".into(),
            ));
        }
        if let Some(map) = self.user_namespace
            && map.size == 0
        {
            return Err(invalid("the user namespace maps no ids".into()));
        }
        Ok(())
    }
}
