//! The agent's configuration file (TOML), with built-in defaults.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use lichen_host_apis::LogLevel;

use crate::logs::LogOptions;
use crate::runtime::wasm::EngineOptions;

/// The built-in configuration, used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = r#"# Lichen agent configuration (built-in defaults)
board = "sim"

[wasm]
max-instances = 1024     # live instances at once (hot reloads need two for a moment)
max-memory = "32MiB"     # largest linear memory of one instance; reserved per pool slot
memory-guard = "64KiB"   # guard after each memory; small guards mean explicit bounds checks

[logs]
ring-lines = 500         # lines kept in memory per workload
lines-per-second = 50    # average rate a workload may log
burst = 200              # lines above the average in a burst
persisted-lines = 1000   # lines kept in the state store per workload
level = "info"           # guest lines below this level are dropped: trace, debug, info, warn, error

# No [hub] section: the node runs offline. To sync with an MQTT hub (docs/topics.md):
# [hub]
# url = "mqtts://hub.example:8883"
# node-id = "pi-7"
# ca-file = "/etc/lichen/hub-ca.pem"
# trusted-keys = ["<ed25519 public key from `lichen hub keygen`, hex or base64>"]
# outbox-quota = "64MiB"
"#;

/// Agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// State directory; `--state-dir` overrides it.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Board profile name.
    #[serde(default = "default_board")]
    pub board: String,
    /// Wasm engine sizing.
    #[serde(default)]
    pub wasm: WasmSection,
    /// Guest log settings.
    #[serde(default)]
    pub logs: LogSection,
    /// The MQTT hub; without it the agent runs offline (no sync).
    #[serde(default)]
    pub hub: Option<HubSection>,
    /// A/B system updates (`lichen update`); only on boards built for them (images/build).
    #[serde(default)]
    pub update: Option<lichen_update::config::UpdateConfig>,
}

/// `[hub]`: where the hub is and whom to trust.
///
/// ```toml
/// [hub]
/// url = "mqtts://hub.example:8883"     # or mqtt://host:port (plain TCP, default port 1883)
/// node-id = "pi-7"                      # MQTT client id and <node> of every topic
/// ca-file = "/etc/lichen/hub-ca.pem"    # required for mqtts://
/// client-cert = "/etc/lichen/node.pem"  # mutual TLS (with client-key)
/// client-key = "/etc/lichen/node.key"
/// username = "pi-7"                     # optional, with password
/// password = "..."
/// trusted-keys = ["<ed25519 public key, 64 hex digits or base64>"]
/// outbox-quota = "64MiB"                # past it the oldest telemetry is dropped
/// insecure-dev = false                  # true: accept unsigned deployments (development only)
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HubSection {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub url: String,
    /// The node id.
    pub node_id: String,
    /// CA certificate(s) of the broker (PEM), for `mqtts://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The node's certificate chain (PEM), for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The node's private key (PEM), for mutual TLS.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// MQTT user name.
    #[serde(default)]
    pub username: Option<String>,
    /// MQTT password.
    #[serde(default)]
    pub password: Option<String>,
    /// Publisher public keys whose deployment signatures are trusted (ed25519, hex or base64).
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Outbox disk quota (`64MiB`).
    #[serde(default = "default_outbox_quota")]
    pub outbox_quota: String,
    /// Accept unsigned or wrongly signed deployments (development only; reported loudly).
    #[serde(default)]
    pub insecure_dev: bool,
}

fn default_outbox_quota() -> String {
    "64MiB".into()
}

fn default_board() -> String {
    "sim".into()
}

/// `[wasm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WasmSection {
    /// Live instances at once.
    pub max_instances: u32,
    /// Largest linear memory of one instance (`32MiB`).
    pub max_memory: String,
    /// Guard region after each memory (`64KiB`).
    pub memory_guard: String,
}

impl Default for WasmSection {
    fn default() -> Self {
        Self {
            max_instances: 1024,
            max_memory: "32MiB".into(),
            memory_guard: "64KiB".into(),
        }
    }
}

/// `[logs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogSection {
    /// Lines kept in memory per workload.
    pub ring_lines: usize,
    /// Average lines per second a workload may log.
    pub lines_per_second: f64,
    /// Burst above the average.
    pub burst: f64,
    /// Lines persisted per workload.
    pub persisted_lines: usize,
    /// Lowest level of guest lines kept (`trace`, `debug`, `info`, `warn`, `error`).
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            ring_lines: 500,
            lines_per_second: 50.0,
            burst: 200.0,
            persisted_lines: 1000,
            level: "info".into(),
        }
    }
}

impl AgentConfig {
    /// Reads a configuration file, or the built-in one when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (name, text) = match path {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?,
            ),
            None => ("built-in config".to_string(), DEFAULT_CONFIG.to_string()),
        };
        toml::from_str(&text).with_context(|| format!("invalid agent config in {name}"))
    }

    /// Engine sizing from `[wasm]`.
    pub fn engine_options(&self) -> Result<EngineOptions> {
        Ok(EngineOptions {
            max_instances: self.wasm.max_instances,
            max_memory_bytes: parse_size(&self.wasm.max_memory)
                .context("invalid wasm.max-memory in the agent config")?,
            memory_guard_bytes: parse_size(&self.wasm.memory_guard)
                .context("invalid wasm.memory-guard in the agent config")?,
        })
    }

    /// Log settings from `[logs]`.
    pub fn log_options(&self) -> Result<LogOptions> {
        let min_level = match self.logs.level.as_str() {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" => LogLevel::Warn,
            "error" => LogLevel::Error,
            other => anyhow::bail!(
                "invalid logs.level {other:?} in the agent config: use trace, debug, info, warn or error"
            ),
        };
        Ok(LogOptions {
            ring_lines: self.logs.ring_lines.max(1),
            lines_per_second: self.logs.lines_per_second,
            burst: self.logs.burst.max(1.0),
            min_level,
        })
    }
}

/// Parses `64KiB`, `32MiB`, `1GiB` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a size such as 64KiB, 32MiB or 1GiB"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => anyhow::bail!("unknown size unit {other:?} in {text:?}: use B, KiB, MiB or GiB"),
    };
    number
        .checked_mul(factor)
        .with_context(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_config_parses() {
        let config = AgentConfig::load(None).expect("built-in config is valid");
        let engine = config.engine_options().expect("sizes are valid");
        assert_eq!(engine.max_memory_bytes, 32 << 20);
        assert_eq!(engine.max_instances, 1024);
    }

    #[test]
    fn hub_section_parses_with_defaults_and_refuses_unknown_keys() {
        let config: AgentConfig =
            toml::from_str("[hub]\nurl = \"mqtt://127.0.0.1:1883\"\nnode-id = \"n1\"\n")
                .expect("minimal hub section");
        let hub = config.hub.expect("hub section present");
        assert_eq!(hub.outbox_quota, "64MiB");
        assert!(!hub.insecure_dev);
        assert!(hub.trusted_keys.is_empty());
        let err = toml::from_str::<AgentConfig>("[hub]\nurl = \"x\"\nnode-id = \"n\"\nnode = 1\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("node"), "{err}");
        assert!(AgentConfig::load(None).expect("built-in").hub.is_none());
    }

    #[test]
    fn sizes_parse_and_bad_units_are_named() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert!(format!("{:#}", parse_size("3MB").unwrap_err()).contains("\"MB\""));
    }
}
