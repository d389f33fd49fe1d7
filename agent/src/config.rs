//! The agent's configuration file (TOML), with built-in defaults.
//!
//! Every key is optional and has a default; every number, size and length has a bound, a
//! constant next to its field here, checked by [`AgentConfig::load`] with an error naming the
//! key and the bound ([`check`]). `docs/config.md` lists them all; `lichen run --print-config`
//! prints the effective configuration with the defaults filled in.

mod check;
mod kubeedge;
mod threads;

pub use check::ConfigError;
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
pub fn socket_path_ok(path: &Path) -> Result<(), ConfigError> {
    check::socket_path(lichen_shim::SOCKET_ENV, path)
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
mod tests;
