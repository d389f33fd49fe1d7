//! The agent's configuration file (TOML), with built-in defaults.
//!
//! Every key is optional and has a default; every number, size and length has a bound, a
//! constant next to its field here, checked by [`AgentConfig::load`] with an error naming the
//! key and the bound ([`check`]). `docs/config.md` lists them all; `lichen run --print-config`
//! prints the effective configuration with the defaults filled in.

mod check;
mod kubeedge;
mod threads;

pub use kubeedge::KubeEdgeSection;
/// Sizes in the agent config follow the deployment files' rule: `B`, `KiB`, `MiB`, `GiB`,
/// case-insensitive; `MB` and the like are refused as ambiguous.
pub use lichen_deployment::parse_size;
pub use threads::ThreadsSection;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use lichen_host_apis::LogLevel;

use crate::logs::LogOptions;
use crate::runtime::container::{ImageLimits, SetuidPolicy};
use crate::runtime::wasm::EngineOptions;

/// The built-in configuration, used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = r#"# Lichen agent configuration (built-in defaults)
board = "sim"

[wasm]
max-instances = 1024     # live instances at once (hot reloads need two for a moment)
max-memory = "32MiB"     # largest linear memory of one instance; reserved per pool slot
memory-guard = "64KiB"   # guard after each memory; small guards mean explicit bounds checks
table-elements = 20000   # largest function table of one instance (componentize-py needs ~13k)
core-instances-per-component = 32   # core modules one component may instantiate
tables-per-component = 8 # function tables one component may have

[threads]                # the async runtime (docs/config.md)
workers = 0              # worker threads, 1..64; 0: one per core, at most 2
worker-stack = "2MiB"    # stack of each runtime thread (address space; touched pages are memory)
max-blocking = 64        # threads for blocking work (file I/O, compiles), 1..512

[logs]
ring-lines = 500         # lines kept in memory per workload
lines-per-second = 50    # average rate a workload may log
burst = 200              # lines above the average in a burst
persisted-lines = 1000   # lines kept in the state store per workload
level = "info"           # guest lines below this level are dropped: trace, debug, info, warn, error

[images]                 # OCI images of container workloads (every key optional)
max-unpacked = "2GiB"    # bytes all layers of one image may write (1B..1TiB)
max-file = "1GiB"        # largest file in an image (1B..1TiB)
max-entries = 200000     # tar entries of all layers of one image (1..10000000)
max-path = 4096          # bytes of an entry's path or link target (1..65536)
max-depth = 128          # directories an entry's path may go down (1..1024)
setuid = "refuse"        # set-uid/set-gid files: "refuse" the image, "strip" the bits, "keep" them

[containerd]             # containerd's Task API for Wasm pods (runtime io.containerd.lichen.v1)
task-server = true       # serve it; false: pods cannot run on this node
task-socket = "/run/lichen/containerd-task.sock"  # LICHEN_TASK_SOCKET overrides it

# No [hub] section: the node runs offline. To sync with an MQTT hub (docs/topics.md):
# [hub]
# url = "mqtts://hub.example:8883"
# node-id = "pi-7"
# ca-file = "/etc/lichen/hub-ca.pem"
# trusted-keys = ["<ed25519 public key from `lichen hub keygen`, hex or base64>"]
# outbox-quota = "64MiB"
"#;

/// Agent configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// State directory (at most [`AgentConfig::MAX_PATH_BYTES`]); `--state-dir` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Board profile name: one of the built-in profiles (`boards/`).
    #[serde(default = "default_board")]
    pub board: String,
    /// Wasm engine sizing.
    #[serde(default)]
    pub wasm: WasmSection,
    /// The async runtime's threads.
    #[serde(default)]
    pub threads: ThreadsSection,
    /// Guest log settings.
    #[serde(default)]
    pub logs: LogSection,
    /// The MQTT hub; without it the agent runs offline (no sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubSection>,
    /// A/B system updates (`lichen update`); only on boards built for them (images/build).
    #[serde(default)]
    pub update: Option<lichen_update::config::UpdateConfig>,
    /// Bounds on OCI images.
    #[serde(default)]
    pub images: ImageSection,
    /// containerd's Task API server for Wasm pods.
    #[serde(default)]
    pub containerd: ContainerdSection,
    /// KubeEdge's device mapper; without it the agent is no KubeEdge mapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeedge: Option<KubeEdgeSection>,
}

impl AgentConfig {
    /// Largest configuration file: 1 MiB (read as a regular file, without blocking).
    pub const MAX_FILE_BYTES: u64 = 1 << 20;
    /// Longest path (`state-dir`, `hub.ca-file`, ...), in bytes: Linux's `PATH_MAX`.
    pub const MAX_PATH_BYTES: usize = 4096;
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HubSection {
    /// `mqtt://host[:port]` or `mqtts://host[:port]` (at most [`HubSection::MAX_URL_BYTES`]).
    pub url: String,
    /// The node id.
    pub node_id: String,
    /// CA certificate(s) of the broker (PEM), for `mqtts://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The node's certificate chain (PEM), for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// The node's private key (PEM), for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// MQTT user name (at most [`HubSection::MAX_CREDENTIAL_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password (at most [`HubSection::MAX_CREDENTIAL_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Publisher public keys whose deployment signatures are trusted (ed25519, hex or base64;
    /// at most [`HubSection::MAX_TRUSTED_KEYS`]).
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Outbox disk quota (`64MiB`; [`HubSection::MIN_OUTBOX_QUOTA`] to
    /// [`HubSection::MAX_OUTBOX_QUOTA`]).
    #[serde(default = "default_outbox_quota")]
    pub outbox_quota: String,
    /// Accept unsigned or wrongly signed deployments (development only; reported loudly).
    #[serde(default)]
    pub insecure_dev: bool,
}

impl HubSection {
    /// Longest `url`, in bytes.
    pub const MAX_URL_BYTES: usize = 2048;
    /// Longest `username` or `password`, in bytes (MQTT's own limit).
    pub const MAX_CREDENTIAL_BYTES: usize = 65_535;
    /// Most `trusted-keys`.
    pub const MAX_TRUSTED_KEYS: usize = 64;
    /// Longest trusted key text (a 32-byte key is 64 hex digits or 44 base64 characters).
    pub const MAX_KEY_TEXT_BYTES: usize = 256;
    /// Smallest `outbox-quota`.
    pub const MIN_OUTBOX_QUOTA: u64 = 1 << 10;
    /// Largest `outbox-quota`.
    pub const MAX_OUTBOX_QUOTA: u64 = 64 << 30;
}

fn default_outbox_quota() -> String {
    "64MiB".into()
}

fn default_board() -> String {
    "sim".into()
}

/// `[wasm]`; each key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct WasmSection {
    /// Live instances at once (1 to [`WasmSection::MAX_INSTANCES`]).
    pub max_instances: u32,
    /// Largest linear memory of one instance (`32MiB`; [`WasmSection::MIN_MEMORY`] to
    /// [`WasmSection::MAX_MEMORY`]).
    pub max_memory: String,
    /// Guard region after each memory (`64KiB`; at most [`WasmSection::MAX_GUARD`]).
    pub memory_guard: String,
    /// Elements of the largest table one instance may have (1 to
    /// [`WasmSection::MAX_TABLE_ELEMENTS`]).
    pub table_elements: u32,
    /// Core instances one component may create (1 to [`WasmSection::MAX_PER_COMPONENT`]).
    pub core_instances_per_component: u32,
    /// Tables one component may have (1 to [`WasmSection::MAX_PER_COMPONENT`]).
    pub tables_per_component: u32,
}

impl WasmSection {
    /// Most instance slots of the engine's pool.
    pub const MAX_INSTANCES: u32 = 16_384;
    /// Smallest `max-memory`: one WebAssembly page.
    pub const MIN_MEMORY: u64 = 64 << 10;
    /// Largest `max-memory`: a 32-bit linear memory's whole range.
    pub const MAX_MEMORY: u64 = 4 << 30;
    /// Largest `memory-guard`.
    pub const MAX_GUARD: u64 = 4 << 30;
    /// Largest `table-elements`: each table slot of the pool reserves 8 bytes of address
    /// space per element.
    pub const MAX_TABLE_ELEMENTS: u32 = 100_000;
    /// Largest `core-instances-per-component` and `tables-per-component`.
    pub const MAX_PER_COMPONENT: u32 = 256;
}

impl Default for WasmSection {
    fn default() -> Self {
        Self {
            max_instances: 1024,
            max_memory: "32MiB".into(),
            memory_guard: "64KiB".into(),
            table_elements: 20_000,
            core_instances_per_component: 32,
            tables_per_component: 8,
        }
    }
}

/// `[logs]`; each key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogSection {
    /// Lines kept in memory per workload (1 to [`LogSection::MAX_RING_LINES`]).
    pub ring_lines: usize,
    /// Average lines per second a workload may log (0 to [`LogSection::MAX_RATE`]).
    pub lines_per_second: f64,
    /// Burst above the average (1 to [`LogSection::MAX_BURST`]).
    pub burst: f64,
    /// Lines persisted per workload (0 to [`LogSection::MAX_PERSISTED_LINES`]).
    pub persisted_lines: usize,
    /// Lowest level of guest lines kept (`trace`, `debug`, `info`, `warn`, `error`).
    pub level: String,
}

impl LogSection {
    /// Most lines kept in memory per workload.
    pub const MAX_RING_LINES: usize = 10_000;
    /// Highest average rate, in lines per second.
    pub const MAX_RATE: f64 = 10_000.0;
    /// Largest burst, in lines.
    pub const MAX_BURST: f64 = 100_000.0;
    /// Most lines persisted per workload.
    pub const MAX_PERSISTED_LINES: usize = 100_000;
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

/// `[images]`: bounds on what one OCI image may unpack, and what to do with set-uid files;
/// each key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageSection {
    /// Bytes all layers of one image may write (`2GiB`; 1 B to [`ImageSection::MAX_BYTES`]).
    pub max_unpacked: String,
    /// Largest file in an image (`1GiB`; 1 B to [`ImageSection::MAX_BYTES`]).
    pub max_file: String,
    /// Tar entries of all layers of one image (1 to [`ImageSection::MAX_ENTRIES`]).
    pub max_entries: u64,
    /// Bytes of an entry's path or link target (1 to [`ImageSection::MAX_PATH`]).
    pub max_path: usize,
    /// Directories an entry's path may go down (1 to [`ImageSection::MAX_DEPTH`]).
    pub max_depth: usize,
    /// `refuse`, `strip` or `keep` set-uid and set-gid files.
    pub setuid: String,
}

impl ImageSection {
    /// Largest `max-unpacked` and `max-file`: 1 TiB.
    pub const MAX_BYTES: u64 = 1 << 40;
    /// Largest `max-entries`.
    pub const MAX_ENTRIES: u64 = 10_000_000;
    /// Largest `max-path`, in bytes.
    pub const MAX_PATH: usize = 65_536;
    /// Largest `max-depth`.
    pub const MAX_DEPTH: usize = 1024;
}

impl Default for ImageSection {
    fn default() -> Self {
        Self {
            max_unpacked: "2GiB".into(),
            max_file: "1GiB".into(),
            max_entries: 200_000,
            max_path: 4096,
            max_depth: 128,
            setuid: "refuse".into(),
        }
    }
}

/// `[containerd]`: the task server containerd's shim (`containerd-shim-lichen-v1`) sends
/// Wasm pods to; each key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ContainerdSection {
    /// Serve containerd's Task API (a bind failure is reported, not fatal).
    pub task_server: bool,
    /// The Unix socket (absolute, at most [`ContainerdSection::MAX_SOCKET_PATH_BYTES`]); the
    /// `LICHEN_TASK_SOCKET` environment variable overrides it.
    pub task_socket: PathBuf,
}

impl ContainerdSection {
    /// Longest `task-socket`, in bytes: a Unix socket address holds 107 bytes and a NUL.
    pub const MAX_SOCKET_PATH_BYTES: usize = 107;

    /// The socket to serve on: `LICHEN_TASK_SOCKET` if set and not empty, else `task-socket`.
    pub fn effective_socket(&self) -> PathBuf {
        std::env::var_os(lichen_shim::SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.task_socket.clone())
    }
}

/// Checks a task socket given by `LICHEN_TASK_SOCKET` as `containerd.task-socket` is checked.
pub fn socket_path_ok(path: &Path) -> Result<(), String> {
    check::socket_path(lichen_shim::SOCKET_ENV, path).map_err(|e| e.to_string())
}

impl Default for ContainerdSection {
    fn default() -> Self {
        Self {
            task_server: true,
            task_socket: PathBuf::from(lichen_shim::DEFAULT_SOCKET),
        }
    }
}

impl AgentConfig {
    /// Reads a configuration file (a regular file of at most
    /// [`MAX_FILE_BYTES`](Self::MAX_FILE_BYTES)), or the built-in one when `path` is `None`,
    /// and checks every key against its bound.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (name, text) = match path {
            Some(path) => (
                path.display().to_string(),
                crate::files::read_text_bounded(path, Self::MAX_FILE_BYTES)
                    .context("cannot read the agent config")?,
            ),
            None => ("built-in config".to_string(), DEFAULT_CONFIG.to_string()),
        };
        let config: AgentConfig =
            toml::from_str(&text).with_context(|| format!("invalid agent config in {name}"))?;
        config
            .check()
            .with_context(|| format!("invalid agent config in {name}"))?;
        Ok(config)
    }

    /// Engine sizing from `[wasm]`.
    pub fn engine_options(&self) -> Result<EngineOptions> {
        Ok(EngineOptions {
            max_instances: self.wasm.max_instances,
            max_memory_bytes: parse_size(&self.wasm.max_memory)
                .context("invalid wasm.max-memory in the agent config")?,
            memory_guard_bytes: parse_size(&self.wasm.memory_guard)
                .context("invalid wasm.memory-guard in the agent config")?,
            table_elements: self.wasm.table_elements,
            core_instances_per_component: self.wasm.core_instances_per_component,
            tables_per_component: self.wasm.tables_per_component,
        })
    }

    /// Image bounds from `[images]`, each checked against its own range.
    pub fn image_limits(&self) -> Result<ImageLimits> {
        let images = &self.images;
        let size = |key: &str, text: &str| -> Result<u64> {
            let bytes = parse_size(text)
                .with_context(|| format!("invalid images.{key} in the agent config"))?;
            in_range(key, bytes, 1, ImageSection::MAX_BYTES)
        };
        Ok(ImageLimits {
            max_unpacked_bytes: size("max-unpacked", &images.max_unpacked)?,
            max_file_bytes: size("max-file", &images.max_file)?,
            max_entries: in_range(
                "max-entries",
                images.max_entries,
                1,
                ImageSection::MAX_ENTRIES,
            )?,
            max_path_bytes: in_range("max-path", images.max_path, 1, ImageSection::MAX_PATH)?,
            max_depth: in_range("max-depth", images.max_depth, 1, ImageSection::MAX_DEPTH)?,
            setuid: match images.setuid.as_str() {
                "refuse" => SetuidPolicy::Refuse,
                "strip" => SetuidPolicy::Strip,
                "keep" => SetuidPolicy::Keep,
                other => anyhow::bail!(
                    "invalid images.setuid {other:?} in the agent config: use refuse, strip or keep"
                ),
            },
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

/// `value` if it lies in `min..=max`, else an error naming `images.KEY` and the range.
fn in_range<T: PartialOrd + std::fmt::Display>(key: &str, value: T, min: T, max: T) -> Result<T> {
    if value < min || value > max {
        anyhow::bail!("images.{key} = {value} in the agent config is out of range {min}..={max}");
    }
    Ok(value)
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

    /// Loads `text` as a config file, through the same path as `lichen run --config`.
    fn load_text(text: &str) -> Result<AgentConfig> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write config");
        AgentConfig::load(Some(&path))
    }

    #[test]
    fn each_wasm_and_logs_key_is_optional_on_its_own() {
        let config = load_text("[wasm]\nmax-instances = 8\n").expect("one key is enough");
        assert_eq!(config.wasm.max_instances, 8);
        assert_eq!(config.wasm.max_memory, "32MiB");
        assert_eq!(config.wasm.memory_guard, "64KiB");
        let config = load_text("[wasm]\nmax-memory = \"16MiB\"\n").expect("another one");
        assert_eq!(config.wasm.max_instances, 1024);
        assert_eq!(config.engine_options().unwrap().max_memory_bytes, 16 << 20);
        let config = load_text("[logs]\nlevel = \"debug\"\n").expect("logs too");
        assert_eq!(config.logs.ring_lines, 500);
        let empty = load_text("").expect("an empty file is the defaults");
        assert_eq!(empty, AgentConfig::load(None).unwrap());
    }

    #[test]
    fn every_key_out_of_its_bound_is_refused_naming_it() {
        let hub = "[hub]\nurl = \"mqtt://h\"\nnode-id = \"n\"\n";
        let cases: Vec<(String, &str, &str)> = vec![
            ("board = \"pi9\"".into(), "board", "unknown board \"pi9\""),
            (
                format!("state-dir = \"/{}\"", "d".repeat(4096)),
                "state-dir",
                "at most 4096",
            ),
            (
                "[wasm]\nmax-instances = 0".into(),
                "wasm.max-instances",
                "1 to 16384",
            ),
            (
                "[wasm]\nmax-instances = 16385".into(),
                "wasm.max-instances",
                "1 to 16384",
            ),
            (
                "[wasm]\nmax-memory = \"8GiB\"".into(),
                "wasm.max-memory",
                "64KiB to 4GiB",
            ),
            (
                "[wasm]\nmax-memory = \"1KiB\"".into(),
                "wasm.max-memory",
                "64KiB to 4GiB",
            ),
            (
                "[wasm]\nmemory-guard = \"5GiB\"".into(),
                "wasm.memory-guard",
                "0 bytes to 4GiB",
            ),
            (
                "[wasm]\ntable-elements = 0".into(),
                "wasm.table-elements",
                "1 to 100000",
            ),
            (
                "[wasm]\ntable-elements = 100001".into(),
                "wasm.table-elements",
                "1 to 100000",
            ),
            (
                "[wasm]\ncore-instances-per-component = 257".into(),
                "wasm.core-instances-per-component",
                "1 to 256",
            ),
            (
                "[wasm]\ntables-per-component = 0".into(),
                "wasm.tables-per-component",
                "1 to 256",
            ),
            (
                "[threads]\nworkers = 65".into(),
                "threads.workers",
                "0 (one per core) to 64",
            ),
            (
                "[threads]\nworker-stack = \"64KiB\"".into(),
                "threads.worker-stack",
                "256KiB to 16MiB",
            ),
            (
                "[threads]\nmax-blocking = 0".into(),
                "threads.max-blocking",
                "1 to 512",
            ),
            (
                "[logs]\nring-lines = 0".into(),
                "logs.ring-lines",
                "1 to 10000",
            ),
            (
                "[logs]\nring-lines = 10001".into(),
                "logs.ring-lines",
                "1 to 10000",
            ),
            (
                "[logs]\nlines-per-second = nan".into(),
                "logs.lines-per-second",
                "0 to 10000",
            ),
            (
                "[logs]\nlines-per-second = -1.0".into(),
                "logs.lines-per-second",
                "0 to 10000",
            ),
            ("[logs]\nburst = inf".into(), "logs.burst", "1 to 100000"),
            (
                "[logs]\npersisted-lines = 100001".into(),
                "logs.persisted-lines",
                "0 to 100000",
            ),
            (
                "[logs]\nlevel = \"loud\"".into(),
                "logs.level",
                "unknown level",
            ),
            (
                "[images]\nmax-entries = 0".into(),
                "images.max-entries",
                "1 to 10000000",
            ),
            (
                "[images]\nmax-unpacked = \"2048GiB\"".into(),
                "images.max-unpacked",
                "1 bytes to 1TiB",
            ),
            (
                "[images]\nsetuid = \"allow\"".into(),
                "images.setuid",
                "unknown policy",
            ),
            (
                format!("[containerd]\ntask-socket = \"/{}\"", "s".repeat(107)),
                "containerd.task-socket",
                "at most 107",
            ),
            (
                "[containerd]\ntask-socket = \"run/task.sock\"".into(),
                "containerd.task-socket",
                "not an absolute path",
            ),
            (hub.replace("mqtt://h", ""), "hub.url", "expected 1 to 2048"),
            (hub.replace("\"n\"", "\"a/b\""), "hub.node-id", "'/'"),
            (
                format!("{hub}outbox-quota = \"1023\""),
                "hub.outbox-quota",
                "1KiB to 64GiB",
            ),
            (
                format!("{hub}outbox-quota = \"65GiB\""),
                "hub.outbox-quota",
                "1KiB to 64GiB",
            ),
            (
                format!("{hub}trusted-keys = [{}]", vec!["\"k\""; 65].join(", ")),
                "hub.trusted-keys",
                "at most 64",
            ),
            (
                format!("{hub}trusted-keys = [\"{}\"]", "a".repeat(257)),
                "hub.trusted-keys[0]",
                "at most 256",
            ),
            (
                format!(
                    "{hub}username = \"u\"\npassword = \"{}\"",
                    "p".repeat(65_536)
                ),
                "hub.password",
                "at most 65535",
            ),
            (
                format!("{UPDATE}health-deadline = \"1s\"\n"),
                "update.health-deadline",
                "outside 10s to 24h",
            ),
            (
                format!("{UPDATE}reboot-command = {:?}\n", vec!["r"; 33]),
                "update.reboot-command",
                "at most 32",
            ),
            (
                format!("{UPDATE}trusted-keys = [\"{}\"]\n", "a".repeat(257)),
                "update.trusted-keys",
                "at most 256",
            ),
            (
                UPDATE.replace("/b/grubenv", &format!("/{}", "b".repeat(4096))),
                "update.boot-state",
                "expected 1 to 4096",
            ),
            (
                UPDATE.replace("grub", "uboot") + "env-size = 2097152\n",
                "update.env-size",
                "expected 64 to 1048576",
            ),
        ];
        for (text, key, words) in cases {
            let error = load_text(&text).expect_err(&text[..text.len().min(60)]);
            let message = format!("{error:#}");
            assert!(
                message.contains(&format!(": {key}: ")) && message.contains(words),
                "{key}: {message}"
            );
        }
    }

    /// A minimal `[update]` section (the keys without a default).
    const UPDATE: &str = "[update]\ntarget = \"x86_64\"\nboot = \"grub\"\nboot-state = [\"/b/grubenv\"]\n\
                          slots = { A = \"partlabel:rootfs-a\", B = \"partlabel:rootfs-b\" }\n";

    #[test]
    fn a_config_file_that_is_a_fifo_or_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, format!("# {}\n", "x".repeat(1 << 20))).unwrap();
        let message = format!("{:#}", AgentConfig::load(Some(&big)).unwrap_err());
        assert!(message.contains("more than the 1MiB"), "{message}");
        let message = format!(
            "{:#}",
            AgentConfig::load(Some(Path::new("/dev/zero"))).unwrap_err()
        );
        assert!(message.contains("not a regular file"), "{message}");
    }

    #[test]
    fn the_effective_config_has_every_key_and_reads_back_the_same() {
        let mut config = load_text(&format!(
            "[hub]\nurl = \"mqtt://h\"\nnode-id = \"n\"\nusername = \"u\"\npassword = \"secret\"\n{UPDATE}"
        ))
        .unwrap();
        let text = config.effective_toml(Path::new("/var/lib/lichen")).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let back: AgentConfig = toml::from_str(&text).expect("reads back");
        config.state_dir = Some(PathBuf::from("/var/lib/lichen"));
        if let Some(hub) = config.hub.as_mut() {
            hub.password = Some("<redacted>".into());
        }
        assert_eq!(back, config);
        for key in [
            "state-dir",
            "board",
            "[wasm]",
            "max-instances",
            "max-memory",
            "memory-guard",
            "table-elements",
            "core-instances-per-component",
            "tables-per-component",
            "[logs]",
            "ring-lines",
            "lines-per-second",
            "burst",
            "persisted-lines",
            "level",
            "[hub]",
            "url",
            "node-id",
            "trusted-keys",
            "outbox-quota",
            "insecure-dev",
            "[images]",
            "max-unpacked",
            "max-file",
            "max-entries",
            "max-path",
            "max-depth",
            "setuid",
            "[update]",
            "target",
            "boot-state",
            "health-deadline",
            "reboot-command",
            "system-file",
            "env-size",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
    }

    #[test]
    fn docs_config_md_documents_every_key() {
        let docs = include_str!("../../docs/config.md");
        let every = [
            "state-dir",
            "board",
            "max-instances",
            "max-memory",
            "memory-guard",
            "table-elements",
            "core-instances-per-component",
            "tables-per-component",
            "ring-lines",
            "lines-per-second",
            "burst",
            "persisted-lines",
            "level",
            "url",
            "node-id",
            "ca-file",
            "client-cert",
            "client-key",
            "username",
            "password",
            "trusted-keys",
            "outbox-quota",
            "insecure-dev",
            "max-unpacked",
            "max-file",
            "max-entries",
            "max-path",
            "max-depth",
            "setuid",
            "target",
            "boot",
            "boot-state",
            "slots",
            "health-deadline",
            "confirm-file",
            "reboot-command",
            "system-file",
            "cmdline",
            "sys-class-block",
            "dev-dir",
            "mounts",
            "env-size",
            "tryboot-partitions",
        ];
        for key in every {
            assert!(
                docs.contains(&format!("`{key}`")),
                "docs/config.md lacks `{key}`"
            );
        }
        // And nothing the config does not have: every key the docs table names parses.
        let full = "state-dir = \"/s\"\nboard = \"sim\"\n[wasm]\nmax-instances = 1\nmax-memory = \"64KiB\"\n\
                    memory-guard = \"0\"\ntable-elements = 1\ncore-instances-per-component = 1\n\
                    tables-per-component = 1\n[logs]\nring-lines = 1\nlines-per-second = 0.0\nburst = 1.0\n\
                    persisted-lines = 0\nlevel = \"info\"\n[hub]\nurl = \"mqtt://h\"\nnode-id = \"n\"\n\
                    ca-file = \"/c\"\nclient-cert = \"/c\"\nclient-key = \"/k\"\nusername = \"u\"\n\
                    password = \"p\"\ntrusted-keys = []\noutbox-quota = \"1KiB\"\ninsecure-dev = false\n\
                    [update]\ntarget = \"x\"\nboot = \"tryboot\"\nboot-state = [\"/a\"]\n\
                    slots = { A = \"/a\", B = \"/b\" }\ntrusted-keys = []\nhealth-deadline = \"10s\"\n\
                    confirm-file = \"/c\"\nreboot-command = [\"r\"]\nsystem-file = \"/s\"\ncmdline = \"/c\"\n\
                    sys-class-block = \"/s\"\ndev-dir = \"/d\"\nmounts = \"/m\"\nenv-size = 64\n\
                    tryboot-partitions = { A = 1, B = 2 }\n";
        load_text(full).expect("every documented key at its lower bound is accepted");
    }

    #[test]
    fn image_bounds_default_and_out_of_range_values_are_named() {
        let config = AgentConfig::load(None).expect("built-in");
        assert_eq!(
            config.image_limits().expect("defaults are valid"),
            ImageLimits::default()
        );
        let config: AgentConfig =
            toml::from_str("[images]\nmax-file = \"1MiB\"\nsetuid = \"strip\"\n").expect("parses");
        let limits = config.image_limits().expect("valid");
        assert_eq!(limits.max_file_bytes, 1 << 20);
        assert_eq!(limits.setuid, SetuidPolicy::Strip);
        assert_eq!(limits.max_entries, 200_000, "unset keys keep their default");
        for (text, named) in [
            ("max-entries = 0", "images.max-entries = 0"),
            ("max-depth = 5000", "images.max-depth = 5000"),
            ("max-unpacked = \"0\"", "images.max-unpacked"),
            ("setuid = \"allow\"", "images.setuid \"allow\""),
        ] {
            let config: AgentConfig =
                toml::from_str(&format!("[images]\n{text}\n")).expect("parses");
            let err = format!("{:#}", config.image_limits().expect_err(text));
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn sizes_parse_and_bad_units_are_named() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert!(format!("{:#}", parse_size("3MB").unwrap_err()).contains("\"MB\""));
    }
}
