//! Raspberry Pi A/B boot through the firmware's `tryboot` (Pi 4, Pi 5, Zero 2 W with a
//! recent firmware): `autoboot.txt` on the first FAT partition says which boot partition the
//! firmware uses normally (`[all]`) and which one for a single boot after
//! `reboot "0 tryboot"` (`[tryboot]`):
//!
//! ```text
//! [all]
//! tryboot_a_b=1
//! boot_partition=2
//! [tryboot]
//! boot_partition=3
//! ```
//!
//! The firmware keeps no counters: a failed trial boot falls back because the next plain
//! reboot uses `[all]` again. RAUC's variables map onto the file as follows: the state
//! "try B once" (`BOOT_ORDER="B A"`, `BOOT_B_LEFT=1`) is `[all]` = A and `[tryboot]` = B, and
//! the reboot that starts the trial carries `0 tryboot` ([`BootStore::trial_reboot_args`]);
//! any other state is `[all]` = `[tryboot]` = the slot the counters would boot. Read back,
//! the file gives a good slot 3 tries and a slot only in `[tryboot]` 1; the other slot's
//! counter is not kept (0). Not testable on this project's machines (no Pi firmware in
//! QEMU): the file format and the mapping are.

use std::path::PathBuf;

use super::{BootState, BootStateError, BootStore, MAX_TRIES, read_bounded, write_in_place};
use crate::slot::Slot;

/// Largest `autoboot.txt` read.
const MAX_SIZE: u64 = 16 * 1024;

/// The two boot partitions of an `autoboot.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoboot {
    /// `[all] boot_partition`.
    pub normal: u8,
    /// `[tryboot] boot_partition`.
    pub tryboot: u8,
}

impl Autoboot {
    /// Parses `autoboot.txt`: `[section]` lines, `key=value` lines, `#` comments.
    pub fn parse(text: &str) -> Result<Autoboot, AutobootError> {
        let mut section = String::from("all");
        let (mut normal, mut tryboot, mut ab) = (None, None, false);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(AutobootError::BadLine(line.to_string()));
            };
            match (section.as_str(), key.trim()) {
                ("all", "boot_partition") => normal = Some(partition(value)?),
                ("tryboot", "boot_partition") => tryboot = Some(partition(value)?),
                ("all", "tryboot_a_b") => ab = value.trim() == "1",
                _ => {}
            }
        }
        if !ab {
            return Err(AutobootError::NotAB);
        }
        let normal = normal.ok_or(AutobootError::NoPartition)?;
        Ok(Autoboot {
            normal,
            tryboot: tryboot.unwrap_or(normal),
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        format!(
            "[all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
            self.normal, self.tryboot
        )
    }
}

fn partition(value: &str) -> Result<u8, AutobootError> {
    value
        .trim()
        .parse::<u8>()
        .ok()
        .filter(|n| (1..=63).contains(n))
        .ok_or_else(|| AutobootError::BadPartition(value.to_string()))
}

/// Why a file is not an `autoboot.txt` this store reads.
#[derive(Debug, thiserror::Error)]
pub enum AutobootError {
    /// A line (given) that is neither a section nor a setting.
    #[error("line {0:?} is neither [section] nor key=value")]
    BadLine(String),
    /// Not an A/B file.
    #[error("[all] has no tryboot_a_b=1")]
    NotAB,
    /// No normal boot partition.
    #[error("[all] has no boot_partition")]
    NoPartition,
    /// A `boot_partition` value (given) that is not 1-63.
    #[error("boot_partition={0:?} is not a partition number 1-63")]
    BadPartition(String),
}

/// The boot state as an `autoboot.txt`, with the boot partition of each slot.
#[derive(Debug, Clone)]
pub struct TrybootStore {
    path: PathBuf,
    partitions: [u8; 2],
}

impl TrybootStore {
    /// A store over `path` with slot A booting from partition `a` and B from `b`.
    pub fn new(path: PathBuf, a: u8, b: u8) -> Result<TrybootStore, BootStateError> {
        if a == b || !(1..=63).contains(&a) || !(1..=63).contains(&b) {
            return Err(BootStateError::Config(format!(
                "update.tryboot-partitions: A={a} B={b}; two different partitions 1-63"
            )));
        }
        Ok(TrybootStore {
            path,
            partitions: [a, b],
        })
    }

    fn partition_of(&self, slot: Slot) -> u8 {
        match slot {
            Slot::A => self.partitions[0],
            Slot::B => self.partitions[1],
        }
    }

    fn slot_of(&self, partition: u8) -> Result<Slot, BootStateError> {
        if partition == self.partitions[0] {
            Ok(Slot::A)
        } else if partition == self.partitions[1] {
            Ok(Slot::B)
        } else {
            Err(BootStateError::BadValue {
                name: "boot_partition",
                value: partition.to_string(),
                expected: "the boot partition of slot A or B",
            })
        }
    }

    /// The file for a state (see the module docs).
    pub fn encode(&self, state: &BootState) -> Autoboot {
        let first = state.order[0];
        let trial =
            state.left(first) > 0 && state.left(first) < MAX_TRIES && state.left(first.other()) > 0;
        if trial {
            Autoboot {
                normal: self.partition_of(first.other()),
                tryboot: self.partition_of(first),
            }
        } else {
            let slot = self.partition_of(state.next_boot());
            Autoboot {
                normal: slot,
                tryboot: slot,
            }
        }
    }

    /// The state a file stands for (see the module docs).
    pub fn decode(&self, file: &Autoboot) -> Result<BootState, BootStateError> {
        let normal = self.slot_of(file.normal)?;
        let tryboot = self.slot_of(file.tryboot)?;
        let mut state = BootState {
            order: [normal, normal.other()],
            a_left: 0,
            b_left: 0,
        };
        if tryboot != normal {
            state.try_once(tryboot);
        } else {
            state.mark_good(normal);
        }
        Ok(state)
    }
}

impl BootStore for TrybootStore {
    fn describe(&self) -> String {
        format!(
            "Raspberry Pi tryboot {} (A: partition {}, B: partition {})",
            self.path.display(),
            self.partitions[0],
            self.partitions[1]
        )
    }

    fn load(&self) -> Result<BootState, BootStateError> {
        let bytes = read_bounded(&self.path, MAX_SIZE)?;
        let file = Autoboot::parse(&String::from_utf8_lossy(&bytes)).map_err(|reason| {
            BootStateError::Corrupt {
                path: self.path.clone(),
                kind: "autoboot.txt",
                reason: reason.into(),
            }
        })?;
        self.decode(&file)
    }

    fn store(&self, state: &BootState) -> Result<(), BootStateError> {
        let wanted = self.encode(state);
        write_in_place(&self.path, wanted.render().as_bytes())?;
        let bytes = read_bounded(&self.path, MAX_SIZE)?;
        let found = Autoboot::parse(&String::from_utf8_lossy(&bytes)).map_err(|reason| {
            BootStateError::Corrupt {
                path: self.path.clone(),
                kind: "autoboot.txt after writing it",
                reason: reason.into(),
            }
        })?;
        if found != wanted {
            return Err(BootStateError::ReadBack {
                path: self.path.clone(),
                wanted: format!("{wanted:?}"),
                found: format!("{found:?}"),
            });
        }
        Ok(())
    }

    fn trial_reboot_args(&self) -> Vec<String> {
        vec!["0 tryboot".to_string()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raspberry_pi_documentation_example_parses() {
        let text = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n";
        let file = Autoboot::parse(text).unwrap();
        assert_eq!(
            file,
            Autoboot {
                normal: 2,
                tryboot: 3
            }
        );
        assert_eq!(file.render(), text);
        let err = Autoboot::parse("[all]\nboot_partition=2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tryboot_a_b"), "{err}");
        let err = Autoboot::parse("[all]\ntryboot_a_b=1\nboot_partition=99\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("boot_partition=\"99\""), "{err}");
    }

    #[test]
    fn try_once_is_the_tryboot_section_and_commit_moves_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("autoboot.txt");
        let store = TrybootStore::new(path.clone(), 2, 3).unwrap();
        let mut state = BootState::default();
        store.store(&state).unwrap();
        assert_eq!(
            Autoboot::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            Autoboot {
                normal: 2,
                tryboot: 2
            }
        );
        state.mark_bad(Slot::B);
        state.try_once(Slot::B);
        store.store(&state).unwrap();
        assert_eq!(
            Autoboot::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            Autoboot {
                normal: 2,
                tryboot: 3
            }
        );
        assert_eq!(store.load().unwrap(), state);
        assert_eq!(store.trial_reboot_args(), vec!["0 tryboot".to_string()]);
        state.mark_active(Slot::B);
        store.store(&state).unwrap();
        assert_eq!(store.load().unwrap().order, [Slot::B, Slot::A]);
        assert_eq!(
            Autoboot::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            Autoboot {
                normal: 3,
                tryboot: 3
            }
        );
        assert!(TrybootStore::new(path, 2, 2).is_err());
    }
}
