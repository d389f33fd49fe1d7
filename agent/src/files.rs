//! Reading files named from outside the agent (deployment files, modules, kernels, the agent
//! config) safely: regular files only, opened without blocking, read with a size limit.
//!
//! A path in a deployment may name anything: `/dev/zero` (endless), a FIFO (a read that never
//! returns, holding up every deploy behind it), a symlink to a sparse 3 GiB file. So the path
//! is checked to be a regular file before it is opened (opening some devices has effects, such
//! as a serial port's DTR), opened with `O_NONBLOCK` (a FIFO swapped in after the check opens
//! without waiting for a writer), checked again on the open file, and read through a limit: a
//! file over its bound is refused before it is read, and one that grows while it is read is
//! cut off at the bound and refused.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be found, opened or read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's reason (shown in the message, so not a separate source).
        error: std::io::Error,
    },
    /// The path names a directory, a device, a FIFO or a socket.
    #[error("{} is {what}, not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead (`a FIFO`, `a character device`...).
        what: &'static str,
    },
    /// The file is larger than the bound for its use.
    #[error(
        "{} is {size} bytes, more than the {} ({max} bytes) accepted here",
        path.display(),
        show_bound(*max)
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least; a file that grows is cut off at `max + 1`).
        size: u64,
        /// The bound.
        max: u64,
    },
    /// A text file is not UTF-8.
    #[error("{} is not UTF-8 text", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
}

fn show_bound(max: u64) -> String {
    crate::deployment::show_bytes(max)
}

/// What a file type is, in words, when it is not a regular file.
fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// Opens a regular file for reading (following symlinks) without ever blocking or opening a
/// device, and returns it with its metadata.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), ReadError> {
    let io = |error| ReadError::Io {
        path: path.to_path_buf(),
        error,
    };
    let not_regular = |what| ReadError::NotRegular {
        path: path.to_path_buf(),
        what,
    };
    let before = std::fs::metadata(path).map_err(io)?;
    if let Some(what) = kind_of(&before) {
        return Err(not_regular(what));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if let Some(what) = kind_of(&meta) {
        return Err(not_regular(what));
    }
    Ok((file, meta))
}

/// Reads a whole regular file of at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open_regular(path)?;
    let too_large = |size| ReadError::TooLarge {
        path: path.to_path_buf(),
        size,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|error| ReadError::Io {
            path: path.to_path_buf(),
            error,
        })?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > max {
        return Err(too_large(read));
    }
    Ok(bytes)
}

/// Reads a whole regular UTF-8 text file of at most `max` bytes.
pub fn read_text_bounded(path: &Path, max: u64) -> Result<String, ReadError> {
    String::from_utf8(read_bounded(path, max)?).map_err(|_| ReadError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_read_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_bounded(&path, 5).unwrap(), b"12345");
        let error = read_bounded(&path, 4).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("is 5 bytes, more than the 4 bytes (4 bytes) accepted here"),
            "{error}"
        );
        assert_eq!(read_text_bounded(&path, 5).unwrap(), "12345");
    }

    #[test]
    fn devices_fifos_and_directories_are_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        // No writer ever opens the FIFO: a blocking open or read would hang this test.
        let error = read_bounded(&fifo, 1 << 20).unwrap_err();
        assert!(
            error.to_string().contains("is a FIFO, not a regular file"),
            "{error}"
        );
        let error = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is a character device, not a regular file"),
            "{error}"
        );
        let error = read_bounded(dir.path(), 1 << 20).unwrap_err();
        assert!(error.to_string().contains("is a directory"), "{error}");
        let link = dir.path().join("zero-link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let error = read_bounded(&link, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("a character device"), "{error}");
    }

    #[test]
    fn a_symlink_to_a_sparse_3_gib_file_is_refused_by_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        let file = File::create(&big).unwrap();
        file.set_len(3 << 30).unwrap();
        let link = dir.path().join("module.wasm");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        let error = read_bounded(&link, 128 << 20).unwrap_err();
        assert!(
            matches!(error, ReadError::TooLarge { size, .. } if size == 3 << 30),
            "{error}"
        );
        assert!(
            error.to_string().contains("more than the 128MiB"),
            "{error}"
        );
    }
}
