//! What a microVM workload asks for: its kernel, its initramfs or root disk image, vCPUs,
//! memory, extra kernel command line, the console line that says it is ready and how long the
//! boot may take to print it.

use std::path::PathBuf;
use std::time::Duration;

use super::MicrovmError;

/// The smallest memory a Linux guest gets: less and QEMU's firmware or the kernel fails.
pub const MIN_MEMORY_MIB: u32 = 32;
/// The most vCPUs a microVM may ask for.
pub const MAX_VCPUS: u32 = 64;

/// What the guest boots from besides its kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRoot {
    /// An initramfs (cpio, possibly compressed) that the kernel unpacks and runs `/init` from.
    Initramfs(PathBuf),
    /// A raw disk image attached read-only as a virtio block device (`/dev/vda`) and mounted as
    /// the root filesystem (`root=/dev/vda ro`).
    Disk(PathBuf),
}

/// A microVM to run.
#[derive(Debug, Clone, PartialEq)]
pub struct MicrovmSpec {
    /// The workload's name: lowercase letters, digits, `-`, `_` and `.`, at most 64 characters.
    pub name: String,
    /// The guest kernel (`bzImage`/`vmlinuz` on x86_64, `Image` on arm64).
    pub kernel: PathBuf,
    /// The initramfs or root disk.
    pub root: GuestRoot,
    /// Virtual CPUs, 1 to 64.
    pub vcpus: u32,
    /// Guest memory in MiB, at least 32.
    pub memory_mib: u32,
    /// Extra kernel command line, appended after Lichen's console and panic settings.
    pub cmdline: String,
    /// The text whose appearance in a console line means the workload is ready.
    pub ready_marker: String,
    /// How long from QEMU's start the marker may take; after that the boot is failed and QEMU
    /// is killed.
    pub boot_timeout: Duration,
}

impl MicrovmSpec {
    /// A spec with 1 vCPU, 128 MiB, no extra command line, marker `LICHEN-READY` and a 60 s
    /// boot timeout (TCG boots a Debian kernel in ~5 s on an idle x86 core).
    pub fn new(name: &str, kernel: impl Into<PathBuf>, root: GuestRoot) -> Self {
        MicrovmSpec {
            name: name.to_string(),
            kernel: kernel.into(),
            root,
            vcpus: 1,
            memory_mib: 128,
            cmdline: String::new(),
            ready_marker: "LICHEN-READY".into(),
            boot_timeout: Duration::from_secs(60),
        }
    }

    /// Checks what can be checked without starting QEMU: the name, sizes, the marker, that the
    /// files are absolute paths to regular files, and that the command line has no newline.
    pub fn validate(&self) -> Result<(), MicrovmError> {
        let invalid = |reason: String| MicrovmError::InvalidSpec {
            name: self.name.clone(),
            reason,
        };
        crate::runtime::check_process_name(&self.name).map_err(|e| invalid(e.to_string()))?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "vcpus must be 1 to {MAX_VCPUS}, not {}",
                self.vcpus
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(format!(
                "memory must be at least {MIN_MEMORY_MIB} MiB, not {} MiB",
                self.memory_mib
            )));
        }
        if self.ready_marker.trim().is_empty() || self.ready_marker.contains('\n') {
            return Err(invalid(
                "the ready marker must be non-empty text on one line".into(),
            ));
        }
        if self.boot_timeout.is_zero() {
            return Err(invalid("the boot timeout must be more than 0 s".into()));
        }
        let longest = crate::deployment::MicrovmWorkload::MAX_BOOT_TIMEOUT;
        if self.boot_timeout > longest {
            return Err(invalid(format!(
                "the boot timeout must be at most {}, not {}",
                humantime::format_duration(longest),
                humantime::format_duration(self.boot_timeout)
            )));
        }
        if self.cmdline.contains(['\n', '\0']) {
            return Err(invalid(
                "the kernel command line must not contain a newline or NUL".into(),
            ));
        }
        let (what, root) = match &self.root {
            GuestRoot::Initramfs(path) => ("initramfs", path),
            GuestRoot::Disk(path) => ("root disk", path),
        };
        for (what, path) in [("kernel", &self.kernel), (what, root)] {
            if !path.is_absolute() {
                return Err(invalid(format!(
                    "the {what} {path:?} must be an absolute path"
                )));
            }
            // QEMU's -drive and -initrd options split at ','; refuse rather than mis-quote.
            if path.to_string_lossy().contains(',') {
                return Err(invalid(format!(
                    "the {what} path {path:?} contains ',', which QEMU's options cannot take"
                )));
            }
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => return Err(invalid(format!("the {what} {path:?} is not a file"))),
                Err(e) => return Err(invalid(format!("the {what} {path:?}: {e}"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_files() -> (tempfile::TempDir, MicrovmSpec) {
        let dir = tempfile::tempdir().expect("temp dir");
        let kernel = dir.path().join("vmlinuz");
        let initrd = dir.path().join("initrd");
        std::fs::write(&kernel, b"k").expect("write kernel");
        std::fs::write(&initrd, b"i").expect("write initrd");
        let spec = MicrovmSpec::new("vm-1", kernel, GuestRoot::Initramfs(initrd));
        (dir, spec)
    }

    #[test]
    fn a_good_spec_passes_and_each_bad_field_is_named() {
        let (dir, spec) = spec_with_files();
        spec.validate().expect("the default spec is valid");

        let cases: Vec<(MicrovmSpec, &str)> = vec![
            (
                MicrovmSpec {
                    name: "Bad Name".into(),
                    ..spec.clone()
                },
                "the name must be",
            ),
            (
                MicrovmSpec {
                    vcpus: 0,
                    ..spec.clone()
                },
                "vcpus must be 1 to 64, not 0",
            ),
            (
                MicrovmSpec {
                    memory_mib: 8,
                    ..spec.clone()
                },
                "at least 32 MiB, not 8 MiB",
            ),
            (
                MicrovmSpec {
                    ready_marker: " ".into(),
                    ..spec.clone()
                },
                "ready marker",
            ),
            (
                MicrovmSpec {
                    boot_timeout: Duration::ZERO,
                    ..spec.clone()
                },
                "boot timeout",
            ),
            (
                MicrovmSpec {
                    boot_timeout: Duration::MAX,
                    ..spec.clone()
                },
                "the boot timeout must be at most 1h",
            ),
            (
                MicrovmSpec {
                    cmdline: "a\nb".into(),
                    ..spec.clone()
                },
                "newline",
            ),
            (
                MicrovmSpec {
                    kernel: "vmlinuz".into(),
                    ..spec.clone()
                },
                "must be an absolute path",
            ),
            (
                MicrovmSpec {
                    kernel: dir.path().join("missing"),
                    ..spec.clone()
                },
                "the kernel",
            ),
            (
                MicrovmSpec {
                    root: GuestRoot::Disk(dir.path().to_path_buf()),
                    ..spec.clone()
                },
                "the root disk",
            ),
            (
                MicrovmSpec {
                    root: GuestRoot::Initramfs("/a,b".into()),
                    ..spec.clone()
                },
                "contains ','",
            ),
        ];
        for (bad, expected) in cases {
            let err = bad.validate().expect_err("invalid spec").to_string();
            assert!(
                err.starts_with(&format!("microvm {:?}: ", bad.name)),
                "{err}"
            );
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }
}
