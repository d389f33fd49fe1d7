//! U-Boot environments as U-Boot, `mkenvimage` and libubootenv (`fw_printenv`,
//! `fw_setenv`) lay them out, here in files (on the boot FAT of a Lichen board).
//!
//! A copy of `size` bytes is a CRC32 (zlib's, little-endian) of the data area, then, for a
//! redundant environment (two copies), a flags byte, then the data area: `name=value` strings
//! each ending in a NUL, one more NUL after the last, padding to the end. Of two copies with
//! a good CRC the one with the higher flags value is current (0 follows 0xff, as a counter
//! that wrapped); a write goes to the other copy with the next flags value, so a write cut
//! short leaves the previous state readable. This is libubootenv's incremental-flags rule for
//! files; `fw_printenv -c CONFIG` with the two files in CONFIG reads what this writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{BootState, BootStateError, BootStore, CopyError, read_bounded, write_in_place};

/// U-Boot's usual environment size.
pub const DEFAULT_SIZE: usize = 0x4000;
/// Largest environment read.
pub const MAX_SIZE: usize = 1 << 20;

/// One decoded environment copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UbootEnv {
    /// The variables, sorted by name (as U-Boot and libubootenv write them).
    pub vars: BTreeMap<String, String>,
}

/// A copy read from its bytes, CRC checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The flags byte (redundant environments only).
    pub flags: Option<u8>,
    /// The variables.
    pub env: UbootEnv,
}

impl UbootEnv {
    /// Decodes a copy: `redundant` says whether it has the flags byte. `Err` says why the
    /// copy is not valid (bad size or CRC).
    pub fn decode(block: &[u8], redundant: bool) -> Result<Copy, UbootEnvError> {
        let header = if redundant { 5 } else { 4 };
        if block.len() <= header + 1 || block.len() > MAX_SIZE {
            return Err(UbootEnvError::BadSize(block.len()));
        }
        let stored = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        let data = &block[header..];
        let computed = crc32fast::hash(data);
        if stored != computed {
            return Err(UbootEnvError::Crc { stored, computed });
        }
        let mut vars = BTreeMap::new();
        for entry in data.split(|&b| b == 0) {
            if entry.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(entry);
            // Entries without '=' are skipped, as libubootenv does.
            if let Some((name, value)) = text.split_once('=')
                && !name.is_empty()
            {
                vars.insert(name.to_string(), value.to_string());
            }
        }
        Ok(Copy {
            flags: redundant.then_some(block[4]),
            env: UbootEnv { vars },
        })
    }

    /// Encodes a copy of `size` bytes with `flags` (`Some` for a redundant environment), the
    /// data padded with `pad`; `None` if the variables do not fit.
    pub fn encode(&self, size: usize, flags: Option<u8>, pad: u8) -> Option<Vec<u8>> {
        let header = if flags.is_some() { 5 } else { 4 };
        let mut data = Vec::new();
        for (name, value) in &self.vars {
            data.extend_from_slice(name.as_bytes());
            data.push(b'=');
            data.extend_from_slice(value.as_bytes());
            data.push(0);
        }
        data.push(0);
        if header + data.len() > size {
            return None;
        }
        data.resize(size - header, pad);
        let mut block = crc32fast::hash(&data).to_le_bytes().to_vec();
        if let Some(flags) = flags {
            block.push(flags);
        }
        block.extend_from_slice(&data);
        Some(block)
    }
}

/// Which of two decoded copies is current (libubootenv's rule for incremental flags):
/// `Some(0)` or `Some(1)`, `None` when neither is valid.
pub fn current_copy(copies: [Option<&Copy>; 2]) -> Option<usize> {
    match copies {
        [Some(_), None] => Some(0),
        [None, Some(_)] => Some(1),
        [None, None] => None,
        [Some(a), Some(b)] => {
            let (fa, fb) = (a.flags.unwrap_or(0), b.flags.unwrap_or(0));
            Some(match (fa, fb) {
                (0xff, 0) => 1,
                (0, 0xff) => 0,
                _ if fb > fa => 1,
                _ => 0,
            })
        }
    }
}

/// The boot state in a U-Boot environment: one file, or two (a redundant environment).
#[derive(Debug, Clone)]
pub struct UbootEnvStore {
    copies: Vec<PathBuf>,
    size: usize,
}

impl UbootEnvStore {
    /// A store over one or two copies of `size` bytes each.
    pub fn new(copies: Vec<PathBuf>, size: usize) -> Result<UbootEnvStore, BootStateError> {
        if copies.is_empty() || copies.len() > 2 {
            return Err(BootStateError::Config(format!(
                "update.boot-state: a U-Boot environment is one file or two (redundant), not {}",
                copies.len()
            )));
        }
        if !(64..=MAX_SIZE).contains(&size) {
            return Err(BootStateError::Config(format!(
                "update.env-size: {size} bytes; a U-Boot environment here is 64 bytes to {MAX_SIZE}"
            )));
        }
        Ok(UbootEnvStore { copies, size })
    }

    fn redundant(&self) -> bool {
        self.copies.len() == 2
    }

    /// Each copy decoded (or why not).
    fn read_all(&self) -> Vec<Result<Copy, CopyError>> {
        self.copies
            .iter()
            .map(|path| read_copy(path, self.size, self.redundant()))
            .collect()
    }

    /// The current copy's index and contents.
    fn current(&self) -> Result<(usize, Copy), BootStateError> {
        let copies = self.read_all();
        let valid = [
            copies.first().and_then(|c| c.as_ref().ok()),
            copies.get(1).and_then(|c| c.as_ref().ok()),
        ];
        match current_copy(valid) {
            Some(i) => Ok((
                i,
                valid[i].cloned().expect("current_copy names a valid copy"),
            )),
            // Neither copy is valid: every entry is an error.
            None => Err(BootStateError::NoValidCopy(
                self.copies
                    .iter()
                    .zip(copies)
                    .filter_map(|(p, c)| c.err().map(|e| (p.clone(), e)))
                    .collect(),
            )),
        }
    }
}

fn read_copy(path: &Path, size: usize, redundant: bool) -> Result<Copy, CopyError> {
    let bytes = read_bounded(path, MAX_SIZE as u64).map_err(|e| CopyError::Read(Box::new(e)))?;
    if bytes.len() < size {
        return Err(UbootEnvError::Short {
            len: bytes.len(),
            size,
        }
        .into());
    }
    Ok(UbootEnv::decode(&bytes[..size], redundant)?)
}

/// Why a copy is not a valid U-Boot environment.
#[derive(Debug, thiserror::Error)]
pub enum UbootEnvError {
    /// A block of this many bytes cannot be an environment.
    #[error("{0} bytes is not an environment size")]
    BadSize(usize),
    /// The file is shorter than the configured environment size.
    #[error("{len} bytes; the environment is {size}")]
    Short {
        /// The file's bytes.
        len: usize,
        /// `update.uboot-env-size`.
        size: usize,
    },
    /// The checksum does not match the data (a torn or damaged copy).
    #[error("CRC32 is {stored:08x}, the data's is {computed:08x}")]
    Crc {
        /// The CRC32 in the header.
        stored: u32,
        /// The data's CRC32.
        computed: u32,
    },
}

impl BootStore for UbootEnvStore {
    fn describe(&self) -> String {
        let copies: Vec<String> = self
            .copies
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "U-Boot environment {} ({} bytes)",
            copies.join(" + "),
            self.size
        )
    }

    fn load(&self) -> Result<BootState, BootStateError> {
        let (_, copy) = self.current()?;
        BootState::from_vars(|n| copy.env.vars.get(n).map(String::as_str))
    }

    fn store(&self, state: &BootState) -> Result<(), BootStateError> {
        // Keep the other variables of the current copy; write the other copy.
        let (target, mut env, flags) = match self.current() {
            Ok((i, copy)) => {
                let next = if self.redundant() { 1 - i } else { 0 };
                (next, copy.env, copy.flags.map(|f| f.wrapping_add(1)))
            }
            Err(_) => (0, UbootEnv::default(), self.redundant().then_some(1)),
        };
        for (name, value) in state.to_vars() {
            env.vars.insert(name.to_string(), value);
        }
        let path = &self.copies[target];
        let block = env
            .encode(self.size, flags, 0)
            .ok_or_else(|| BootStateError::TooLarge {
                path: path.clone(),
                need: env
                    .vars
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 2)
                    .sum::<usize>()
                    + 6,
                room: self.size,
            })?;
        write_in_place(path, &block)?;
        let read = read_copy(path, self.size, self.redundant()).map_err(|reason| {
            BootStateError::Corrupt {
                path: path.clone(),
                kind: "U-Boot environment after writing it",
                reason: reason.into(),
            }
        })?;
        let found = BootState::from_vars(|n| read.env.vars.get(n).map(String::as_str))?;
        if found != *state || read.flags != flags {
            return Err(BootStateError::ReadBack {
                path: path.clone(),
                wanted: state.to_string(),
                found: found.to_string(),
            });
        }
        // The copy just written must now be the current one.
        let (now, _) = self.current()?;
        if now != target {
            return Err(BootStateError::ReadBack {
                path: path.clone(),
                wanted: format!("copy {} current", target + 1),
                found: format!("copy {} current", now + 1),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::Slot;
    use std::process::Command;

    /// Debian's u-boot-tools (mkenvimage) and libubootenv-tool (fw_printenv, fw_setenv), from
    /// scripts/install-deps; missing tools fail the test unless LICHEN_SKIP_MISSING_TOOLS=1.
    fn tools_present() -> bool {
        let there = ["mkenvimage", "fw_printenv", "fw_setenv"]
            .iter()
            .all(|t| Command::new(t).arg("-h").output().is_ok());
        if !there {
            assert!(
                std::env::var("LICHEN_SKIP_MISSING_TOOLS").as_deref() == Ok("1"),
                "mkenvimage/fw_printenv are missing: scripts/install-deps installs u-boot-tools and libubootenv-tool"
            );
        }
        there
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().expect("tool runs");
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn vars(pairs: &[(&str, &str)]) -> UbootEnv {
        UbootEnv {
            vars: pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn copies_match_mkenvimage_byte_for_byte() {
        if !tools_present() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("env.txt");
        // mkenvimage keeps the input's order: give it sorted, as U-Boot exports.
        std::fs::write(
            &text,
            "BOOT_A_LEFT=3\nBOOT_B_LEFT=0\nBOOT_ORDER=A B\nbootdelay=2\n",
        )
        .unwrap();
        let env = vars(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "0"),
            ("bootdelay", "2"),
        ]);
        for (redundant, flags) in [(false, None), (true, Some(1))] {
            let out = dir.path().join(format!("env-{redundant}.bin"));
            let mut cmd = Command::new("mkenvimage");
            cmd.args(["-s", "16384", "-p", "0"]);
            if redundant {
                cmd.arg("-r");
            }
            run(cmd.arg("-o").arg(&out).arg(&text));
            let theirs = std::fs::read(&out).unwrap();
            assert_eq!(env.encode(DEFAULT_SIZE, flags, 0).unwrap(), theirs);
            let copy = UbootEnv::decode(&theirs, redundant).unwrap();
            assert_eq!(copy.env, env);
            assert_eq!(copy.flags, flags);
        }
    }

    #[test]
    fn fw_printenv_and_fw_setenv_share_the_redundant_files_with_the_store() {
        if !tools_present() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (
            dir.path().join("uboot.env"),
            dir.path().join("uboot-redund.env"),
        );
        let config = dir.path().join("fw_env.config");
        std::fs::write(
            &config,
            format!(
                "{} 0x0 0x4000\n{} 0x0 0x4000\n",
                one.display(),
                two.display()
            ),
        )
        .unwrap();
        let store = UbootEnvStore::new(vec![one.clone(), two.clone()], DEFAULT_SIZE).unwrap();
        // Both copies start empty (invalid): the store writes copy 1.
        std::fs::write(&one, vec![0u8; DEFAULT_SIZE]).unwrap();
        std::fs::write(&two, vec![0u8; DEFAULT_SIZE]).unwrap();
        let mut state = BootState::default();
        store.store(&state).unwrap();
        let printed = run(Command::new("fw_printenv").arg("-c").arg(&config));
        assert!(printed.contains("BOOT_ORDER=A B\n"), "{printed}");
        assert!(printed.contains("BOOT_B_LEFT=3\n"), "{printed}");

        // fw_setenv writes the other copy; the store reads it as current.
        run(Command::new("fw_setenv")
            .arg("-c")
            .arg(&config)
            .args(["BOOT_B_LEFT", "1"]));
        assert_eq!(store.load().unwrap().b_left, 1);

        // And the store's next write is what fw_printenv prints, other variables kept.
        run(Command::new("fw_setenv")
            .arg("-c")
            .arg(&config)
            .args(["bootdelay", "5"]));
        state.try_once(Slot::B);
        store.store(&state).unwrap();
        let printed = run(Command::new("fw_printenv").arg("-c").arg(&config));
        assert!(printed.contains("BOOT_ORDER=B A\n"), "{printed}");
        assert!(printed.contains("BOOT_B_LEFT=1\n"), "{printed}");
        assert!(printed.contains("bootdelay=5\n"), "{printed}");
        for _ in 0..300 {
            store.store(&state).unwrap();
        }
        assert_eq!(store.load().unwrap(), state, "flags wrap past 0xff");
        let printed = run(Command::new("fw_printenv").arg("-c").arg(&config));
        assert!(printed.contains("BOOT_ORDER=B A\n"), "{printed}");
    }

    #[test]
    fn a_copy_with_a_bad_crc_is_passed_over_and_the_newer_flags_win() {
        let env = vars(&[
            ("BOOT_ORDER", "B A"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "1"),
        ]);
        let older = vars(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
        ]);
        let newer_block = env.encode(256, Some(8), 0).unwrap();
        let older_block = older.encode(256, Some(7), 0).unwrap();
        let a = UbootEnv::decode(&newer_block, true).unwrap();
        let b = UbootEnv::decode(&older_block, true).unwrap();
        assert_eq!(current_copy([Some(&a), Some(&b)]), Some(0));
        assert_eq!(current_copy([Some(&b), Some(&a)]), Some(1));
        let wrapped = UbootEnv::decode(&env.encode(256, Some(0), 0).unwrap(), true).unwrap();
        let before = UbootEnv::decode(&older.encode(256, Some(0xff), 0).unwrap(), true).unwrap();
        assert_eq!(current_copy([Some(&before), Some(&wrapped)]), Some(1));
        let mut torn = newer_block.clone();
        torn[100] ^= 0x55;
        let err = UbootEnv::decode(&torn, true).unwrap_err().to_string();
        assert!(err.contains("CRC32"), "{err}");
        assert_eq!(current_copy([None, Some(&b)]), Some(1));
    }

    #[test]
    fn oversized_variables_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("uboot.env");
        let mut env = vars(&[("pad", &"x".repeat(100))]);
        env.vars.insert("BOOT_ORDER".into(), "A B".into());
        std::fs::write(&one, env.encode(128, None, 0).unwrap()).unwrap();
        let before = std::fs::read(&one).unwrap();
        let store = UbootEnvStore::new(vec![one.clone()], 128).unwrap();
        let err = store.store(&BootState::default()).unwrap_err().to_string();
        assert!(err.contains("uboot.env") && err.contains("128"), "{err}");
        assert_eq!(std::fs::read(&one).unwrap(), before);
    }
}
