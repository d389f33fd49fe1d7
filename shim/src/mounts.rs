//! Mounting the rootfs containerd's snapshotter prepared (`CreateTaskRequest.rootfs`) at
//! `<bundle>/rootfs`, and unmounting it when the task is deleted, as the runc shim does.
//!
//! Options are fstab words: the ones that are mount flags (`ro`, `nosuid`, `bind`, `rbind`...)
//! become flags, the rest (`lowerdir=...`, `upperdir=...`) the filesystem's data string.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

/// Most rootfs mounts in one request (containerd sends one).
pub const MAX_MOUNTS: usize = 8;
/// Longest mount data string: the kernel copies at most one page of it.
pub const MAX_MOUNT_DATA: usize = 4095;
/// Most stacked mounts removed from one rootfs on unmount.
const MAX_UNMOUNTS: usize = 16;

/// Why the rootfs could not be mounted or unmounted. Messages name the mount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Over [`MAX_MOUNTS`].
    #[error("rootfs: {0} mounts, at most {MAX_MOUNTS}")]
    TooMany(usize),
    /// A field cannot be passed to the kernel.
    #[error("rootfs mount {index} ({kind}): {message}")]
    Invalid {
        /// Position in the request.
        index: usize,
        /// The mount type.
        kind: String,
        /// What is wrong.
        message: String,
    },
    /// The kernel refused it.
    #[error("rootfs mount {index} ({kind} from {source_path}) at {target}: {errno}")]
    Mount {
        /// Position in the request.
        index: usize,
        /// The mount type.
        kind: String,
        /// The source.
        source_path: String,
        /// Where.
        target: PathBuf,
        /// The kernel's answer.
        errno: Errno,
    },
    /// Unmounting failed.
    #[error("cannot unmount {target}: {errno}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's answer.
        errno: Errno,
    },
}

/// Flags and data of one mount, split from its fstab options.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    flags: MountFlags,
    read_only: bool,
    data: String,
}

fn parse_options(options: &[String]) -> Parsed {
    let mut flags = MountFlags::empty();
    let mut read_only = false;
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => read_only = true,
            "rw" | "defaults" => {}
            "bind" => flags |= MountFlags::BIND,
            "rbind" => flags |= MountFlags::BIND | MountFlags::REC,
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "noatime" => flags |= MountFlags::NOATIME,
            "nodiratime" => flags |= MountFlags::NODIRATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "strictatime" => flags |= MountFlags::STRICTATIME,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            other => data.push(other),
        }
    }
    Parsed {
        flags,
        read_only,
        data: data.join(","),
    }
}

/// Mounts `mounts` in order at `target`. On failure, what was mounted is unmounted again.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(MountError::TooMany(mounts.len()));
    }
    for (index, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(index, m, target) {
            if index > 0 {
                let _ = unmount_rootfs(target);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn mount_one(index: usize, m: &Mount, target: &Path) -> Result<(), MountError> {
    let invalid = |message: String| MountError::Invalid {
        index,
        kind: m.type_.clone(),
        message,
    };
    let mut parsed = parse_options(&m.options);
    if m.type_ == "bind" || m.type_ == "rbind" {
        parsed.flags |= MountFlags::BIND;
    }
    if m.type_ == "rbind" {
        parsed.flags |= MountFlags::REC;
    }
    let bind = parsed.flags.contains(MountFlags::BIND);
    if parsed.data.len() > MAX_MOUNT_DATA {
        return Err(invalid(format!(
            "its options are {} bytes, more than the kernel takes ({MAX_MOUNT_DATA}): too many image layers",
            parsed.data.len()
        )));
    }
    let data = CString::new(parsed.data.clone())
        .map_err(|_| invalid("an option holds a NUL byte".into()))?;
    let fstype = if bind { "none" } else { m.type_.as_str() };
    let mut flags = parsed.flags;
    if parsed.read_only && !bind {
        flags |= MountFlags::RDONLY;
    }
    let failed = |errno| MountError::Mount {
        index,
        kind: m.type_.clone(),
        source_path: m.source.clone(),
        target: target.to_path_buf(),
        errno,
    };
    let data_arg = (!parsed.data.is_empty()).then_some(data.as_c_str());
    rustix::mount::mount(m.source.as_str(), target, fstype, flags, data_arg).map_err(failed)?;
    if bind && parsed.read_only {
        // A bind mount takes `ro` only on a remount.
        rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
            .map_err(failed)?;
    }
    Ok(())
}

/// Unmounts everything mounted at `target` (stacked mounts included). Not mounted is fine.
pub fn unmount_rootfs(target: &Path) -> Result<(), MountError> {
    for _ in 0..MAX_UNMOUNTS {
        match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
            Ok(()) => continue,
            // EINVAL: not a mount point (any more); ENOENT: no such directory.
            Err(Errno::INVAL) | Err(Errno::NOENT) => return Ok(()),
            Err(errno) => {
                return Err(MountError::Unmount {
                    target: target.to_path_buf(),
                    errno,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_words_split_into_flags_and_data() {
        let options: Vec<String> = ["ro", "rbind", "nosuid", "lowerdir=/a:/b", "index=off"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let parsed = parse_options(&options);
        assert!(parsed.read_only);
        assert_eq!(
            parsed.flags,
            MountFlags::BIND | MountFlags::REC | MountFlags::NOSUID
        );
        assert_eq!(parsed.data, "lowerdir=/a:/b,index=off");
    }

    #[test]
    fn overlong_options_are_refused_before_the_kernel_sees_them() {
        let target = tempfile::tempdir().unwrap();
        let mount = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![format!("lowerdir={}", "/l".repeat(3000))],
            ..Default::default()
        };
        let err = mount_rootfs(&[mount], target.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rootfs mount 0 (overlay)") && err.contains("too many image layers"),
            "{err}"
        );
        let many = vec![Mount::default(); MAX_MOUNTS + 1];
        let err = mount_rootfs(&many, target.path()).unwrap_err().to_string();
        assert!(err.contains("at most"), "{err}");
    }

    /// Needs root (CI runs as root, as containerd does): a real bind mount, read-only, and
    /// its unmount.
    #[test]
    fn bind_mount_read_only_then_unmount() {
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("app.wasm"), b"\0asm").unwrap();
        let target = tempfile::tempdir().unwrap();
        let mount = Mount {
            type_: "bind".into(),
            source: source.path().display().to_string(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        mount_rootfs(&[mount], target.path()).expect("bind mount (the test needs root)");
        assert_eq!(
            std::fs::read(target.path().join("app.wasm")).unwrap(),
            b"\0asm"
        );
        let write = std::fs::write(target.path().join("new"), b"x");
        unmount_rootfs(target.path()).unwrap();
        assert!(
            write.is_err(),
            "the ro option made the bind mount read-only"
        );
        assert!(!target.path().join("app.wasm").exists());
        // Unmounting what is not mounted is fine.
        unmount_rootfs(target.path()).unwrap();
    }
}
