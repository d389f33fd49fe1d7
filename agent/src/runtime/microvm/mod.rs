//! The microVM runtime: `microvm` workloads boot their own kernel with an initramfs or root
//! disk under QEMU (`-M microvm` on x86_64, `-M virt` on arm64), with KVM when a trial boot
//! proved it works and TCG otherwise. The serial console is the workload's log; the boot time is
//! QEMU's start to the console line holding the ready marker; graceful stop is an ACPI power
//! button press through QMP.
//!
//! Lichen drives QEMU's command line and QMP; it does not implement a VMM of its own.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lichen_agent::runtime::microvm::MicrovmError> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use lichen_agent::runtime::microvm::{probe_cached, GuestRoot, MicrovmRuntime, MicrovmSpec};
//!
//! let host = probe_cached();
//! println!("{}", host.summary());
//! let runtime = MicrovmRuntime::new(host, "/run/lichen/microvm")?;
//! let spec = MicrovmSpec::new(
//!     "hello",
//!     "/srv/vm/vmlinuz",
//!     GuestRoot::Initramfs("/srv/vm/initrd.cpio.gz".into()),
//! );
//! let vm = runtime.start(&spec, Arc::new(|line| println!("{}", line.text))).await?;
//! match vm.wait_ready().await {
//!     Ok(boot) => println!("ready after {boot:?} under {}", vm.accelerator()),
//!     Err(reason) => println!("{reason}"),
//! }
//! println!("{}", vm.stop(Duration::from_secs(10)).await?);
//! # Ok(()) }
//! ```
//!
//! Layout, one concern per file: [`probe`] finds QEMU and tests KVM, `spec` is what a
//! workload asks for, `qemu` builds QEMU's command line, `qmp` talks QMP, `usage` reads QEMU's
//! memory, `runtime` starts, watches and stops microVMs.

mod probe;
mod qemu;
mod qmp;
mod runtime;
mod spec;
mod usage;
mod workload;

pub use probe::{KVM_TRIAL_TIMEOUT, KvmState, MicrovmProbe, QemuBinary, probe, probe_cached};
pub use qemu::{Accelerator, Machine, TCG_TSC_KHZ};
pub use runtime::{
    ExitReason, LogLine, LogSink, LogStream, Microvm, MicrovmRuntime, MicrovmStatus,
};
pub use spec::{GuestRoot, MAX_VCPUS, MIN_MEMORY_MIB, MicrovmSpec};
pub use usage::ResourceUsage;
pub use workload::{MicrovmTier, PreparedMicrovm};

use std::path::PathBuf;

/// What went wrong in the microVM runtime, naming the microVM, file or binary.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    /// The microVM's spec is unusable (bad name, size, marker or file).
    #[error("microvm {name:?}: {reason}")]
    InvalidSpec {
        /// The microVM's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This host cannot run microVMs at all.
    #[error("microVMs cannot run here: {reason}")]
    Unavailable {
        /// The missing piece (QEMU, architecture).
        reason: String,
    },
    /// A file or directory of the runtime could not be made or removed.
    #[error("microvm {name:?}: {path:?}: {source}")]
    Io {
        /// The microVM's name.
        name: String,
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// QEMU could not be run at all.
    #[error("microvm {name:?}: cannot run {qemu:?}: {source}")]
    Spawn {
        /// The microVM's name.
        name: String,
        /// The QEMU binary.
        qemu: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// QEMU did not exit even after SIGKILL.
    #[error("microvm {name:?}: QEMU (pid {pid}) is still running after SIGKILL")]
    Stuck {
        /// The microVM's name.
        name: String,
        /// QEMU's process id.
        pid: u32,
    },
}

#[cfg(test)]
mod tests;
