//! Reading an OCI image layout without trusting it. Every file is opened beneath the layout
//! directory (a `cap_std::fs::Dir`: no symlink on the way may lead out of it), by a name that
//! must itself be a regular file (a symlink, FIFO or device there is refused before it is
//! opened), non-blocking and with `O_NOFOLLOW`, checked again with `fstat` once open, and read
//! up to a bound. Blobs are checked against their descriptor: the size first, then the sha256.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

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

/// An image layout directory, opened.
pub(super) struct Layout {
    dir: Dir,
}

/// The hex sha256 of a descriptor's digest; other algorithms are refused.
pub(super) fn hex_of(desc: &Descriptor) -> Result<String, String> {
    let text = desc.digest().to_string();
    match text.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        _ => Err(format!(
            "unsupported digest {text:?}: only sha256 is accepted"
        )),
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
    pub fn read_top(&self, name: &str) -> Result<Vec<u8>, String> {
        let (file, len) = open_regular(&self.dir, Path::new(name))?;
        if len > MAX_JSON_BYTES {
            return Err(format!(
                "{name} is {len} bytes, over the bound of {MAX_JSON_BYTES}"
            ));
        }
        read_at_most(file, MAX_JSON_BYTES).map_err(|e| format!("cannot read {name}: {e}"))
    }

    /// A JSON blob (index, manifest, configuration), checked against its descriptor.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, String> {
        let (file, len) = self.open_blob(desc, MAX_JSON_BYTES)?;
        let bytes = read_at_most(file, len).map_err(|e| format!("cannot read it: {e}"))?;
        check_digest(desc, &Sha256::digest(&bytes))?;
        Ok(bytes)
    }

    /// A layer blob, checked against its descriptor's size (at most `max` bytes) and digest,
    /// returned open at its start.
    pub fn open_layer(&self, desc: &Descriptor, max: u64) -> Result<File, String> {
        let (mut file, len) = self.open_blob(desc, max)?;
        let mut hasher = Sha256::new();
        let read = io::copy(&mut (&mut file).take(len), &mut hasher)
            .map_err(|e| format!("cannot read it: {e}"))?;
        if read != len {
            return Err(format!("it shrank to {read} bytes while being read"));
        }
        check_digest(desc, &hasher.finalize())?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| format!("cannot read it: {e}"))?;
        Ok(file)
    }

    /// `blobs/sha256/<hex>`, a regular file whose size is the descriptor's and at most `max`.
    fn open_blob(&self, desc: &Descriptor, max: u64) -> Result<(File, u64), String> {
        let hex = hex_of(desc)?;
        let declared = desc.size();
        if declared > max {
            return Err(format!(
                "its descriptor says {declared} bytes, over the bound of {max}"
            ));
        }
        let (file, len) = open_regular(&self.dir, &Path::new("blobs/sha256").join(hex))?;
        if len != declared {
            return Err(format!(
                "it is {len} bytes but its descriptor says {declared}"
            ));
        }
        Ok((file, len))
    }
}

/// Opens `rel` under `dir` as a regular file: refused by type before opening (so a FIFO does
/// not block and a device is never opened), then opened without following a symlink at its
/// name, non-blocking, and checked again on the open file. Returns the file and its length.
pub(super) fn open_regular(dir: &Dir, rel: &Path) -> Result<(File, u64), String> {
    use cap_std::fs::FileTypeExt as _;
    let name = rel.display();
    let meta = dir
        .symlink_metadata(rel)
        .map_err(|e| format!("cannot find {name}: {}", reason(&e)))?;
    if !meta.is_file() {
        return Err(format!(
            "{name} is {}, not a regular file",
            file_kind!(meta.file_type())
        ));
    }
    let parent = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => dir.open_dir(p),
        None => dir.try_clone(),
    }
    .map_err(|e| format!("cannot open {name}: {}", reason(&e)))?;
    let last = rel
        .file_name()
        .ok_or_else(|| format!("{name} names no file"))?;
    let fd = rustix::fs::openat(
        &parent,
        last,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open {name}: {e}"))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {name}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{name} is not a regular file"));
    }
    Ok((file, meta.len()))
}

/// Opens a file named by the operator (an image tarball): symlinks in its path are the
/// operator's choice, but it must be a regular file, opened without blocking.
pub(super) fn open_source(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "it is {}, neither an OCI layout directory nor a tarball of one",
            file_kind!(meta.file_type())
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags(OFlags::NONBLOCK | OFlags::NOCTTY))
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    Ok(file)
}

fn libc_flags(flags: OFlags) -> i32 {
    i32::try_from(flags.bits()).expect("open flags fit an int")
}

fn check_digest(desc: &Descriptor, got: &[u8]) -> Result<(), String> {
    let got = hex::encode(got);
    if got != hex_of(desc)? {
        return Err(format!(
            "its content does not match its digest (it hashes to sha256:{got})"
        ));
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
