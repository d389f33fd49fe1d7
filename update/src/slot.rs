//! The two root slots, where their devices are, and the trailer that says what a slot holds.
//!
//! A slot is a partition holding a read-only root image (squashfs). Its last
//! [`TRAILER_SIZE`] bytes are the slot trailer, a small text block written after the image
//! has been written and read back:
//!
//! ```text
//! lichen-slot-v1
//! version=2
//! target=x86_64
//! size=31457280
//! sha256=<64 hex digits>
//! ```
//!
//! padded with NUL bytes. `images/build` writes it for both slots of a new disk; the slot
//! writer zeroes it before writing a slot and writes it last. So the agent can say which
//! version the other slot holds without mounting it, and a slot whose write was cut short
//! names no version.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Bytes at the end of a slot reserved for its trailer.
pub const TRAILER_SIZE: u64 = 4096;
/// [`TRAILER_SIZE`] as a buffer length.
pub(crate) const TRAILER_LEN: usize = 4096;
const _: () = assert!(TRAILER_LEN as u64 == TRAILER_SIZE);
/// First line of a trailer.
pub const TRAILER_MAGIC: &str = "lichen-slot-v1";
/// Longest version or target string (bundle manifests, trailers, system.json).
pub const MAX_NAME_LEN: usize = 64;

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// Slot A (`rootfs-a`).
    A,
    /// Slot B (`rootfs-b`).
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `"A"` or `"B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = SlotError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            other => Err(SlotError::BadSlotName(other.chars().take(16).collect())),
        }
    }
}

/// What can go wrong finding or reading a slot.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// A slot name that is not A or B.
    #[error("slot {0:?} is neither A nor B")]
    BadSlotName(String),
    /// The kernel command line names no slot.
    #[error(
        "{path} names no booted slot (lichen.slot=A|B or rauc.slot=A|B, set by the boot loader)"
    )]
    NoBootedSlot {
        /// The command line file read.
        path: PathBuf,
    },
    /// A device spec that is neither `partlabel:NAME` nor a path.
    #[error("slot device {0:?} is neither partlabel:NAME nor an absolute path")]
    BadDeviceSpec(String),
    /// No partition carries the label.
    #[error("no block device has the GPT partition name {0:?} (looked in {1})")]
    NoSuchPartition(String, PathBuf),
    /// Reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The slot is too small to hold a trailer.
    #[error("slot device {0} is {1} bytes, too small for a root image and its trailer")]
    TooSmall(PathBuf, u64),
}

/// The kernel command line's booted slot: `lichen.slot=A` (our boot scripts) or
/// `rauc.slot=A` (RAUC's convention, so RAUC-style scripts can be adopted).
pub fn booted_slot(cmdline_path: &Path) -> Result<Slot, SlotError> {
    let mut text = String::new();
    File::open(cmdline_path)
        .and_then(|f| {
            if !f.metadata()?.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            f.take(64 * 1024).read_to_string(&mut text)
        })
        .map_err(|source| SlotError::Io {
            what: "reading",
            path: cmdline_path.to_path_buf(),
            source,
        })?;
    for word in text.split_whitespace() {
        if let Some(value) = word
            .strip_prefix("lichen.slot=")
            .or_else(|| word.strip_prefix("rauc.slot="))
        {
            return value.parse();
        }
    }
    Err(SlotError::NoBootedSlot {
        path: cmdline_path.to_path_buf(),
    })
}

/// Finds the device of a slot: `partlabel:NAME` is looked up among the GPT partition names the
/// kernel lists under `sys_class_block` (`/sys/class/block/*/uevent`, `PARTNAME=`), and gives
/// `dev_dir/<DEVNAME>`; an absolute path is taken as it is.
pub fn resolve_device(
    spec: &str,
    sys_class_block: &Path,
    dev_dir: &Path,
) -> Result<PathBuf, SlotError> {
    if let Some(label) = spec.strip_prefix("partlabel:") {
        let entries = std::fs::read_dir(sys_class_block).map_err(|source| SlotError::Io {
            what: "listing",
            path: sys_class_block.to_path_buf(),
            source,
        })?;
        let mut names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        for dir in names {
            let mut text = String::new();
            let Ok(file) = File::open(dir.join("uevent")) else {
                continue;
            };
            if file.take(8192).read_to_string(&mut text).is_err() {
                continue;
            }
            let mut devname = None;
            let mut partname = None;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("DEVNAME=") {
                    devname = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("PARTNAME=") {
                    partname = Some(v.to_string());
                }
            }
            if partname.as_deref() == Some(label)
                && let Some(devname) = devname
                && !devname.contains('/')
                && !devname.starts_with('.')
            {
                return Ok(dev_dir.join(devname));
            }
        }
        return Err(SlotError::NoSuchPartition(
            label.to_string(),
            sys_class_block.to_path_buf(),
        ));
    }
    if spec.starts_with('/') {
        return Ok(PathBuf::from(spec));
    }
    Err(SlotError::BadDeviceSpec(spec.chars().take(64).collect()))
}

/// The size of a slot device or file in bytes (by seeking to its end, which works for block
/// devices as for files).
pub fn device_size(path: &Path) -> Result<u64, SlotError> {
    let mut file = File::open(path).map_err(|source| SlotError::Io {
        what: "opening",
        path: path.to_path_buf(),
        source,
    })?;
    file.seek(SeekFrom::End(0)).map_err(|source| SlotError::Io {
        what: "finding the size of",
        path: path.to_path_buf(),
        source,
    })
}

/// What a slot's trailer says it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotTrailer {
    /// The system version of the image.
    pub version: String,
    /// The target it was built for.
    pub target: String,
    /// The image's size in bytes.
    pub size: u64,
    /// The image's sha256, 64 lowercase hex digits.
    pub sha256: String,
}

impl SlotTrailer {
    /// The trailer's bytes: [`TRAILER_SIZE`] of them.
    pub fn render(&self) -> Vec<u8> {
        let mut bytes = format!(
            "{TRAILER_MAGIC}\nversion={}\ntarget={}\nsize={}\nsha256={}\n",
            self.version, self.target, self.size, self.sha256
        )
        .into_bytes();
        bytes.resize(TRAILER_LEN, 0);
        bytes
    }

    /// Parses a trailer block; `None` when it is not one (zeroed, cut short, garbage).
    pub fn parse(block: &[u8]) -> Option<SlotTrailer> {
        let end = block.iter().position(|&b| b == 0).unwrap_or(block.len());
        let text = std::str::from_utf8(&block[..end]).ok()?;
        let mut lines = text.lines();
        if lines.next()? != TRAILER_MAGIC {
            return None;
        }
        let (mut version, mut target, mut size, mut sha256) = (None, None, None, None);
        for line in lines {
            let (key, value) = line.split_once('=')?;
            match key {
                "version" => version = Some(value.to_string()),
                "target" => target = Some(value.to_string()),
                "size" => size = value.parse::<u64>().ok(),
                "sha256" => sha256 = Some(value.to_string()),
                _ => {}
            }
        }
        let trailer = SlotTrailer {
            version: version?,
            target: target?,
            size: size?,
            sha256: sha256?,
        };
        (valid_name(&trailer.version)
            && valid_name(&trailer.target)
            && is_sha256_hex(&trailer.sha256))
        .then_some(trailer)
    }

    /// Reads the trailer of the slot at `path`; `Ok(None)` when the slot has none.
    pub fn read(path: &Path) -> Result<Option<SlotTrailer>, SlotError> {
        let size = device_size(path)?;
        if size < TRAILER_SIZE {
            return Err(SlotError::TooSmall(path.to_path_buf(), size));
        }
        let mut file = File::open(path).map_err(|source| SlotError::Io {
            what: "opening",
            path: path.to_path_buf(),
            source,
        })?;
        let mut block = vec![0u8; TRAILER_LEN];
        file.seek(SeekFrom::Start(size - TRAILER_SIZE))
            .and_then(|_| file.read_exact(&mut block))
            .map_err(|source| SlotError::Io {
                what: "reading the trailer of",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(SlotTrailer::parse(&block))
    }
}

/// Whether `text` is a valid version or target: 1-64 ASCII letters, digits and `._+-`,
/// starting with a letter or digit.
pub fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// Whether `text` is 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_parse_and_pair() {
        assert_eq!("A".parse::<Slot>().unwrap(), Slot::A);
        assert_eq!("b".parse::<Slot>().unwrap(), Slot::B);
        assert_eq!(Slot::A.other(), Slot::B);
        let err = "C".parse::<Slot>().unwrap_err().to_string();
        assert!(err.contains("\"C\""), "{err}");
    }

    #[test]
    fn the_booted_slot_comes_from_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmdline");
        std::fs::write(
            &path,
            "console=ttyS0 lichen.slot=B lichen.root=rootfs-b quiet\n",
        )
        .unwrap();
        assert_eq!(booted_slot(&path).unwrap(), Slot::B);
        std::fs::write(&path, "root=/dev/mmcblk0p2 rauc.slot=A\n").unwrap();
        assert_eq!(booted_slot(&path).unwrap(), Slot::A);
        std::fs::write(&path, "console=ttyS0\n").unwrap();
        let err = booted_slot(&path).unwrap_err().to_string();
        assert!(err.contains("lichen.slot="), "{err}");
        std::fs::write(&path, "lichen.slot=Z\n").unwrap();
        assert!(
            booted_slot(&path)
                .unwrap_err()
                .to_string()
                .contains("\"Z\"")
        );
    }

    #[test]
    fn partition_labels_resolve_through_uevent_files() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        for (name, uevent) in [
            ("vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n"),
            (
                "vda2",
                "MAJOR=254\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=rootfs-a\n",
            ),
            (
                "vda3",
                "MAJOR=254\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME=rootfs-b\n",
            ),
            ("evil", "DEVNAME=../etc/passwd\nPARTNAME=evil\n"),
        ] {
            std::fs::create_dir_all(sys.join(name)).unwrap();
            std::fs::write(sys.join(name).join("uevent"), uevent).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            resolve_device("partlabel:rootfs-b", &sys, dev).unwrap(),
            PathBuf::from("/dev/vda3")
        );
        assert_eq!(
            resolve_device("/dev/mmcblk0p3", &sys, dev).unwrap(),
            PathBuf::from("/dev/mmcblk0p3")
        );
        let err = resolve_device("partlabel:rootfs-c", &sys, dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"rootfs-c\""), "{err}");
        assert!(resolve_device("partlabel:evil", &sys, dev).is_err());
        let err = resolve_device("vda3", &sys, dev).unwrap_err().to_string();
        assert!(err.contains("partlabel:NAME"), "{err}");
    }

    #[test]
    fn trailers_round_trip_and_garbage_is_none() {
        let trailer = SlotTrailer {
            version: "2.1".into(),
            target: "x86_64".into(),
            size: 31_457_280,
            sha256: "ab".repeat(32),
        };
        let bytes = trailer.render();
        assert_eq!(bytes.len() as u64, TRAILER_SIZE);
        assert_eq!(SlotTrailer::parse(&bytes), Some(trailer.clone()));
        assert_eq!(SlotTrailer::parse(&[0u8; 4096]), None);
        let mut cut = bytes.clone();
        cut[40..].fill(0);
        assert_eq!(SlotTrailer::parse(&cut), None);
        let bad = SlotTrailer {
            version: "../x".into(),
            ..trailer
        };
        assert_eq!(SlotTrailer::parse(&bad.render()), None);
    }

    #[test]
    fn a_trailer_is_read_from_the_end_of_a_slot() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        let trailer = SlotTrailer {
            version: "7".into(),
            target: "arm64".into(),
            size: 10,
            sha256: "0".repeat(64),
        };
        let mut bytes = vec![0xa5u8; 1 << 20];
        let at = bytes.len() - TRAILER_LEN;
        bytes[at..].copy_from_slice(&trailer.render());
        std::fs::write(&slot, &bytes).unwrap();
        assert_eq!(SlotTrailer::read(&slot).unwrap(), Some(trailer));
        std::fs::write(&slot, vec![0u8; 8192]).unwrap();
        assert_eq!(SlotTrailer::read(&slot).unwrap(), None);
        std::fs::write(&slot, [0u8; 100]).unwrap();
        assert!(matches!(
            SlotTrailer::read(&slot),
            Err(SlotError::TooSmall(..))
        ));
    }
}
