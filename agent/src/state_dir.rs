//! The state directory: private to the agent's user (0700) and locked by one agent at a time.
//!
//! Two daemons on one state directory would both start every workload (opening the same
//! devices, running the same containers) and write one database. `lichen run` therefore takes
//! an exclusive `flock` on `<state-dir>/lock` before it opens anything, and exits with the
//! holder's pid if another agent has it. The lock goes with the process, however it ends.

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// The default state directory: `/var/lib/lichen` for root, else under the user's home.
pub fn default_state_dir() -> PathBuf {
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/lichen");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/lichen"),
        None => PathBuf::from("lichen-state"),
    }
}

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// The directory could not be created, inspected or made private.
    #[error("cannot prepare the state directory {}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The path names a shared directory such as `/tmp`.
    #[error(
        "{} is a shared directory (sticky bit set, like /tmp); give the agent a state \
         directory of its own",
        path.display()
    )]
    Shared {
        /// The directory.
        path: PathBuf,
    },
    /// Another agent holds the lock.
    #[error(
        "another lichen agent is running on the state directory {} ({}holds {}); stop it, or \
         give this one another --state-dir",
        path.display(),
        holder.map(|pid| format!("pid {pid} ")).unwrap_or_default(),
        path.join(LOCK_FILE).display()
    )]
    Locked {
        /// The directory.
        path: PathBuf,
        /// The pid the holder wrote into the lock file, if readable.
        holder: Option<u32>,
    },
}

/// Creates `path` (and missing parents) with mode 0700, or brings an existing directory of the
/// agent's to 0700; refuses a shared sticky directory such as `/tmp`.
pub fn create_private(path: &Path) -> Result<(), StateDirError> {
    let io = |source| StateDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io)?;
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o1000 != 0 {
        return Err(StateDirError::Shared {
            path: path.to_path_buf(),
        });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// A state directory this process has locked; the lock lasts as long as the value.
#[derive(Debug)]
pub struct LockedStateDir {
    path: PathBuf,
    _lock: File,
}

impl LockedStateDir {
    /// Creates the directory private (see [`create_private`]) and takes its lock without
    /// waiting; writes this process's pid into the lock file for the next one's message.
    pub fn lock(path: &Path) -> Result<Self, StateDirError> {
        create_private(path)?;
        let lock_path = path.join(LOCK_FILE);
        let io = |source| StateDirError::Io {
            path: lock_path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = (&file)
                    .take(32)
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(StateDirError::Locked {
                    path: path.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(LockedStateDir {
            path: path.to_path_buf(),
            _lock: file,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a").join("state");
        let first = LockedStateDir::lock(&state).expect("first lock");
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let lock_mode = std::fs::metadata(state.join(LOCK_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(lock_mode, 0o600);
        // flock locks belong to the open file: a second open in this process is refused too.
        let error = LockedStateDir::lock(&state).expect_err("held");
        let message = error.to_string();
        assert!(
            message.starts_with("another lichen agent is running on the state directory")
                && message.contains(&format!("pid {} holds", std::process::id())),
            "{message}"
        );
        drop(first);
        LockedStateDir::lock(&state).expect("free again");
    }

    #[test]
    fn an_existing_open_directory_is_made_private_and_tmp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let error = create_private(Path::new("/tmp")).expect_err("shared");
        assert!(error.to_string().contains("sticky bit"), "{error}");
    }
}
