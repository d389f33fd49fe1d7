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
    /// The workloads, in file order; names are unique.
    pub workloads: Vec<WorkloadSpec>,
}

/// One workload: a Wasm module (or, for `kind = "container"`, an OCI image or rootfs) with its
/// configuration, triggers, limits and restart policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WorkloadSpec {
    /// Unique name within the deployment: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// What the artifact is: a Wasm module (the default) or a container image.
    #[serde(default, skip_serializing_if = "WorkloadKind::is_wasm")]
    pub kind: WorkloadKind,
    /// The isolation tier the file asks for; `None` means the kind's own tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<IsolationChoice>,
    /// Where the Wasm module comes from (`wasm` workloads; `None` for the other kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleRef>,
    /// The image, command and environment of a `container` workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerWorkload>,
    /// The kernel, root and sizes of a `microvm` workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microvm: Option<MicrovmWorkload>,
    /// Configuration values handed to the module (`wasi:config`); numbers and booleans of the
    /// file are kept as their text.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// What makes the module run besides its start; at most one interval trigger.
    #[serde(default)]
    pub triggers: Vec<Trigger>,
    /// Resource limits; `None` means the agent's default.
    #[serde(default)]
    pub limits: Limits,
    /// What to do when the workload fails or ends.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// GPIO pins the workload may use, by logical name; empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpio: Vec<GpioGrantSpec>,
    /// SPI devices the workload may use, by logical name; empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spi: Vec<SpiGrantSpec>,
    /// I2C buses (and addresses on them) the workload may use, by logical name; empty means
    /// none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub i2c: Vec<I2cGrantSpec>,
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
    /// Inputs: how long a change must hold before it counts.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub debounce: Option<Duration>,
}

/// An SPI grant: `{ name = "adc", bus = "spi0.0", max-hz = 1000000 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SpiGrantSpec {
    /// Logical name the guest asks for.
    pub name: String,
    /// The board profile's SPI device name (`spi<bus>.<chip-select>`).
    pub bus: String,
    /// Highest clock in Hz (1 MHz when the file does not say).
    pub max_hz: u32,
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

/// What a workload's artifact is; it decides which isolation tiers can run it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// A Wasm component or WASI command module (`module = ...`).
    #[default]
    Wasm,
    /// An OCI image or a plain root filesystem with a command (`image = ...` or `rootfs = ...`).
    Container,
    /// A kernel with an initramfs or a root disk image, booted under QEMU (`kernel = ...`).
    Microvm,
}

impl WorkloadKind {
    /// The kind's name in files and `ps`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Wasm => "wasm",
            WorkloadKind::Container => "container",
            WorkloadKind::Microvm => "microvm",
        }
    }

    fn is_wasm(&self) -> bool {
        *self == WorkloadKind::Wasm
    }
}

/// The isolation a workload asks for (`isolation = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationChoice {
    /// In the agent's Wasmtime engine.
    Wasm,
    /// In an OCI container through crun or runc.
    Container,
    /// In a QEMU microVM.
    Microvm,
    /// The strongest tier that the board offers, the host can run and the artifact can run
    /// in (see `crate::runtime::isolation`).
    Strongest,
}

impl IsolationChoice {
    /// The name used in files.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationChoice::Wasm => "wasm",
            IsolationChoice::Container => "container",
            IsolationChoice::Microvm => "microvm",
            IsolationChoice::Strongest => "strongest",
        }
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

/// A `microvm` workload's kernel, root, vCPUs, command line and readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MicrovmWorkload {
    /// The guest kernel, already joined with the file's directory.
    pub kernel: PathBuf,
    /// What the kernel boots from besides itself.
    pub root: GuestRootRef,
    /// Virtual CPUs (1 when the file does not say).
    pub vcpus: u32,
    /// Extra kernel command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// The console text that means the guest is ready (`LICHEN-READY` when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_marker: Option<String>,
    /// How long the boot may take to print the marker (60 s when not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub boot_timeout: Option<Duration>,
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
    /// A timer tick every period (at least 1ms); written `{ interval = "500ms" }`.
    Interval(#[serde(with = "duration_text")] Duration),
    /// An edge on a granted input pin; written
    /// `{ gpio-edge = "button", edge = "falling", debounce = "5ms" }`.
    GpioEdge(GpioEdgeTrigger),
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
    /// Maximum linear memory in bytes (at least one 64KiB Wasm page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Maximum wall time one `init` or event call may run before it is preempted (at least 1ms).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration_text"
    )]
    pub time_slice: Option<Duration>,
    /// Maximum number of queued events (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    /// Containers: CPU quota in thousandths of a core (`cpus = 0.5` is 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Containers: most processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
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
