//! The container runtime: `container` workloads run as OCI bundles through an OCI runtime
//! already on the board (crun preferred, runc accepted), with cgroup limits, a read-only
//! root, no network and only the device nodes their grants allow.
//!
//! Lichen writes the bundle (`config.json`, built with the `oci-spec` crate) and drives the
//! runtime's command line; it does not implement a runtime of its own.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lichen_agent::runtime::container::ContainerError> {
//! use std::sync::Arc;
//! use lichen_agent::runtime::container::{probe, ContainerRuntime, ContainerSpec};
//!
//! let host = probe();
//! let oci = host.usable_runtime().expect("crun or runc works here");
//! let runtime = ContainerRuntime::new(oci.clone(), host.cgroup.clone(), "/var/lib/lichen/containers");
//! let spec = ContainerSpec::new("hello", "/srv/rootfs", ["/bin/busybox", "echo", "hello"]);
//! let container = runtime.start(&spec, Arc::new(|line| println!("{}", line.text))).await?;
//! let exit = container.wait().await;
//! println!("{exit}");
//! # Ok(()) }
//! ```
//!
//! Layout, one concern per file as in youki: [`probe`] finds and tests the runtimes and the
//! cgroup layout, `cgroup` reads a container's counters, `spec` is what a workload asks for,
//! `bundle` turns that into an OCI bundle, `runtime` starts, watches and stops containers,
//! `image` imports OCI image layouts offline into a content-addressed store, reading them
//! through `blob` (regular files only, bounded) and applying layers through `layer` (inside a
//! directory handle no path can leave, with the operations of `confined`, within the
//! [`ImageLimits`] of `limits`), `workload` runs `container` workloads of a
//! deployment behind the common runtime traits (restart policy, logs, status).
//!
//! Built without the `containers` feature (the small node) only the host probe's cgroup half
//! and the image limits of the configuration are here: no OCI runtime is probed and nothing
//! can run a container.

#[cfg(feature = "containers")]
mod blob;
#[cfg(feature = "containers")]
mod bundle;
mod cgroup;
#[cfg(feature = "containers")]
mod confined;
#[cfg(feature = "containers")]
mod image;
#[cfg(feature = "containers")]
mod layer;
mod limits;
mod probe;
#[cfg(feature = "containers")]
mod runtime;
#[cfg(feature = "containers")]
mod spec;
#[cfg(feature = "containers")]
mod trial;
#[cfg(feature = "containers")]
mod workload;

#[cfg(feature = "containers")]
pub use blob::BlobError;
#[cfg(feature = "containers")]
pub use bundle::{Bundle, build_oci_spec};
pub use cgroup::{CgroupLayout, CgroupProbe};
#[cfg(feature = "containers")]
pub use image::{ImageConfig, ImageError, ImageStore, ImportedImage, MAX_LAYERS};
pub use limits::{ImageLimits, SetuidPolicy};
pub use probe::{HostProbe, OciRuntime, RuntimeCheck, RuntimeKind, probe, probe_cached};
#[cfg(feature = "containers")]
pub use runtime::{
    Container, ContainerRuntime, ContainerStatus, ExitReason, LogLine, LogSink, LogStream,
    ResourceUsage,
};
#[cfg(feature = "containers")]
pub use spec::{ContainerSpec, IdMapping, Limits};
#[cfg(feature = "containers")]
pub use workload::{ContainerTier, PreparedContainer, device_nodes, work_dir};

#[cfg(feature = "containers")]
use std::path::PathBuf;

/// What went wrong in the container runtime, naming the container, file or runtime.
#[cfg(feature = "containers")]
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container's spec is unusable (bad name, empty command, bad limit).
    #[error("container {name:?}: {reason}")]
    InvalidSpec {
        /// The container's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A device grant names something that is not a device node under `/dev`.
    #[error("container {name:?}: device grant {path:?}: {reason}")]
    Device {
        /// The container's name.
        name: String,
        /// The granted path.
        path: PathBuf,
        /// Why it cannot be granted.
        reason: String,
    },
    /// The bundle could not be written or removed.
    #[error("container {name:?}: bundle {path:?}: {source}")]
    Bundle {
        /// The container's name.
        name: String,
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The OCI spec types refused a value.
    #[error("container {name:?}: building the OCI spec: {source}")]
    Spec {
        /// The container's name.
        name: String,
        /// The error from `oci-spec`.
        source: oci_spec::OciSpecError,
    },
    /// The OCI runtime binary could not be run at all.
    #[error("container {name:?}: cannot run {runtime} {verb}: {source}")]
    Spawn {
        /// The container's name.
        name: String,
        /// The runtime binary (`crun`, `runc`).
        runtime: String,
        /// The verb (`run`, `kill`, `delete`).
        verb: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The OCI runtime ran and failed.
    #[error("container {name:?}: {runtime} {verb} failed: {message}")]
    Runtime {
        /// The container's name.
        name: String,
        /// The runtime binary (`crun`, `runc`).
        runtime: String,
        /// The verb (`run`, `kill`, `delete`).
        verb: &'static str,
        /// What the runtime printed.
        message: String,
    },
}
