//! The bounds of the agent configuration, checked on load, and the effective configuration
//! printed by `lichen run --print-config`.

use std::path::Path;

use super::{
    AgentConfig, ContainerdSection, HubSection, ImageSection, LogSection, WasmSection, parse_size,
};
use crate::deployment::show_bytes;

/// A configuration key out of its bound: the key (`wasm.max-instances`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key, with its section (`logs.burst`).
    pub key: String,
    /// The value and the bound, lowercase.
    pub message: String,
}

fn error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The levels `logs.level` takes.
pub(super) const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

impl AgentConfig {
    /// Checks every key against its bound; the first one out of bounds is named.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(dir) = &self.state_dir {
            path_bytes("state-dir", dir)?;
        }
        let boards = lichen_devices::board::builtin_names();
        if !boards.contains(&self.board.as_str()) {
            return Err(error(
                "board",
                format!(
                    "unknown board {:?}: expected one of {}",
                    self.board,
                    boards.join(", ")
                ),
            ));
        }
        self.wasm.check()?;
        self.threads.check()?;
        self.logs.check()?;
        self.images.check()?;
        self.containerd.check()?;
        if let Some(hub) = &self.hub {
            hub.check()?;
        }
        if let Some(kubeedge) = &self.kubeedge {
            kubeedge.check()?;
        }
        if let Some(update) = &self.update {
            update
                .validate()
                .map_err(|e| error(&format!("update.{}", e.field), e.reason))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML: every key with its value, the defaults filled
    /// in, `state-dir` as the agent would use it, the hub password (if any) redacted.
    pub fn effective_toml(&self, state_dir: &Path) -> Result<String, toml::ser::Error> {
        let mut effective = self.clone();
        effective.state_dir = Some(state_dir.to_path_buf());
        if let Some(hub) = effective.hub.as_mut()
            && hub.password.is_some()
        {
            hub.password = Some("<redacted>".to_owned());
        }
        Ok(format!(
            "# Effective configuration of lichen {}: every key, the defaults filled in.\n\
             # Keys, defaults and bounds: docs/config.md.\n{}",
            env!("CARGO_PKG_VERSION"),
            toml::to_string(&effective)?
        ))
    }
}

impl ContainerdSection {
    fn check(&self) -> Result<(), ConfigError> {
        socket_path("containerd.task-socket", &self.task_socket)
    }
}

/// A Unix socket path: absolute and short enough for a socket address.
pub(super) fn socket_path(key: &str, path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len > ContainerdSection::MAX_SOCKET_PATH_BYTES {
        return Err(error(
            key,
            format!(
                "{len} bytes is too long for a Unix socket: at most {}",
                ContainerdSection::MAX_SOCKET_PATH_BYTES
            ),
        ));
    }
    if !path.is_absolute() {
        return Err(error(
            key,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    Ok(())
}

impl WasmSection {
    fn check(&self) -> Result<(), ConfigError> {
        if !(1..=Self::MAX_INSTANCES).contains(&self.max_instances) {
            return Err(error(
                "wasm.max-instances",
                format!(
                    "{} is out of bounds: expected 1 to {}",
                    self.max_instances,
                    Self::MAX_INSTANCES
                ),
            ));
        }
        size(
            "wasm.max-memory",
            &self.max_memory,
            Self::MIN_MEMORY,
            Self::MAX_MEMORY,
        )?;
        size("wasm.memory-guard", &self.memory_guard, 0, Self::MAX_GUARD)?;
        for (key, value, max) in [
            (
                "wasm.table-elements",
                self.table_elements,
                Self::MAX_TABLE_ELEMENTS,
            ),
            (
                "wasm.core-instances-per-component",
                self.core_instances_per_component,
                Self::MAX_PER_COMPONENT,
            ),
            (
                "wasm.tables-per-component",
                self.tables_per_component,
                Self::MAX_PER_COMPONENT,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(error(
                    key,
                    format!("{value} is out of bounds: expected 1 to {max}"),
                ));
            }
        }
        Ok(())
    }
}

impl LogSection {
    fn check(&self) -> Result<(), ConfigError> {
        if !(1..=Self::MAX_RING_LINES).contains(&self.ring_lines) {
            return Err(error(
                "logs.ring-lines",
                format!(
                    "{} is out of bounds: expected 1 to {}",
                    self.ring_lines,
                    Self::MAX_RING_LINES
                ),
            ));
        }
        rate(
            "logs.lines-per-second",
            self.lines_per_second,
            0.0,
            Self::MAX_RATE,
        )?;
        rate("logs.burst", self.burst, 1.0, Self::MAX_BURST)?;
        if self.persisted_lines > Self::MAX_PERSISTED_LINES {
            return Err(error(
                "logs.persisted-lines",
                format!(
                    "{} is out of bounds: expected 0 to {}",
                    self.persisted_lines,
                    Self::MAX_PERSISTED_LINES
                ),
            ));
        }
        if !LEVELS.contains(&self.level.as_str()) {
            return Err(error(
                "logs.level",
                format!(
                    "unknown level {:?}: use trace, debug, info, warn or error",
                    self.level
                ),
            ));
        }
        Ok(())
    }
}

impl ImageSection {
    fn check(&self) -> Result<(), ConfigError> {
        size(
            "images.max-unpacked",
            &self.max_unpacked,
            1,
            Self::MAX_BYTES,
        )?;
        size("images.max-file", &self.max_file, 1, Self::MAX_BYTES)?;
        count("images.max-entries", self.max_entries, Self::MAX_ENTRIES)?;
        count(
            "images.max-path",
            u64::try_from(self.max_path).unwrap_or(u64::MAX),
            u64::try_from(Self::MAX_PATH).unwrap_or(u64::MAX),
        )?;
        count(
            "images.max-depth",
            u64::try_from(self.max_depth).unwrap_or(u64::MAX),
            u64::try_from(Self::MAX_DEPTH).unwrap_or(u64::MAX),
        )?;
        if !["refuse", "strip", "keep"].contains(&self.setuid.as_str()) {
            return Err(error(
                "images.setuid",
                format!(
                    "unknown policy {:?}: use refuse, strip or keep",
                    self.setuid
                ),
            ));
        }
        Ok(())
    }
}

impl HubSection {
    fn check(&self) -> Result<(), ConfigError> {
        if self.url.is_empty() || self.url.len() > Self::MAX_URL_BYTES {
            return Err(error(
                "hub.url",
                format!(
                    "the url is {} bytes long: expected 1 to {}",
                    self.url.len(),
                    Self::MAX_URL_BYTES
                ),
            ));
        }
        lichen_sync::topics::validate_name("node", &self.node_id)
            .map_err(|e| error("hub.node-id", e.to_string()))?;
        for (key, path) in [
            ("hub.ca-file", &self.ca_file),
            ("hub.client-cert", &self.client_cert),
            ("hub.client-key", &self.client_key),
        ] {
            if let Some(path) = path {
                path_bytes(key, path)?;
            }
        }
        for (key, text) in [
            ("hub.username", &self.username),
            ("hub.password", &self.password),
        ] {
            if let Some(text) = text
                && text.len() > Self::MAX_CREDENTIAL_BYTES
            {
                return Err(error(
                    key,
                    format!(
                        "{} bytes long: at most {} are accepted",
                        text.len(),
                        Self::MAX_CREDENTIAL_BYTES
                    ),
                ));
            }
        }
        if self.trusted_keys.len() > Self::MAX_TRUSTED_KEYS {
            return Err(error(
                "hub.trusted-keys",
                format!(
                    "{} keys are too many: at most {} are accepted",
                    self.trusted_keys.len(),
                    Self::MAX_TRUSTED_KEYS
                ),
            ));
        }
        if let Some(index) = self
            .trusted_keys
            .iter()
            .position(|key| key.len() > Self::MAX_KEY_TEXT_BYTES)
        {
            return Err(error(
                &format!("hub.trusted-keys[{index}]"),
                format!(
                    "{} bytes long: a key is at most {} bytes of hex or base64",
                    self.trusted_keys[index].len(),
                    Self::MAX_KEY_TEXT_BYTES
                ),
            ));
        }
        size(
            "hub.outbox-quota",
            &self.outbox_quota,
            Self::MIN_OUTBOX_QUOTA,
            Self::MAX_OUTBOX_QUOTA,
        )?;
        Ok(())
    }
}

/// A size key within `min..=max`.
pub(super) fn size(key: &str, text: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let bytes = parse_size(text).map_err(|e| error(key, format!("{e:#}")))?;
    if !(min..=max).contains(&bytes) {
        return Err(error(
            key,
            format!(
                "{text:?} is out of bounds: expected {} to {}",
                show_bytes(min),
                show_bytes(max)
            ),
        ));
    }
    Ok(bytes)
}

/// A count key within `1..=max`.
fn count(key: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if !(1..=max).contains(&value) {
        return Err(error(
            key,
            format!("{value} is out of bounds: expected 1 to {max}"),
        ));
    }
    Ok(())
}

/// A rate key: finite, within `min..=max`.
fn rate(key: &str, value: f64, min: f64, max: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && (min..=max).contains(&value)) {
        return Err(error(
            key,
            format!("{value} is out of bounds: expected {min} to {max}"),
        ));
    }
    Ok(())
}

fn path_bytes(key: &str, path: &Path) -> Result<(), ConfigError> {
    let length = path.as_os_str().len();
    if length > AgentConfig::MAX_PATH_BYTES {
        return Err(error(
            key,
            format!(
                "the path is {length} bytes long: at most {} are accepted",
                AgentConfig::MAX_PATH_BYTES
            ),
        ));
    }
    Ok(())
}
