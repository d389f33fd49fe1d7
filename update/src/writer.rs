//! The slot writer: streams an image into the inactive slot while hashing it, flushes it,
//! reads it back from the device and hashes it again, and only then writes the slot trailer.
//!
//! The slot's trailer is zeroed first, so a write cut short (power loss) leaves a slot that
//! names no version; the boot state has marked the slot bad before this runs, so the boot
//! loader never tries it either.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::slot::{SlotTrailer, TRAILER_LEN, TRAILER_SIZE, device_size};

/// Bytes per write and per read-back read.
pub const CHUNK: usize = 1 << 20;
/// Alignment of O_DIRECT reads (covers 512- and 4096-byte logical blocks).
const ALIGN: usize = 4096;

/// What went wrong writing a slot.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// I/O on the device or the image failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The device.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image does not fit.
    #[error(
        "slot {path} holds {room} bytes of image (its last {TRAILER_SIZE} are the trailer); the image is {size}"
    )]
    NoRoom {
        /// The device.
        path: PathBuf,
        /// Bytes available for the image.
        room: u64,
        /// The image's size.
        size: u64,
    },
    /// The image source ended early.
    #[error("the image ended after {got} of its {size} bytes while writing {path}")]
    ShortImage {
        /// The device.
        path: PathBuf,
        /// Bytes read.
        got: u64,
        /// Bytes expected.
        size: u64,
    },
    /// A hash differs from the signed one.
    #[error("{stage}: sha256 {found}, expected {expected} (slot {path})")]
    Hash {
        /// Which pass (`written`, `read back`).
        stage: &'static str,
        /// The device.
        path: PathBuf,
        /// Expected.
        expected: String,
        /// Found.
        found: String,
    },
    /// The trailer did not read back.
    #[error("the trailer of slot {0} does not read back as written")]
    Trailer(PathBuf),
    /// The slot is the size of no slot.
    #[error(transparent)]
    Slot(#[from] crate::slot::SlotError),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Image bytes written.
    pub bytes: u64,
    /// Their sha256.
    pub sha256: String,
    /// Whether the read-back bypassed the page cache (O_DIRECT); a file system that refuses
    /// it (tmpfs) is read back through the cache.
    pub direct_read_back: bool,
    /// Time spent writing and flushing.
    pub write_time: Duration,
    /// Time spent reading back.
    pub verify_time: Duration,
}

/// Writes `size` bytes of `image` to the slot `device`, checks them against `sha256` as
/// written and as read back, then writes `trailer`. `progress` gets the bytes written so far.
pub fn write_slot(
    device: &Path,
    image: &mut dyn Read,
    size: u64,
    sha256: &str,
    trailer: &SlotTrailer,
    progress: &mut dyn FnMut(u64),
) -> Result<WriteReport, WriteError> {
    let io = |what, source| WriteError::Io {
        what,
        path: device.to_path_buf(),
        source,
    };
    let total = device_size(device)?;
    let room = total.saturating_sub(TRAILER_SIZE);
    if size > room {
        return Err(WriteError::NoRoom {
            path: device.to_path_buf(),
            room,
            size,
        });
    }
    let mut out = OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(|e| io("opening for writing", e))?;
    // 1. The trailer goes first: from here the slot names no version.
    out.write_all_at(&[0u8; TRAILER_LEN], room)
        .and_then(|()| out.sync_data())
        .map_err(|e| io("clearing the trailer of", e))?;

    // 2. The image, hashed as it goes.
    let started = Instant::now();
    out.seek(SeekFrom::Start(0)).map_err(|e| io("seeking", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    while written < size {
        let want = CHUNK.min(usize::try_from(size - written).unwrap_or(usize::MAX));
        let got = read_full(image, &mut buf[..want]).map_err(|e| io("reading the image for", e))?;
        if got < want {
            return Err(WriteError::ShortImage {
                path: device.to_path_buf(),
                got: written + got as u64,
                size,
            });
        }
        hasher.update(&buf[..got]);
        out.write_all(&buf[..got]).map_err(|e| io("writing", e))?;
        written += got as u64;
        progress(written);
    }
    out.sync_all().map_err(|e| io("flushing", e))?;
    let write_time = started.elapsed();
    let found = hex::encode(hasher.finalize());
    if found != sha256 {
        return Err(WriteError::Hash {
            stage: "the image as written",
            path: device.to_path_buf(),
            expected: sha256.to_string(),
            found,
        });
    }

    // 3. Read it back from the device, not from what the page cache remembers.
    let started = Instant::now();
    let (found, direct_read_back) = hash_back(device, size)?;
    let verify_time = started.elapsed();
    if found != sha256 {
        return Err(WriteError::Hash {
            stage: "the slot read back",
            path: device.to_path_buf(),
            expected: sha256.to_string(),
            found,
        });
    }

    // 4. The trailer, last.
    let block = trailer.render();
    out.write_all_at(&block, room)
        .and_then(|()| out.sync_all())
        .map_err(|e| io("writing the trailer of", e))?;
    if SlotTrailer::read(device)?.as_ref() != Some(trailer) {
        return Err(WriteError::Trailer(device.to_path_buf()));
    }
    Ok(WriteReport {
        bytes: size,
        sha256: sha256.to_string(),
        direct_read_back,
        write_time,
        verify_time,
    })
}

/// Hashes the first `size` bytes of `device`, with O_DIRECT where the device takes it.
fn hash_back(device: &Path, size: u64) -> Result<(String, bool), WriteError> {
    let io = |what, source| WriteError::Io {
        what,
        path: device.to_path_buf(),
        source,
    };
    let (mut file, direct) = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
    {
        Ok(file) => (file, true),
        Err(_) => (
            File::open(device).map_err(|e| io("opening to read back", e))?,
            false,
        ),
    };
    // An aligned window into a plain buffer: O_DIRECT needs aligned memory, sizes and offsets.
    let mut storage = vec![0u8; CHUNK + ALIGN];
    let offset = storage.as_ptr().align_offset(ALIGN);
    let buf = &mut storage[offset..offset + CHUNK];
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    while done < size {
        let need = CHUNK.min(usize::try_from(size - done).unwrap_or(usize::MAX));
        // Whole blocks: the slot extends past the image (its trailer at least).
        let read_len = need.div_ceil(ALIGN) * ALIGN;
        let got = match read_full(&mut file, &mut buf[..read_len]) {
            Ok(n) => n,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // The file system took the flag at open but not the read: read through the
                // cache instead.
                drop(file);
                return hash_back_cached(device, size);
            }
            Err(e) => return Err(io("reading back", e)),
        };
        if got < need {
            return Err(io(
                "reading back",
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the slot ended early"),
            ));
        }
        hasher.update(&buf[..need]);
        done += need as u64;
    }
    Ok((hex::encode(hasher.finalize()), direct))
}

fn hash_back_cached(device: &Path, size: u64) -> Result<(String, bool), WriteError> {
    let mut file = File::open(device).map_err(|source| WriteError::Io {
        what: "opening to read back",
        path: device.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < size {
        let need = CHUNK.min(usize::try_from(size - done).unwrap_or(usize::MAX));
        let got = read_full(&mut file, &mut buf[..need]).map_err(|source| WriteError::Io {
            what: "reading back",
            path: device.to_path_buf(),
            source,
        })?;
        if got < need {
            break;
        }
        hasher.update(&buf[..need]);
        done += need as u64;
    }
    Ok((hex::encode(hasher.finalize()), false))
}

/// Reads until `buf` is full or the source ends; returns the bytes read.
fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match source.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailer(size: u64, sha: &str) -> SlotTrailer {
        SlotTrailer {
            version: "2".into(),
            target: "x86_64".into(),
            size,
            sha256: sha.into(),
        }
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn an_image_is_written_read_back_and_named_by_its_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        std::fs::write(&slot, vec![0xeeu8; 4 << 20]).unwrap();
        let image: Vec<u8> = (0..(CHUNK * 2 + 12345))
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let digest = sha(&image);
        let mut seen = Vec::new();
        let report = write_slot(
            &slot,
            &mut image.as_slice(),
            image.len() as u64,
            &digest,
            &trailer(image.len() as u64, &digest),
            &mut |n| seen.push(n),
        )
        .unwrap();
        assert_eq!(report.bytes, image.len() as u64);
        assert_eq!(seen.last(), Some(&(image.len() as u64)));
        let bytes = std::fs::read(&slot).unwrap();
        assert_eq!(&bytes[..image.len()], image.as_slice());
        assert_eq!(bytes.len(), 4 << 20, "the slot keeps its size");
        assert_eq!(
            SlotTrailer::read(&slot).unwrap(),
            Some(trailer(image.len() as u64, &digest))
        );
    }

    #[test]
    fn a_short_or_wrong_image_leaves_the_slot_without_a_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        let mut old = vec![0u8; 1 << 20];
        let at = old.len() - TRAILER_LEN;
        old[at..].copy_from_slice(&trailer(1, &"0".repeat(64)).render());
        std::fs::write(&slot, &old).unwrap();
        let image = vec![7u8; 5000];
        let err = write_slot(
            &slot,
            &mut &image[..3000],
            5000,
            &sha(&image),
            &trailer(5000, &sha(&image)),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("3000 of its 5000"), "{err}");
        assert_eq!(
            SlotTrailer::read(&slot).unwrap(),
            None,
            "the old trailer is gone"
        );
        let err = write_slot(
            &slot,
            &mut image.as_slice(),
            5000,
            &"1".repeat(64),
            &trailer(5000, &"1".repeat(64)),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("as written") && err.contains("sha256"),
            "{err}"
        );
        assert_eq!(SlotTrailer::read(&slot).unwrap(), None);
    }

    #[test]
    fn an_image_larger_than_the_slot_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        std::fs::write(&slot, vec![1u8; 64 * 1024]).unwrap();
        let image = vec![0u8; 62 * 1024];
        let err = write_slot(
            &slot,
            &mut image.as_slice(),
            image.len() as u64,
            &sha(&image),
            &trailer(1, &sha(&image)),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("holds 61440 bytes"), "{err}");
        assert_eq!(
            std::fs::read(&slot).unwrap(),
            vec![1u8; 64 * 1024],
            "nothing written"
        );
    }
}
