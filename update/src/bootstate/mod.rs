//! Boot state: which root slot the boot loader tries next and how many tries each has left,
//! in RAUC's variables (`BOOT_ORDER`, `BOOT_A_LEFT`, `BOOT_B_LEFT`), kept where the boot
//! loader reads it:
//! - [`grubenv`]: a GRUB environment block, written in place, in two copies;
//! - [`ubootenv`]: a U-Boot environment (CRC32, redundant copy), libubootenv-compatible;
//! - [`tryboot`]: the Raspberry Pi firmware's `autoboot.txt` (A/B by `tryboot`).
//!
//! [`BootState`] holds the decisions (mark a slot good, try one once, invalidate one) as plain
//! data; a [`BootStore`] reads and writes it, and every write is read back and compared before
//! it counts as done.

pub mod grubenv;
pub mod tryboot;
pub mod ubootenv;

use std::path::PathBuf;

use crate::slot::Slot;

/// Tries a good slot gets (RAUC's default). A slot armed by an update gets one.
pub const MAX_TRIES: u8 = 3;

/// The boot loader's view of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    /// `BOOT_ORDER`: the slots in the order they are tried.
    pub order: [Slot; 2],
    /// `BOOT_A_LEFT`: tries left for slot A.
    pub a_left: u8,
    /// `BOOT_B_LEFT`: tries left for slot B.
    pub b_left: u8,
}

impl Default for BootState {
    /// A new board: A first, both slots good.
    fn default() -> Self {
        BootState {
            order: [Slot::A, Slot::B],
            a_left: MAX_TRIES,
            b_left: MAX_TRIES,
        }
    }
}

impl BootState {
    /// Tries left for `slot`.
    pub fn left(&self, slot: Slot) -> u8 {
        match slot {
            Slot::A => self.a_left,
            Slot::B => self.b_left,
        }
    }

    fn set_left(&mut self, slot: Slot, left: u8) {
        match slot {
            Slot::A => self.a_left = left,
            Slot::B => self.b_left = left,
        }
    }

    /// The slot the boot loader takes next: the first in `BOOT_ORDER` with tries left, or,
    /// when none has any (the scripts then reset every counter), the first in `BOOT_ORDER`.
    pub fn next_boot(&self) -> Slot {
        self.order
            .into_iter()
            .find(|s| self.left(*s) > 0)
            .unwrap_or(self.order[0])
    }

    /// RAUC's "mark good": the booted slot gets its tries back; the order stays.
    pub fn mark_good(&mut self, slot: Slot) {
        self.set_left(slot, MAX_TRIES);
    }

    /// RAUC's "mark active": `slot` first, with all its tries.
    pub fn mark_active(&mut self, slot: Slot) {
        self.order = [slot, slot.other()];
        self.set_left(slot, MAX_TRIES);
    }

    /// "mark bad": `slot` has no tries left and goes last. Done before a slot is written (so
    /// a half-written slot is never booted) and when its first boot fails its health check.
    pub fn mark_bad(&mut self, slot: Slot) {
        self.order = [slot.other(), slot];
        self.set_left(slot, 0);
    }

    /// Arms an update: `slot` first with one try; the other keeps all its tries, so any
    /// failure of that one boot falls back to it.
    pub fn try_once(&mut self, slot: Slot) {
        self.order = [slot, slot.other()];
        self.set_left(slot, 1);
        self.set_left(slot.other(), MAX_TRIES);
    }

    /// `BOOT_ORDER` as the boot scripts write it: `"A B"` or `"B A"`.
    pub fn order_text(&self) -> String {
        format!("{} {}", self.order[0], self.order[1])
    }

    /// The variables and their values, in the order the scripts write them.
    pub fn to_vars(&self) -> [(&'static str, String); 3] {
        [
            ("BOOT_ORDER", self.order_text()),
            ("BOOT_A_LEFT", self.a_left.to_string()),
            ("BOOT_B_LEFT", self.b_left.to_string()),
        ]
    }

    /// Reads the variables as the boot scripts do: `BOOT_ORDER` must be `"A B"` or `"B A"`; a
    /// counter that is missing or not 0-3 counts as 0.
    pub fn from_vars<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<BootState, BootStateError> {
        let order = match get("BOOT_ORDER") {
            Some("A B") => [Slot::A, Slot::B],
            Some("B A") => [Slot::B, Slot::A],
            Some(other) => {
                return Err(BootStateError::BadValue {
                    name: "BOOT_ORDER",
                    value: other.chars().take(32).collect(),
                    expected: "\"A B\" or \"B A\"",
                });
            }
            None => return Err(BootStateError::Missing { name: "BOOT_ORDER" }),
        };
        let counter = |name| {
            get(name)
                .and_then(|v| v.parse::<u8>().ok())
                .filter(|n| *n <= MAX_TRIES)
                .unwrap_or(0)
        };
        Ok(BootState {
            order,
            a_left: counter("BOOT_A_LEFT"),
            b_left: counter("BOOT_B_LEFT"),
        })
    }
}

impl std::fmt::Display for BootState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BOOT_ORDER=\"{}\" BOOT_A_LEFT={} BOOT_B_LEFT={}",
            self.order_text(),
            self.a_left,
            self.b_left
        )
    }
}

/// Where the boot state lives and how it is written.
pub trait BootStore: Send + Sync {
    /// Says where the state is, for messages (`GRUB environment /boot/grubenv (+1 copy)`).
    fn describe(&self) -> String;
    /// Reads the state the boot loader will act on.
    fn load(&self) -> Result<BootState, BootStateError>;
    /// Writes the state, reads it back and checks it is what the boot loader will see; an
    /// error means the boot state may not be what was asked, and nothing may rely on it.
    fn store(&self, state: &BootState) -> Result<(), BootStateError>;
    /// Extra arguments of the reboot command that starts a trial boot (Raspberry Pi
    /// `tryboot`: `"0 tryboot"`); none for boot loaders that keep counters.
    fn trial_reboot_args(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What can go wrong with the boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootStateError {
    /// Reading or writing a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not a valid block of its kind.
    #[error("{path} is not a valid {kind}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it should be.
        kind: &'static str,
        /// Why it is not.
        #[source]
        reason: Defect,
    },
    /// A variable is missing.
    #[error("the boot state has no {name}")]
    Missing {
        /// The variable.
        name: &'static str,
    },
    /// A variable has a value the boot scripts do not take.
    #[error("{name}={value:?} is not valid: expected {expected}")]
    BadValue {
        /// The variable.
        name: &'static str,
        /// Its value (cut to 32 characters).
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// No copy of the boot state could be read.
    #[error("no copy of the boot state is readable: {}", copy_list(.0))]
    NoValidCopy(Vec<(PathBuf, CopyError)>),
    /// The variables do not fit in the block.
    #[error("the variables need {need} bytes; {path} holds {room}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        room: usize,
    },
    /// What was read back after a write is not what was written.
    #[error("{path} reads back as {found} after writing {wanted}")]
    ReadBack {
        /// The file.
        path: PathBuf,
        /// What was written.
        wanted: String,
        /// What was read.
        found: String,
    },
    /// The configuration is wrong for this boot loader.
    #[error("{0}")]
    Config(String),
}

/// Why a boot-state file is not a valid block of its kind.
#[derive(Debug, thiserror::Error)]
pub enum Defect {
    /// A FIFO, a device or a directory.
    #[error("it is not a regular file")]
    NotRegularFile,
    /// Larger than the bound of its kind.
    #[error("it is {size} bytes, more than {max}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// Not a GRUB environment block.
    #[error(transparent)]
    Grub(#[from] grubenv::GrubEnvError),
    /// Not an A/B `autoboot.txt`.
    #[error(transparent)]
    Autoboot(#[from] tryboot::AutobootError),
    /// Not a valid U-Boot environment copy.
    #[error(transparent)]
    Uboot(#[from] CopyError),
}

/// Why one copy of a two-copy boot state (GRUB, U-Boot) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// It cannot be read, or holds no valid boot state.
    #[error(transparent)]
    Read(Box<BootStateError>),
    /// It is not a valid U-Boot environment.
    #[error(transparent)]
    Uboot(#[from] ubootenv::UbootEnvError),
}

/// `path: why; path: why` for [`BootStateError::NoValidCopy`].
fn copy_list(copies: &[(PathBuf, CopyError)]) -> String {
    copies
        .iter()
        .map(|(path, err)| format!("{}: {err}", path.display()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads a whole small file with a bound: `max` bytes, regular files only.
fn read_bounded(path: &std::path::Path, max: u64) -> Result<Vec<u8>, BootStateError> {
    use std::io::Read;
    let io = |what, source| BootStateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| io("opening", e))?;
    let meta = file.metadata().map_err(|e| io("reading", e))?;
    if !meta.is_file() {
        return Err(BootStateError::Corrupt {
            path: path.to_path_buf(),
            kind: "boot-state file",
            reason: Defect::NotRegularFile,
        });
    }
    if meta.len() > max {
        return Err(BootStateError::Corrupt {
            path: path.to_path_buf(),
            kind: "boot-state file",
            reason: Defect::TooLarge {
                size: meta.len(),
                max,
            },
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max)
        .read_to_end(&mut bytes)
        .map_err(|e| io("reading", e))?;
    Ok(bytes)
}

/// Overwrites a file's bytes in place (no truncation, no new blocks on a FAT whose size does
/// not change) and flushes them to the device.
fn write_in_place(path: &std::path::Path, bytes: &[u8]) -> Result<(), BootStateError> {
    use std::io::Write;
    let io = |what, source| BootStateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io("opening for writing", e))?;
    file.write_all(bytes).map_err(|e| io("writing", e))?;
    let len = file.metadata().map_err(|e| io("reading", e))?.len();
    if len > bytes.len() as u64 {
        file.set_len(bytes.len() as u64)
            .map_err(|e| io("truncating", e))?;
    }
    file.sync_all().map_err(|e| io("flushing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_rauc() {
        let mut state = BootState::default();
        assert_eq!(state.next_boot(), Slot::A);
        state.mark_bad(Slot::B);
        assert_eq!(
            state.to_string(),
            "BOOT_ORDER=\"A B\" BOOT_A_LEFT=3 BOOT_B_LEFT=0"
        );
        state.try_once(Slot::B);
        assert_eq!(
            state.to_string(),
            "BOOT_ORDER=\"B A\" BOOT_A_LEFT=3 BOOT_B_LEFT=1"
        );
        assert_eq!(state.next_boot(), Slot::B);
        // The boot loader takes the try; a failure means the next boot is A.
        state.b_left = 0;
        assert_eq!(state.next_boot(), Slot::A);
        state.mark_active(Slot::B);
        assert_eq!(
            state.to_string(),
            "BOOT_ORDER=\"B A\" BOOT_A_LEFT=3 BOOT_B_LEFT=3"
        );
        state.a_left = 0;
        state.b_left = 0;
        assert_eq!(
            state.next_boot(),
            Slot::B,
            "all zero: the scripts reset and take the first"
        );
    }

    #[test]
    fn variables_are_read_as_the_boot_scripts_read_them() {
        let vars = |order: &'static str, a: &'static str, b: &'static str| {
            move |name: &str| match name {
                "BOOT_ORDER" => Some(order),
                "BOOT_A_LEFT" => Some(a),
                "BOOT_B_LEFT" => Some(b),
                _ => None,
            }
        };
        let state = BootState::from_vars(vars("B A", "2", "7")).unwrap();
        assert_eq!(state.order, [Slot::B, Slot::A]);
        assert_eq!((state.a_left, state.b_left), (2, 0), "7 is out of range: 0");
        let err = BootState::from_vars(vars("A A", "3", "3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("BOOT_ORDER=\"A A\""), "{err}");
        let err = BootState::from_vars(|_| None).unwrap_err().to_string();
        assert!(err.contains("BOOT_ORDER"), "{err}");
    }
}
