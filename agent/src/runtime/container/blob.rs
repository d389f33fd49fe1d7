//! Reading an OCI image layout without trusting it. Every file is opened beneath the layout
//! directory (a `cap_std::fs::Dir`: no symlink on the way may lead out of it), by a name that
//! must itself be a regular file (a symlink, FIFO or device there is refused before it is
//! opened), non-blocking and with `O_NOFOLLOW`, checked again with `fstat` once open, and read
//! up to a bound. Blobs are checked against their descriptor: the size first, then the sha256.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;
use oci_spec::image::Descriptor;
use rustix::fs::{Mode, OFlags};
use sha2::{Digest as _, Sha256};

/// What a file type is, for messages (`std` and `cap_std` have the same predicates).
macro_rules! file_kind {
    ($t:expr) => {{
        let t = $t;
        if t.is_symlink() {
            "a symbolic link"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device node"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a regular file"
        }
    }};
}
/// Largest index, manifest, configuration or `oci-layout` file read (4 MiB, the manifest size
/// registries must accept under the OCI distribution spec).
pub(super) const MAX_JSON_BYTES: u64 = 4 << 20;

/// What is wrong with a file of an image layout (a blob, `oci-layout`, `index.json`) or with
/// the image path given. Each message reads after the thing's name (`blob sha256:...: `).
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A digest of another algorithm, or malformed.
    #[error("unsupported digest {0:?}: only sha256 is accepted")]
    UnsupportedDigest(String),
    /// A top-level file larger than [`MAX_JSON_BYTES`].
    #[error("{name} is {len} bytes, over the bound of {MAX_JSON_BYTES}")]
    TopTooLarge {
        /// The file.
        name: String,
        /// Its size.
        len: u64,
    },
    /// A top-level file could not be read.
    #[error("cannot read {name}: {source}")]
    ReadTop {
        /// The file.
        name: String,
        /// The cause.
        source: io::Error,
    },
    /// The blob (or the path given) could not be read.
    #[error("cannot read it: {0}")]
    Read(#[source] io::Error),
    /// The blob changed size while being read.
    #[error("it shrank to {0} bytes while being read")]
    Shrank(u64),
    /// The descriptor's size is over the bound.
    #[error("its descriptor says {declared} bytes, over the bound of {max}")]
    DeclaredTooLarge {
        /// The descriptor's size.
        declared: u64,
        /// The bound.
        max: u64,
    },
    /// The file's size is not the descriptor's.
    #[error("it is {len} bytes but its descriptor says {declared}")]
    SizeMismatch {
        /// The file's size.
        len: u64,
        /// The descriptor's.
        declared: u64,
    },
    /// The content does not hash to the digest.
    #[error("its content does not match its digest (it hashes to sha256:{0})")]
    DigestMismatch(String),
    /// The name cannot be found under the layout (or leads out of it).
    #[error("cannot find {}: {}", .name.display(), reason(.source))]
    NotFound {
        /// The file, relative to the layout.
        name: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The name is not a regular file (its type given).
    #[error("{} is {kind}, not a regular file", .name.display())]
    NotRegular {
        /// The file, relative to the layout.
        name: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The directory holding the name cannot be opened.
    #[error("cannot open {}: {}", .name.display(), reason(.source))]
    OpenParent {
        /// The file, relative to the layout.
        name: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The path names a directory, not a file.
    #[error("{} names no file", .name.display())]
    NoFileName {
        /// The path.
        name: PathBuf,
    },
    /// The file cannot be opened.
    #[error("cannot open {}: {source}", .name.display())]
    Open {
        /// The file, relative to the layout.
        name: PathBuf,
        /// The cause.
        source: rustix::io::Errno,
    },
    /// The open file cannot be examined.
    #[error("cannot stat {}: {source}", .name.display())]
    Stat {
        /// The file, relative to the layout.
        name: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The name turned into something else than a regular file once open.
    #[error("{} is not a regular file", .name.display())]
    NotRegularOnceOpen {
        /// The file, relative to the layout.
        name: PathBuf,
    },
    /// The image path given is neither a directory nor a file (its type given).
    #[error("it is {0}, neither an OCI layout directory nor a tarball of one")]
    SourceKind(&'static str),
    /// The image directory given cannot be opened.
    #[error("cannot open the directory: {0}")]
    OpenSourceDir(#[source] io::Error),
    /// The image file given cannot be opened.
    #[error("cannot open it: {0}")]
    OpenSource(#[source] io::Error),
    /// The open image file cannot be examined.
    #[error("cannot stat it: {0}")]
    StatSource(#[source] io::Error),
    /// The image file given turned into something else than a regular file once open.
    #[error("it is not a regular file")]
    SourceNotRegular,
    /// Not an image manifest (JSON of the wrong shape).
    #[error("not an image manifest: {0}")]
    NotManifest(#[source] oci_spec::OciSpecError),
    /// Not an image index (JSON of the wrong shape).
    #[error("not an image index: {0}")]
    NotIndex(#[source] oci_spec::OciSpecError),
    /// Not an image configuration (JSON of the wrong shape).
    #[error("not an image configuration: {0}")]
    NotConfiguration(#[source] oci_spec::OciSpecError),
}

/// An image layout directory, opened.
pub(super) struct Layout {
    dir: Dir,
}

/// The hex sha256 of a descriptor's digest; other algorithms are refused.
pub(super) fn hex_of(desc: &Descriptor) -> Result<String, BlobError> {
    let text = desc.digest().to_string();
    match text.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        _ => Err(BlobError::UnsupportedDigest(text)),
    }
}

impl Layout {
    /// Opens the layout directory at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Layout {
            dir: Dir::open_ambient_dir(path, cap_std::ambient_authority())?,
        })
    }

    /// A small file at the top of the layout (`oci-layout`, `index.json`), read whole.
    pub fn read_top(&self, name: &str) -> Result<Vec<u8>, BlobError> {
        let (file, len) = open_regular(&self.dir, Path::new(name))?;
        if len > MAX_JSON_BYTES {
            return Err(BlobError::TopTooLarge {
                name: name.to_string(),
                len,
            });
        }
        read_at_most(file, MAX_JSON_BYTES).map_err(|source| BlobError::ReadTop {
            name: name.to_string(),
            source,
        })
    }

    /// A JSON blob (index, manifest, configuration), checked against its descriptor.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, BlobError> {
        let (file, len) = self.open_blob(desc, MAX_JSON_BYTES)?;
        let bytes = read_at_most(file, len).map_err(BlobError::Read)?;
        check_digest(desc, &Sha256::digest(&bytes))?;
        Ok(bytes)
    }

    /// A layer blob, checked against its descriptor's size (at most `max` bytes) and digest,
    /// returned open at its start.
    pub fn open_layer(&self, desc: &Descriptor, max: u64) -> Result<File, BlobError> {
        let (mut file, len) = self.open_blob(desc, max)?;
        let mut hasher = Sha256::new();
        let read = io::copy(&mut (&mut file).take(len), &mut hasher).map_err(BlobError::Read)?;
        if read != len {
            return Err(BlobError::Shrank(read));
        }
        check_digest(desc, &hasher.finalize())?;
        file.seek(SeekFrom::Start(0)).map_err(BlobError::Read)?;
        Ok(file)
    }

    /// `blobs/sha256/<hex>`, a regular file whose size is the descriptor's and at most `max`.
    fn open_blob(&self, desc: &Descriptor, max: u64) -> Result<(File, u64), BlobError> {
        let hex = hex_of(desc)?;
        let declared = desc.size();
        if declared > max {
            return Err(BlobError::DeclaredTooLarge { declared, max });
        }
        let (file, len) = open_regular(&self.dir, &Path::new("blobs/sha256").join(hex))?;
        if len != declared {
            return Err(BlobError::SizeMismatch { len, declared });
        }
        Ok((file, len))
    }
}

/// Opens `rel` under `dir` as a regular file: refused by type before opening (so a FIFO does
/// not block and a device is never opened), then opened without following a symlink at its
/// name, non-blocking, and checked again on the open file. Returns the file and its length.
pub(super) fn open_regular(dir: &Dir, rel: &Path) -> Result<(File, u64), BlobError> {
    use cap_std::fs::FileTypeExt as _;
    let name = || rel.to_path_buf();
    let meta = dir
        .symlink_metadata(rel)
        .map_err(|source| BlobError::NotFound {
            name: name(),
            source,
        })?;
    if !meta.is_file() {
        return Err(BlobError::NotRegular {
            name: name(),
            kind: file_kind!(meta.file_type()),
        });
    }
    let parent = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => dir.open_dir(p),
        None => dir.try_clone(),
    }
    .map_err(|source| BlobError::OpenParent {
        name: name(),
        source,
    })?;
    let last = rel
        .file_name()
        .ok_or_else(|| BlobError::NoFileName { name: name() })?;
    let fd = rustix::fs::openat(
        &parent,
        last,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| BlobError::Open {
        name: name(),
        source,
    })?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|source| BlobError::Stat {
        name: name(),
        source,
    })?;
    if !meta.is_file() {
        return Err(BlobError::NotRegularOnceOpen { name: name() });
    }
    Ok((file, meta.len()))
}

/// Opens a file named by the operator (an image tarball): symlinks in its path are the
/// operator's choice, but it must be a regular file, opened without blocking.
pub(super) fn open_source(path: &Path) -> Result<File, BlobError> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let meta = std::fs::metadata(path).map_err(BlobError::Read)?;
    if !meta.is_file() {
        return Err(BlobError::SourceKind(file_kind!(meta.file_type())));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags(OFlags::NONBLOCK | OFlags::NOCTTY))
        .open(path)
        .map_err(BlobError::OpenSource)?;
    let meta = file.metadata().map_err(BlobError::StatSource)?;
    if !meta.is_file() {
        return Err(BlobError::SourceNotRegular);
    }
    Ok(file)
}

fn libc_flags(flags: OFlags) -> i32 {
    i32::try_from(flags.bits()).expect("open flags fit an int")
}

fn check_digest(desc: &Descriptor, got: &[u8]) -> Result<(), BlobError> {
    let got = hex::encode(got);
    if got != hex_of(desc)? {
        return Err(BlobError::DigestMismatch(got));
    }
    Ok(())
}

/// Reads at most `max` bytes of `file`.
fn read_at_most(file: File, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn reason(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied && e.to_string().contains("led outside") {
        "the path leads out of the layout through a symlink or `..`".into()
    } else {
        e.to_string()
    }
}
