//! `[kubeedge]`: Lichen as a KubeEdge device mapper (`docs/kubeedge.md`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check::ConfigError;

/// `[kubeedge]`: the section's presence turns the mapper on (`enabled = false` keeps the
/// settings but does not start it); every key is optional.
///
/// ```toml
/// [kubeedge]
/// enabled = true                                 # default true when the section is there
/// edgecore-socket = "/etc/kubeedge/dmi.sock"     # EdgeCore's DeviceManagerService
/// mapper-socket = "/etc/kubeedge/lichen.sock"    # Lichen's DeviceMapperService (mode 0600)
/// max-devices = 4096                             # 1 to 65536 Devices, each a live function
/// queue-reports = 100000                         # 1 to 10000000 reports kept while EdgeCore is away
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct KubeEdgeSection {
    /// Whether the daemon starts the mapper.
    pub enabled: bool,
    /// EdgeCore's DMI socket (a Unix socket path of at most
    /// [`KubeEdgeSection::MAX_SOCKET_BYTES`]).
    pub edgecore_socket: PathBuf,
    /// The mapper's own socket, sent to EdgeCore at registration.
    pub mapper_socket: PathBuf,
    /// Most Devices (1 to [`KubeEdgeSection::MAX_DEVICES`]).
    pub max_devices: u64,
    /// Most reports queued for EdgeCore (1 to [`KubeEdgeSection::MAX_QUEUE_REPORTS`]); past
    /// it the oldest covered twin report goes first (`docs/kubeedge.md`).
    pub queue_reports: u64,
}

impl KubeEdgeSection {
    /// Longest socket path, in bytes: what fits `sockaddr_un.sun_path` with its NUL.
    pub const MAX_SOCKET_BYTES: usize = 107;
    /// Largest `max-devices`.
    pub const MAX_DEVICES: u64 = 65_536;
    /// Largest `queue-reports`.
    pub const MAX_QUEUE_REPORTS: u64 = 10_000_000;

    /// Checks every key against its bound.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("kubeedge.edgecore-socket", &self.edgecore_socket),
            ("kubeedge.mapper-socket", &self.mapper_socket),
        ] {
            let length = path.as_os_str().len();
            if length == 0 || length > Self::MAX_SOCKET_BYTES {
                return Err(ConfigError {
                    key: key.into(),
                    message: format!(
                        "the socket path is {length} bytes long: expected 1 to {} (a Unix socket path)",
                        Self::MAX_SOCKET_BYTES
                    ),
                });
            }
        }
        if self.edgecore_socket == self.mapper_socket {
            return Err(ConfigError {
                key: "kubeedge.mapper-socket".into(),
                message: "the mapper's socket must differ from EdgeCore's".into(),
            });
        }
        for (key, value, max) in [
            ("kubeedge.max-devices", self.max_devices, Self::MAX_DEVICES),
            (
                "kubeedge.queue-reports",
                self.queue_reports,
                Self::MAX_QUEUE_REPORTS,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError {
                    key: key.into(),
                    message: format!("{value} is out of bounds: expected 1 to {max}"),
                });
            }
        }
        Ok(())
    }
}

impl Default for KubeEdgeSection {
    fn default() -> Self {
        Self {
            enabled: true,
            edgecore_socket: "/etc/kubeedge/dmi.sock".into(),
            mapper_socket: "/etc/kubeedge/lichen.sock".into(),
            max_devices: 4096,
            queue_reports: 100_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::AgentConfig;

    fn load(text: &str) -> anyhow::Result<AgentConfig> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write config");
        AgentConfig::load(Some(&path))
    }

    #[test]
    fn the_kubeedge_section_turns_the_mapper_on_with_defaults_and_checks_its_bounds() {
        assert!(load("").unwrap().kubeedge.is_none());
        let section = load("[kubeedge]\n").unwrap().kubeedge.expect("present");
        assert!(section.enabled);
        assert_eq!(
            section.edgecore_socket,
            std::path::Path::new("/etc/kubeedge/dmi.sock")
        );
        let off = load("[kubeedge]\nenabled = false\n")
            .unwrap()
            .kubeedge
            .unwrap();
        assert!(!off.enabled);
        for (text, key) in [
            ("[kubeedge]\nmax-devices = 0\n", "kubeedge.max-devices"),
            (
                "[kubeedge]\nqueue-reports = 10000001\n",
                "kubeedge.queue-reports",
            ),
            (
                &format!("[kubeedge]\nmapper-socket = \"/{}\"\n", "s".repeat(200)),
                "kubeedge.mapper-socket",
            ),
            (
                "[kubeedge]\nmapper-socket = \"/etc/kubeedge/dmi.sock\"\n",
                "kubeedge.mapper-socket",
            ),
        ] {
            let err = format!("{:#}", load(text).unwrap_err());
            assert!(err.contains(&format!("{key}: ")), "{err}");
        }
        let err = format!("{:#}", load("[kubeedge]\nsocket = \"x\"\n").unwrap_err());
        assert!(err.contains("unknown field `socket`"), "{err}");
    }
}
