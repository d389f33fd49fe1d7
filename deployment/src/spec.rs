//! The validated form of a deployment: what the agent stores, compares and runs.
//!
//! These types are produced by [`parse`](super::parse) and are already checked; their serde form
//! is the canonical JSON the agent stores and compares to decide whether a workload changed. That
//! form is close to the file form but is not a second file format: durations are written by
//! `humantime` (`"1s 500ms"`), sizes in bytes, module paths already joined with the file's
//! directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A whole deployment: the desired set of workloads. An empty list means "run nothing".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeploymentSpec {
    /// Free text for humans; not used by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The workloads, in file order; names are unique; at most
    /// [`DeploymentSpec::MAX_WORKLOADS`].
    pub workloads: Vec<WorkloadSpec>,
}

impl DeploymentSpec {
    /// Largest deployment file or request text: 4 MiB. Checked before the text is parsed (and
    /// by `lichen deploy` before it is sent), so it also bounds every list and map in it.
    pub const MAX_TEXT_BYTES: usize = 4 << 20;
    /// Most workloads in one deployment.
    pub const MAX_WORKLOADS: usize = 4096;
    /// Longest `description`, in bytes.
    pub const MAX_DESCRIPTION_BYTES: usize = 4096;
}

/// One workload: what it runs (its [`Artifact`], one spec per kind) with its configuration,
/// triggers, limits, grants and restart policy.
///
/// Its serde form (the canonical JSON the agent stores, compares and hashes) is the flat one
/// written by `repr`: `kind` (left out for `wasm`), `module`,
/// `container`, `microvm`, `args` and `env` side by side, so stored specs read and write the
/// same bytes as before the artifact became an enum. Reading refuses a form whose parts do not
/// fit its kind (a `container` part on a `wasm` workload, a `wasm` workload without `module`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "repr::WorkloadRepr")]
pub struct WorkloadSpec {
    /// Unique name within the deployment: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// The isolation tier the file asks for; `None` means the kind's own tier.
    pub isolation: Option<IsolationChoice>,
    /// What runs: a Wasm module, a container image or a microVM kernel, each with its spec.
    pub artifact: Artifact,
    /// Configuration values handed to the module (`wasi:config`); numbers and booleans of the
    /// file are kept as their text.
    pub config: BTreeMap<String, String>,
    /// What makes the module run besides its start; at most one interval trigger.
    pub triggers: Vec<Trigger>,
    /// Resource limits; `None` means the agent's default.
    pub limits: Limits,
    /// What to do when the workload fails or ends.
    pub restart: RestartPolicy,
    /// GPIO pins the workload may use, by logical name; empty means none.
    pub gpio: Vec<GpioGrantSpec>,
    /// SPI devices the workload may use, by logical name; empty means none.
    pub spi: Vec<SpiGrantSpec>,
    /// I2C buses (and addresses on them) the workload may use, by logical name; empty means
    /// none.
    pub i2c: Vec<I2cGrantSpec>,
}

/// What a workload runs: one variant per kind, each with the spec only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// A Wasm component or WASI command module, run in the agent's engine.
    Wasm(WasmArtifact),
    /// An OCI image or a plain root filesystem with a command, run by an OCI runtime.
    Container(ContainerWorkload),
    /// A kernel with an initramfs or a root disk image, booted under QEMU.
    Microvm(MicrovmWorkload),
}

impl Artifact {
    /// The kind of this artifact.
    pub fn kind(&self) -> Tier {
        match self {
            Artifact::Wasm(_) => Tier::Wasm,
            Artifact::Container(_) => Tier::Container,
            Artifact::Microvm(_) => Tier::Microvm,
        }
    }
}

/// A `wasm` workload's module and, for a WASI command program, its arguments and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmArtifact {
    /// Where the Wasm module comes from.
    pub module: ModuleRef,
    /// Arguments after the program name of a WASI command program (a `wasi:cli/run`
    /// component or a preview-1 module): what a pod's container gives. Set through the agent's
    /// API (the `pods` source), not in deployment files; at most 1024 of 128KiB.
    pub args: Vec<String>,
    /// Environment variables of a WASI command program, beside the `LICHEN_<KEY>` variables
    /// of `config`. Set through the agent's API, not in deployment files; at most 256.
    pub env: BTreeMap<String, String>,
}

impl WasmArtifact {
    /// A module with no command arguments or environment (what deployment files give).
    pub fn module(module: ModuleRef) -> Self {
        WasmArtifact {
            module,
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }
}

impl WorkloadSpec {
    /// What the workload's artifact is; it decides which isolation tiers can run it.
    pub fn kind(&self) -> Tier {
        self.artifact.kind()
    }

    /// The Wasm part, for a `wasm` workload.
    pub fn wasm(&self) -> Option<&WasmArtifact> {
        match &self.artifact {
            Artifact::Wasm(wasm) => Some(wasm),
            _ => None,
        }
    }

    /// The module of a `wasm` workload.
    pub fn module(&self) -> Option<&ModuleRef> {
        self.wasm().map(|wasm| &wasm.module)
    }
}

impl WorkloadSpec {
    /// Longest workload or logical device name (`[a-z0-9][a-z0-9-]{0,62}`).
    pub const MAX_NAME_LEN: usize = 63;
    /// Longest file path (module, image, rootfs, kernel, initramfs, disk) after it is joined
    /// with the deployment file's directory, in bytes: Linux's `PATH_MAX`.
    pub const MAX_PATH_BYTES: usize = 4096;
    /// Most `config` entries of one workload.
    pub const MAX_CONFIG_ENTRIES: usize = 256;
    /// Longest `config` key, in bytes.
    pub const MAX_CONFIG_KEY_BYTES: usize = 256;
    /// Longest `config` value, in bytes.
    pub const MAX_CONFIG_VALUE_BYTES: usize = 64 << 10;
    /// Most triggers of one workload (one interval, and a `gpio-edge` trigger per input).
    pub const MAX_TRIGGERS: usize = 128;
    /// Most grants in each of a workload's `gpio`, `spi` and `i2c` lists.
    pub const MAX_GRANTS: usize = 64;
    /// Longest board resource name in a grant (`pin`, `bus`), in bytes.
    pub const MAX_RESOURCE_NAME_BYTES: usize = 64;
}

/// Direction of a granted GPIO pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpioMode {
    /// The workload drives the pin.
    Output,
    /// The workload reads the pin.
    Input,
}

/// A GPIO grant: `{ name = "led", pin = "GPIO17", mode = "output", initial = "low" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GpioGrantSpec {
    /// Logical name the guest asks for.
    pub name: String,
    /// The board profile's pin name.
    pub pin: String,
    /// Output or input.
    pub mode: GpioMode,
    /// Outputs: level driven at start and restored on stop, reload and crash (the safe state).
    #[serde(default)]
    pub initial: lichen_devices::Level,
    /// Inputs: pull resistor; `None` leaves it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<lichen_devices::Bias>,
    /// Inputs: which edges are reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<lichen_devices::EdgeDetection>,
    /// Inputs: how long a change must hold before it counts (at most
    /// [`GpioGrantSpec::MAX_DEBOUNCE`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub debounce: Option<Duration>,
}

impl GpioGrantSpec {
    /// Shortest debounce period (of a grant or a `gpio-edge` trigger).
    pub const MIN_DEBOUNCE: Duration = Duration::from_millis(1);
    /// Longest debounce period: 10 s (the kernel takes it in microseconds, as a `u32`).
    pub const MAX_DEBOUNCE: Duration = Duration::from_secs(10);
}

/// An SPI grant: `{ name = "adc", bus = "spi0.0", max-hz = 1000000 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SpiGrantSpec {
    /// Logical name the guest asks for.
    pub name: String,
    /// The board profile's SPI device name (`spi<bus>.<chip-select>`).
    pub bus: String,
    /// Highest clock in Hz (1 MHz when the file does not say; at most [`SpiGrantSpec::MAX_HZ`]).
    pub max_hz: u32,
}

impl SpiGrantSpec {
    /// Highest `max-hz`: 1 GHz, beyond any SPI controller's clock.
    pub const MAX_HZ: u32 = 1_000_000_000;
}

/// An I2C grant: `{ name = "env", bus = "i2c-1", addresses = [0x48] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct I2cGrantSpec {
    /// Logical name the guest asks for.
    pub name: String,
    /// The board profile's I2C bus name (`i2c-<n>`).
    pub bus: String,
    /// 7-bit target addresses the workload may talk to; empty means none.
    pub addresses: Vec<u16>,
}

/// An isolation tier, weakest first (the order `isolation = "strongest"` uses); also what a
/// workload's artifact is built for (its [`kind`](WorkloadSpec::kind), `kind = "..."` in
/// files), since each kind of artifact is named after the tier that runs it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// In the agent's Wasmtime engine: a Wasm component or WASI command module
    /// (`module = ...`).
    #[default]
    Wasm,
    /// In an OCI container through crun or runc: an OCI image or a plain root filesystem with
    /// a command (`image = ...` or `rootfs = ...`).
    Container,
    /// In a QEMU microVM: a kernel with an initramfs or a root disk image (`kernel = ...`).
    Microvm,
}

impl Tier {
    /// Every tier, weakest first.
    pub const ALL: [Tier; 3] = [Tier::Wasm, Tier::Container, Tier::Microvm];

    /// The tier's name in files, `ps` and `doctor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Wasm => "wasm",
            Tier::Container => "container",
            Tier::Microvm => "microvm",
        }
    }

    pub(crate) fn is_wasm(&self) -> bool {
        *self == Tier::Wasm
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The isolation a workload asks for (`isolation = "..."`): one tier by name, or the strongest
/// one that fits. Written as the tier's name or `"strongest"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsolationChoice {
    /// This tier (`"wasm"`, `"container"`, `"microvm"`).
    Tier(Tier),
    /// The strongest tier that the board offers, the host can run and the artifact can run
    /// in (the agent's `runtime::isolation` module has the rule).
    Strongest,
}

impl IsolationChoice {
    /// Every choice, in the order files list them.
    pub const ALL: [IsolationChoice; 4] = [
        IsolationChoice::Tier(Tier::Wasm),
        IsolationChoice::Tier(Tier::Container),
        IsolationChoice::Tier(Tier::Microvm),
        IsolationChoice::Strongest,
    ];

    /// The name used in files.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationChoice::Tier(tier) => tier.as_str(),
            IsolationChoice::Strongest => "strongest",
        }
    }
}

impl Serialize for IsolationChoice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IsolationChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        IsolationChoice::ALL
            .into_iter()
            .find(|choice| choice.as_str() == text)
            .ok_or_else(|| {
                serde::de::Error::unknown_variant(
                    &text,
                    &["wasm", "container", "microvm", "strongest"],
                )
            })
    }
}

/// A `container` workload's image, command and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ContainerWorkload {
    /// Where the root filesystem comes from.
    pub image: ImageRef,
    /// Replaces the image's entrypoint (`None`: the image's, which a plain rootfs lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's default arguments (`None`: the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables added to the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl ContainerWorkload {
    /// Most items in `command`, and in `args`.
    pub const MAX_ARGS: usize = 1024;
    /// Longest item of `command` or `args`, and longest `env` value, in bytes: Linux's
    /// `MAX_ARG_STRLEN`.
    pub const MAX_ARG_BYTES: usize = 128 << 10;
    /// Most `env` variables.
    pub const MAX_ENV: usize = 256;
    /// Longest `env` variable name, in bytes.
    pub const MAX_ENV_NAME_BYTES: usize = 256;
}

/// A `microvm` workload's kernel, root, vCPUs, command line and readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MicrovmWorkload {
    /// The guest kernel, already joined with the file's directory.
    pub kernel: PathBuf,
    /// What the kernel boots from besides itself.
    pub root: GuestRootRef,
    /// Virtual CPUs (1 when the file does not say; at most [`MicrovmWorkload::MAX_VCPUS`]).
    pub vcpus: u32,
    /// Extra kernel command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// The console text that means the guest is ready (`LICHEN-READY` when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_marker: Option<String>,
    /// How long the boot may take to print the marker (60 s when not given; at most
    /// [`MicrovmWorkload::MAX_BOOT_TIMEOUT`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub boot_timeout: Option<Duration>,
}

impl MicrovmWorkload {
    /// Most vCPUs of a microVM.
    pub const MAX_VCPUS: u32 = 64;
    /// Smallest guest memory (QEMU's firmware and a Linux kernel need it).
    pub const MIN_MEMORY_BYTES: u64 = 32 << 20;
    /// Longest extra kernel command line, in bytes (riscv64 kernels take 1024 in all).
    pub const MAX_CMDLINE_BYTES: usize = 1024;
    /// Longest ready marker, in bytes.
    pub const MAX_READY_MARKER_BYTES: usize = 256;
    /// Shortest boot timeout.
    pub const MIN_BOOT_TIMEOUT: Duration = Duration::from_millis(1);
    /// Longest boot timeout: one hour.
    pub const MAX_BOOT_TIMEOUT: Duration = Duration::from_secs(3600);
}

/// What a microVM's kernel boots from; paths already joined with the file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestRootRef {
    /// An initramfs (cpio, possibly compressed).
    Initramfs(PathBuf),
    /// A raw disk image, attached read-only as the root filesystem.
    Disk(PathBuf),
}

/// Where a container's root filesystem comes from; paths are already joined with the file's
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageRef {
    /// An OCI image layout: a directory holding `oci-layout` and `index.json`, or a tarball of
    /// one (`.tar`, `.tar.gz`, `.tgz`); imported into the agent's store by digest.
    Oci(PathBuf),
    /// A plain root filesystem directory, used in place (never written to).
    Rootfs(PathBuf),
}

/// A reference to a Wasm module: a file on disk or a digest in the artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleRef {
    /// A file path, already joined with the deployment file's directory.
    Path(PathBuf),
    /// A sha256 digest of the module bytes: 64 lowercase hexadecimal digits, without `sha256:`.
    Digest(String),
}

/// An event source that makes a workload run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// A timer tick every period ([`Trigger::MIN_INTERVAL`] to [`Trigger::MAX_INTERVAL`]);
    /// written `{ interval = "500ms" }`.
    Interval(#[serde(with = "duration_text")] Duration),
    /// An edge on a granted input pin; written
    /// `{ gpio-edge = "button", edge = "falling", debounce = "5ms" }`.
    GpioEdge(GpioEdgeTrigger),
}

impl Trigger {
    /// Shortest interval.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(1);
    /// Longest interval: one year (365.25 days, as `humantime` counts `1y`).
    pub const MAX_INTERVAL: Duration = Duration::from_secs(31_557_600);
}

/// A `gpio-edge` trigger: which input, which edges, and the debounce period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GpioEdgeTrigger {
    /// Logical name of an input pin of the workload's `gpio` grants.
    pub input: String,
    /// Which edges fire the trigger (`both` when the file does not say).
    pub edge: lichen_devices::EdgeDetection,
    /// A level change must hold this long before it counts (the grant's `debounce` when the
    /// trigger does not say).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub debounce: Option<Duration>,
}

impl WorkloadSpec {
    /// The `gpio-edge` trigger watching the input named `input`, if any.
    pub fn edge_trigger(&self, input: &str) -> Option<&GpioEdgeTrigger> {
        self.triggers.iter().find_map(|trigger| match trigger {
            Trigger::GpioEdge(edge) if edge.input == input => Some(edge),
            _ => None,
        })
    }
}

/// Per-workload resource limits; each `None` falls back to the agent's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Limits {
    /// Maximum memory in bytes ([`Limits::MIN_MEMORY_BYTES`] to [`Limits::MAX_MEMORY_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Maximum wall time one `init` or event call may run before it is preempted
    /// ([`Limits::MIN_TIME_SLICE`] to [`Limits::MAX_TIME_SLICE`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub time_slice: Option<Duration>,
    /// Maximum number of queued events (1 to [`Limits::MAX_QUEUE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    /// Containers: CPU quota in thousandths of a core (`cpus = 0.5` is 500;
    /// [`Limits::MIN_CPU_MILLIS`] to [`Limits::MAX_CPU_MILLIS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Containers: most processes and threads (1 to [`Limits::MAX_PIDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl Limits {
    /// Smallest `memory`: one WebAssembly page.
    pub const MIN_MEMORY_BYTES: u64 = 64 << 10;
    /// Largest `memory`: 1 TiB (a Wasm workload is further held to the engine's
    /// `wasm.max-memory`).
    pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
    /// Shortest `time-slice`.
    pub const MIN_TIME_SLICE: Duration = Duration::from_millis(1);
    /// Longest `time-slice`: one hour (a WASI command's whole run is one slice).
    pub const MAX_TIME_SLICE: Duration = Duration::from_secs(3600);
    /// Longest `queue`, in events.
    pub const MAX_QUEUE: usize = 4096;
    /// Smallest `cpus`, in thousandths of a core (0.01 cores).
    pub const MIN_CPU_MILLIS: u32 = 10;
    /// Largest `cpus`, in thousandths of a core (1024 cores).
    pub const MAX_CPU_MILLIS: u32 = 1_024_000;
    /// Largest `pids`: Linux's `PID_MAX_LIMIT` on 64-bit hosts.
    pub const MAX_PIDS: u32 = 4_194_304;
}

/// What the agent does when a workload's call fails or the workload ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whatever the reason it stopped.
    Always,
    /// Restart only after a failure (trap, error, exceeded limit).
    #[default]
    OnFailure,
    /// Never restart.
    Never,
}

/// The stored (serde) form of a [`WorkloadSpec`].
mod repr;

/// Serde helpers writing a [`Duration`] as `humantime` text, which parses back to the same value.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// [`duration_text`] for an optional duration.
mod optional_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.collect_str(&humantime::format_duration(*duration)),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}
