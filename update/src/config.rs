//! The `[update]` section of the agent configuration.
//!
//! ```toml
//! [update]
//! target = "x86_64"                       # bundles for another target are refused
//! boot = "grub"                           # grub, uboot or tryboot
//! boot-state = ["/bootfs/lichen/grubenv", "/bootfs/lichen/grubenv.bak"]
//! slots = { A = "partlabel:rootfs-a", B = "partlabel:rootfs-b" }
//! trusted-keys = ["<ed25519 public key, hex or base64>"]   # besides hub.trusted-keys
//! health-deadline = "5m"                  # 10s to 24h
//! confirm-file = "/run/lichen/boot-confirmed"
//! reboot-command = ["reboot"]
//! ```
//!
//! For tests and unusual boards, where the agent looks is configurable too: `system-file`
//! (default `/etc/lichen/system.json`), `cmdline` (`/proc/cmdline`), `sys-class-block`
//! (`/sys/class/block`), `dev-dir` (`/dev`), `mounts` (`/proc/self/mounts`), `env-size`
//! (U-Boot, default 0x4000) and `tryboot-partitions` (`{ A = 2, B = 3 }`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bootstate::grubenv::GrubEnvStore;
use crate::bootstate::tryboot::TrybootStore;
use crate::bootstate::ubootenv::{DEFAULT_SIZE, UbootEnvStore};
use crate::bootstate::{BootStateError, BootStore};
use crate::slot::{Slot, SlotError, resolve_device, valid_name};

/// Shortest health-check deadline.
pub const MIN_HEALTH_DEADLINE: Duration = Duration::from_secs(10);
/// Longest health-check deadline.
pub const MAX_HEALTH_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// Longest path in `[update]` (boot-state files, slot devices, `system-file`, ...), in bytes:
/// Linux's `PATH_MAX`.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most keys in `update.trusted-keys` (as in `hub.trusted-keys`).
pub const MAX_TRUSTED_KEYS: usize = 64;
/// Longest text of one trusted key (hex or base64 of 32 bytes fits with room).
pub const MAX_KEY_TEXT_BYTES: usize = 256;
/// Most arguments of `update.reboot-command`.
pub const MAX_REBOOT_ARGS: usize = 32;
/// Longest `update.health-deadline` text.
pub const MAX_DEADLINE_TEXT_BYTES: usize = 64;
/// Smallest and largest U-Boot environment copy (`update.env-size`).
pub const ENV_SIZE_BOUNDS: (usize, usize) = (64, crate::bootstate::ubootenv::MAX_SIZE);

/// Which boot loader keeps the boot state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    /// GRUB environment blocks.
    Grub,
    /// A U-Boot environment.
    Uboot,
    /// The Raspberry Pi firmware's autoboot.txt.
    Tryboot,
}

/// The devices of the two slots.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlotDevices {
    /// Slot A: `partlabel:NAME` or an absolute device path.
    #[serde(rename = "A")]
    pub a: String,
    /// Slot B.
    #[serde(rename = "B")]
    pub b: String,
}

/// Boot partitions of the slots for `tryboot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrybootPartitions {
    /// Slot A's boot partition number.
    #[serde(rename = "A")]
    pub a: u8,
    /// Slot B's.
    #[serde(rename = "B")]
    pub b: u8,
}

/// `[update]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpdateConfig {
    /// The target this board takes bundles for.
    pub target: String,
    /// The boot loader.
    pub boot: BootKind,
    /// The boot-state files: one or two (GRUB, U-Boot) or one autoboot.txt (tryboot).
    pub boot_state: Vec<PathBuf>,
    /// The slots' devices.
    pub slots: SlotDevices,
    /// Publisher keys whose bundles this board takes, besides `hub.trusted-keys`.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// How long a new slot's first boot may take to pass its health check.
    #[serde(default = "default_health_deadline")]
    pub health_deadline: String,
    /// A file created once a boot is confirmed (the board's init waits for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_file: Option<PathBuf>,
    /// The command that reboots the board.
    #[serde(default = "default_reboot")]
    pub reboot_command: Vec<String>,
    /// The running root's `{"version": ..., "target": ...}`.
    #[serde(default = "default_system_file")]
    pub system_file: PathBuf,
    /// The kernel command line (names the booted slot).
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Where partition names are looked up.
    #[serde(default = "default_sys_class_block")]
    pub sys_class_block: PathBuf,
    /// Where device nodes are.
    #[serde(default = "default_dev_dir")]
    pub dev_dir: PathBuf,
    /// The mount table (a mounted slot is never written).
    #[serde(default = "default_mounts")]
    pub mounts: PathBuf,
    /// Size of each U-Boot environment copy.
    #[serde(default = "default_env_size")]
    pub env_size: usize,
    /// The slots' boot partitions for tryboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tryboot_partitions: Option<TrybootPartitions>,
}

fn default_health_deadline() -> String {
    "5m".into()
}
fn default_reboot() -> Vec<String> {
    vec!["reboot".into()]
}
fn default_system_file() -> PathBuf {
    "/etc/lichen/system.json".into()
}
fn default_cmdline() -> PathBuf {
    "/proc/cmdline".into()
}
fn default_sys_class_block() -> PathBuf {
    "/sys/class/block".into()
}
fn default_dev_dir() -> PathBuf {
    "/dev".into()
}
fn default_mounts() -> PathBuf {
    "/proc/self/mounts".into()
}
fn default_env_size() -> usize {
    DEFAULT_SIZE
}

/// A field of `[update]` that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("update.{field}: {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl UpdateConfig {
    /// Checks every field; the first wrong one is named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: String| Err(ConfigError { field, reason });
        if !valid_name(&self.target) {
            return bad(
                "target",
                format!("{:?} is not 1-64 letters, digits and . _ + -", self.target),
            );
        }
        if self.health_deadline.len() > MAX_DEADLINE_TEXT_BYTES {
            return bad(
                "health-deadline",
                format!(
                    "{} bytes; at most {MAX_DEADLINE_TEXT_BYTES}",
                    self.health_deadline.len()
                ),
            );
        }
        self.health_deadline()?;
        if self.reboot_command.is_empty() || self.reboot_command[0].is_empty() {
            return bad(
                "reboot-command",
                "empty: name the program that reboots".into(),
            );
        }
        if self.reboot_command.len() > MAX_REBOOT_ARGS {
            return bad(
                "reboot-command",
                format!(
                    "{} arguments; at most {MAX_REBOOT_ARGS}",
                    self.reboot_command.len()
                ),
            );
        }
        if let Some(arg) = self
            .reboot_command
            .iter()
            .find(|arg| arg.len() > MAX_PATH_BYTES)
        {
            return bad(
                "reboot-command",
                format!(
                    "an argument of {} bytes; at most {MAX_PATH_BYTES}",
                    arg.len()
                ),
            );
        }
        if self.trusted_keys.len() > MAX_TRUSTED_KEYS {
            return bad(
                "trusted-keys",
                format!(
                    "{} keys; at most {MAX_TRUSTED_KEYS}",
                    self.trusted_keys.len()
                ),
            );
        }
        if let Some(i) = self
            .trusted_keys
            .iter()
            .position(|key| key.len() > MAX_KEY_TEXT_BYTES)
        {
            return bad(
                "trusted-keys",
                format!(
                    "key {i} is {} bytes; at most {MAX_KEY_TEXT_BYTES}",
                    self.trusted_keys[i].len()
                ),
            );
        }
        let mut paths: Vec<(&'static str, &std::path::Path)> = vec![
            ("system-file", &self.system_file),
            ("cmdline", &self.cmdline),
            ("sys-class-block", &self.sys_class_block),
            ("dev-dir", &self.dev_dir),
            ("mounts", &self.mounts),
        ];
        if let Some(file) = &self.confirm_file {
            paths.push(("confirm-file", file));
        }
        for file in &self.boot_state {
            paths.push(("boot-state", file));
        }
        for (field, path) in paths {
            let bytes = path.as_os_str().len();
            if bytes == 0 || bytes > MAX_PATH_BYTES {
                return bad(
                    field,
                    format!("a path of {bytes} bytes; expected 1 to {MAX_PATH_BYTES}"),
                );
            }
        }
        if self.boot == BootKind::Uboot
            && !(ENV_SIZE_BOUNDS.0..=ENV_SIZE_BOUNDS.1).contains(&self.env_size)
        {
            return bad(
                "env-size",
                format!(
                    "{} is out of bounds: expected {} to {}",
                    self.env_size, ENV_SIZE_BOUNDS.0, ENV_SIZE_BOUNDS.1
                ),
            );
        }
        if let Some(parts) = self.tryboot_partitions
            && (parts.a == parts.b || !(1..=63).contains(&parts.a) || !(1..=63).contains(&parts.b))
        {
            return bad(
                "tryboot-partitions",
                format!(
                    "A={} B={}: expected two different partitions 1 to 63",
                    parts.a, parts.b
                ),
            );
        }
        let copies = self.boot_state.len();
        let ok = match self.boot {
            BootKind::Grub | BootKind::Uboot => (1..=2).contains(&copies),
            BootKind::Tryboot => copies == 1 && self.tryboot_partitions.is_some(),
        };
        if !ok {
            return bad(
                "boot-state",
                match self.boot {
                    BootKind::Tryboot => {
                        "tryboot takes one autoboot.txt and update.tryboot-partitions".into()
                    }
                    _ => format!("{copies} files; GRUB and U-Boot take one or two"),
                },
            );
        }
        for (field, spec) in [("slots.A", &self.slots.a), ("slots.B", &self.slots.b)] {
            if spec.len() > MAX_PATH_BYTES {
                return bad(
                    field,
                    format!("{} bytes; at most {MAX_PATH_BYTES}", spec.len()),
                );
            }
            if !(spec.starts_with("partlabel:") || spec.starts_with('/')) {
                return bad(
                    field,
                    format!("{spec:?} is neither partlabel:NAME nor an absolute path"),
                );
            }
        }
        Ok(())
    }

    /// The health-check deadline, bounded.
    pub fn health_deadline(&self) -> Result<Duration, ConfigError> {
        let deadline =
            humantime::parse_duration(&self.health_deadline).map_err(|e| ConfigError {
                field: "health-deadline",
                reason: format!("{:?}: {e}", self.health_deadline),
            })?;
        if !(MIN_HEALTH_DEADLINE..=MAX_HEALTH_DEADLINE).contains(&deadline) {
            return Err(ConfigError {
                field: "health-deadline",
                reason: format!("{:?} is outside 10s to 24h", self.health_deadline),
            });
        }
        Ok(deadline)
    }

    /// The boot-state store of this boot loader.
    pub fn boot_store(&self) -> Result<Box<dyn BootStore>, BootStateError> {
        Ok(match self.boot {
            BootKind::Grub => Box::new(GrubEnvStore::new(self.boot_state.clone())?),
            BootKind::Uboot => {
                Box::new(UbootEnvStore::new(self.boot_state.clone(), self.env_size)?)
            }
            BootKind::Tryboot => {
                let parts = self.tryboot_partitions.ok_or_else(|| {
                    BootStateError::Config("update.tryboot-partitions is missing".into())
                })?;
                let path = self.boot_state.first().cloned().ok_or_else(|| {
                    BootStateError::Config("update.boot-state names no autoboot.txt".into())
                })?;
                Box::new(TrybootStore::new(path, parts.a, parts.b)?)
            }
        })
    }

    /// The device of a slot.
    pub fn device(&self, slot: Slot) -> Result<PathBuf, SlotError> {
        let spec = match slot {
            Slot::A => &self.slots.a,
            Slot::B => &self.slots.b,
        };
        resolve_device(spec, &self.sys_class_block, &self.dev_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<UpdateConfig, Box<dyn std::error::Error>> {
        let mut text = String::new();
        for (key, line) in [
            ("boot", "boot = \"grub\""),
            (
                "slots",
                "slots = { A = \"partlabel:rootfs-a\", B = \"/dev/vda3\" }",
            ),
            ("target", "target = \"x86_64\""),
            ("boot-state", "boot-state = [\"/b/grubenv\"]"),
        ] {
            if !extra.lines().any(|l| l.starts_with(&format!("{key} ="))) {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str(extra);
        let config: UpdateConfig = toml::from_str(&text)?;
        config.validate()?;
        Ok(config)
    }

    /// Why `extra` is refused.
    fn refusal(extra: &str) -> String {
        config(extra).unwrap_err().to_string()
    }

    #[test]
    fn a_good_section_validates_with_its_defaults() {
        let config = config("").unwrap();
        assert_eq!(config.health_deadline().unwrap(), Duration::from_secs(300));
        assert_eq!(config.reboot_command, vec!["reboot".to_string()]);
        assert_eq!(config.device(Slot::B).unwrap(), PathBuf::from("/dev/vda3"));
    }

    #[test]
    fn each_bad_field_is_named() {
        for (extra, field) in [
            ("health-deadline = \"1s\"", "update.health-deadline"),
            ("health-deadline = \"soon\"", "update.health-deadline"),
            ("reboot-command = []", "update.reboot-command"),
            ("boot-state = [\"/a\", \"/b\", \"/c\"]", "update.boot-state"),
            ("target = \"../x\"", "update.target"),
            ("env-size = 1", ""),
            (
                "boot = \"uboot\"\nenv-size = 1",
                "update.env-size: 1 is out of bounds",
            ),
            ("reboot-command = [\"reboot\", \"\"]", ""),
            (
                "tryboot-partitions = { A = 2, B = 2 }",
                "update.tryboot-partitions",
            ),
            ("confirm-file = \"\"", "update.confirm-file"),
            ("trusted-keys = [\"aaaa\"]", ""),
        ] {
            if field.is_empty() {
                // Fine here: env-size is the U-Boot adapter's, keys are parsed by the agent.
                config(extra).unwrap();
                continue;
            }
            let err = refusal(extra);
            assert!(err.contains(field), "{extra}: {err}");
        }
        let long = format!("health-deadline = \"{}s\"", "1".repeat(70));
        assert!(refusal(&long).contains("update.health-deadline"));
        let many = format!("reboot-command = {:?}", vec!["x"; 33]);
        assert!(refusal(&many).contains("update.reboot-command: 33 arguments"));
        let keys = format!("trusted-keys = {:?}", vec!["k"; 65]);
        assert!(refusal(&keys).contains("update.trusted-keys: 65 keys"));
        let key = format!("trusted-keys = [{:?}]", "k".repeat(257));
        assert!(refusal(&key).contains("update.trusted-keys: key 0"));
        let path = format!("system-file = \"/{}\"", "p".repeat(4096));
        assert!(refusal(&path).contains("update.system-file"));
        let slot = format!(
            "slots = {{ A = \"/{}\", B = \"/dev/vda3\" }}",
            "d".repeat(4096)
        );
        assert!(refusal(&slot).contains("update.slots.A"));
        let err = toml::from_str::<UpdateConfig>("target = \"x\"\nboot = \"lilo\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lilo"), "{err}");
    }
}
