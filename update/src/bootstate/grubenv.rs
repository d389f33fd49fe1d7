//! GRUB environment blocks (`grub-editenv`, `load_env`/`save_env`), in two copies.
//!
//! A block is a file of fixed size (1024 bytes from `grub-editenv create`) that starts with
//! `# GRUB Environment Block\n`, holds `name=value\n` lines, and is padded with `#`. In a
//! value, `\` and newline are escaped with a `\`. GRUB's `save_env` overwrites the file's
//! blocks in place (it cannot allocate), so the block keeps its size; so does this writer.
//!
//! The boot script (`images/system/grub.cfg`) reads the first copy and falls back to the
//! second when the first is unreadable or has no valid `BOOT_ORDER`; it saves both. The
//! block has no checksum, so [`GrubEnvStore`] writes the copies one after the other, each
//! flushed and read back, and a reader takes the first copy that parses.

use std::path::PathBuf;

use super::{BootState, BootStateError, BootStore, CopyError, read_bounded, write_in_place};

/// Why a block is not a GRUB environment block.
#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    /// Larger than [`MAX_SIZE`].
    #[error("{0} bytes, more than {MAX_SIZE}")]
    TooLarge(usize),
    /// No [`SIGNATURE`] line.
    #[error("it does not start with \"# GRUB Environment Block\"")]
    NoSignature,
    /// The last line has neither `=` nor a newline.
    #[error("a line has no '=' and no end")]
    Unterminated,
    /// A line (given) without `=`.
    #[error("line {0:?} has no '='")]
    NoEquals(String),
    /// The value of the variable (named) has no newline.
    #[error("the value of {0} has no end")]
    ValueUnterminated(String),
    /// The value of the variable (named) ends in an escape with nothing after it.
    #[error("the value of {0} ends in a lone '\\'")]
    LoneBackslash(String),
}

/// The first line of a block.
pub const SIGNATURE: &str = "# GRUB Environment Block\n";
/// Size of a new block (`grub-editenv create`).
pub const DEFAULT_SIZE: usize = 1024;
/// Largest block read.
pub const MAX_SIZE: usize = 64 * 1024;

/// The lines of one block, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    /// Variables and comments (Debian's grub-editenv writes a warning comment first).
    pub lines: Vec<Line>,
}

/// One line of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `name=value`.
    Var(String, String),
    /// `#...` (kept as it is, without its newline).
    Comment(String),
}

impl GrubEnv {
    /// Parses a block. `Err` says why it is not one.
    pub fn parse(block: &[u8]) -> Result<GrubEnv, GrubEnvError> {
        if block.len() > MAX_SIZE {
            return Err(GrubEnvError::TooLarge(block.len()));
        }
        let body = block
            .strip_prefix(SIGNATURE.as_bytes())
            .ok_or(GrubEnvError::NoSignature)?;
        let mut lines = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            if rest[0] == b'#' {
                // A comment line, or the padding (which has no newline).
                match rest.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        lines.push(Line::Comment(
                            String::from_utf8_lossy(&rest[..end]).into_owned(),
                        ));
                        rest = &rest[end + 1..];
                    }
                    None => break,
                }
                continue;
            }
            let Some(eq) = rest.iter().position(|&b| b == b'=' || b == b'\n') else {
                return Err(GrubEnvError::Unterminated);
            };
            if rest[eq] == b'\n' {
                return Err(GrubEnvError::NoEquals(
                    String::from_utf8_lossy(&rest[..eq]).into_owned(),
                ));
            }
            let name = String::from_utf8_lossy(&rest[..eq]).into_owned();
            let mut value = Vec::new();
            let mut i = eq + 1;
            loop {
                match rest.get(i) {
                    None => return Err(GrubEnvError::ValueUnterminated(name)),
                    Some(b'\\') => {
                        let Some(&next) = rest.get(i + 1) else {
                            return Err(GrubEnvError::LoneBackslash(name));
                        };
                        value.push(next);
                        i += 2;
                    }
                    Some(b'\n') => {
                        i += 1;
                        break;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
            lines.push(Line::Var(
                name,
                String::from_utf8_lossy(&value).into_owned(),
            ));
            rest = &rest[i..];
        }
        Ok(GrubEnv { lines })
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| match line {
            Line::Var(n, v) if n == name => Some(v.as_str()),
            _ => None,
        })
    }

    /// Sets `name` (in its place if present, else at the end, as `grub-editenv set` does).
    pub fn set(&mut self, name: &str, value: &str) {
        let found = self.lines.iter_mut().find_map(|line| match line {
            Line::Var(n, v) if n == name => Some(v),
            _ => None,
        });
        match found {
            Some(v) => *v = value.to_string(),
            None => self
                .lines
                .push(Line::Var(name.to_string(), value.to_string())),
        }
    }

    /// The block of `size` bytes; `None` if the variables do not fit.
    pub fn render(&self, size: usize) -> Option<Vec<u8>> {
        let mut out = self.encode();
        if out.len() > size {
            return None;
        }
        out.resize(size, b'#');
        Some(out)
    }

    /// The signature and the variables, without padding.
    fn encode(&self) -> Vec<u8> {
        let mut out = SIGNATURE.as_bytes().to_vec();
        for line in &self.lines {
            match line {
                Line::Comment(text) => out.extend_from_slice(text.as_bytes()),
                Line::Var(name, value) => {
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    for &b in value.as_bytes() {
                        if b == b'\\' || b == b'\n' {
                            out.push(b'\\');
                        }
                        out.push(b);
                    }
                }
            }
            out.push(b'\n');
        }
        out
    }
}

/// The boot state in GRUB environment blocks: the first path is the copy GRUB reads first.
#[derive(Debug, Clone)]
pub struct GrubEnvStore {
    copies: Vec<PathBuf>,
}

impl GrubEnvStore {
    /// A store over one or two copies.
    pub fn new(copies: Vec<PathBuf>) -> Result<GrubEnvStore, BootStateError> {
        if copies.is_empty() || copies.len() > 2 {
            return Err(BootStateError::Config(format!(
                "update.boot-state: GRUB takes one or two environment files, not {}",
                copies.len()
            )));
        }
        Ok(GrubEnvStore { copies })
    }

    fn read_copy(&self, path: &std::path::Path) -> Result<(GrubEnv, usize), BootStateError> {
        let bytes = read_bounded(path, MAX_SIZE as u64)?;
        let env = GrubEnv::parse(&bytes).map_err(|reason| BootStateError::Corrupt {
            path: path.to_path_buf(),
            kind: "GRUB environment block",
            reason: reason.into(),
        })?;
        Ok((env, bytes.len()))
    }
}

impl BootStore for GrubEnvStore {
    fn describe(&self) -> String {
        let copies: Vec<String> = self
            .copies
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!("GRUB environment {}", copies.join(" + "))
    }

    fn load(&self) -> Result<BootState, BootStateError> {
        let mut errors = Vec::new();
        for path in &self.copies {
            match self
                .read_copy(path)
                .and_then(|(env, _)| BootState::from_vars(|n| env.get(n)))
            {
                Ok(state) => return Ok(state),
                Err(err) => errors.push((path.clone(), CopyError::Read(Box::new(err)))),
            }
        }
        Err(BootStateError::NoValidCopy(errors))
    }

    fn store(&self, state: &BootState) -> Result<(), BootStateError> {
        for path in &self.copies {
            // Keep the other variables and the size of a readable copy; a damaged one is
            // written anew.
            let (mut env, size) = self
                .read_copy(path)
                .unwrap_or_else(|_| (GrubEnv::default(), DEFAULT_SIZE));
            for (name, value) in state.to_vars() {
                env.set(name, &value);
            }
            let block = env.render(size).ok_or_else(|| BootStateError::TooLarge {
                path: path.clone(),
                need: env.encode().len(),
                room: size,
            })?;
            write_in_place(path, &block)?;
            let (read, _) = self.read_copy(path)?;
            let found = BootState::from_vars(|n| read.get(n))?;
            if found != *state {
                return Err(BootStateError::ReadBack {
                    path: path.clone(),
                    wanted: state.to_string(),
                    found: found.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::Slot;
    use std::process::Command;

    /// `grub-editenv` (grub-common, scripts/install-deps) must be there: a missing tool fails
    /// the test unless LICHEN_SKIP_MISSING_TOOLS=1 says skipping is fine.
    fn grub_editenv() -> Option<&'static str> {
        let there = Command::new("grub-editenv")
            .arg("--version")
            .output()
            .is_ok();
        if !there {
            assert!(
                std::env::var("LICHEN_SKIP_MISSING_TOOLS").as_deref() == Ok("1"),
                "grub-editenv is missing: scripts/install-deps installs grub-common"
            );
            return None;
        }
        Some("grub-editenv")
    }

    fn editenv(path: &std::path::Path, args: &[&str]) -> String {
        let out = Command::new("grub-editenv")
            .arg(path)
            .args(args)
            .output()
            .expect("grub-editenv runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn blocks_match_grub_editenv_byte_for_byte() {
        let Some(_) = grub_editenv() else { return };
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("grubenv");
        editenv(&theirs, &["create"]);
        editenv(
            &theirs,
            &["set", "BOOT_ORDER=A B", "BOOT_A_LEFT=3", "BOOT_B_LEFT=3"],
        );
        editenv(&theirs, &["set", "note=back\\slash"]);
        let bytes = std::fs::read(&theirs).unwrap();
        let env = GrubEnv::parse(&bytes).unwrap();
        assert_eq!(env.get("BOOT_ORDER"), Some("A B"));
        assert_eq!(env.get("note"), Some("back\\slash"));
        // Debian's grub-editenv puts a warning comment first; it is kept.
        assert!(
            matches!(&env.lines[0], Line::Comment(c) if c.contains("WARNING")),
            "{env:?}"
        );
        let mut ours = GrubEnv {
            lines: vec![env.lines[0].clone()],
        };
        ours.set("BOOT_ORDER", "A B");
        ours.set("BOOT_A_LEFT", "3");
        ours.set("BOOT_B_LEFT", "3");
        ours.set("note", "back\\slash");
        assert_eq!(
            ours.render(DEFAULT_SIZE).unwrap(),
            bytes,
            "the same bytes as grub-editenv"
        );
    }

    #[test]
    fn grub_editenv_reads_what_the_store_writes() {
        let Some(_) = grub_editenv() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("grubenv"), dir.path().join("grubenv.bak"));
        editenv(&one, &["create"]);
        editenv(&one, &["set", "other=kept"]);
        let store = GrubEnvStore::new(vec![one.clone(), two.clone()]).unwrap();
        let mut state = BootState::default();
        state.try_once(Slot::B);
        store.store(&state).unwrap();
        assert_eq!(std::fs::metadata(&one).unwrap().len(), 1024);
        let listed = editenv(&one, &["list"]);
        assert_eq!(
            listed,
            "other=kept\nBOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=1\n"
        );
        assert_eq!(
            editenv(&two, &["list"]),
            "BOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=1\n",
            "a missing copy is written anew"
        );
        assert_eq!(store.load().unwrap(), state);
    }

    #[test]
    fn a_damaged_first_copy_falls_back_to_the_second_as_grub_cfg_does() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("grubenv"), dir.path().join("grubenv.bak"));
        let store = GrubEnvStore::new(vec![one.clone(), two.clone()]).unwrap();
        let mut state = BootState::default();
        state.mark_bad(Slot::A);
        store.store(&state).unwrap();
        std::fs::write(&one, vec![0u8; 1024]).unwrap();
        assert_eq!(store.load().unwrap(), state);
        std::fs::write(&two, b"# GRUB Environment Block\nBOOT_ORDER=C D\n").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("GRUB Environment Block") && err.contains("BOOT_ORDER"),
            "{err}"
        );
    }

    #[test]
    fn values_with_newlines_round_trip_and_overflow_is_refused() {
        let mut env = GrubEnv::default();
        env.set("a", "line1\nline2\\");
        let block = env.render(DEFAULT_SIZE).unwrap();
        assert_eq!(GrubEnv::parse(&block).unwrap(), env);
        env.set("big", &"x".repeat(2000));
        assert!(env.render(DEFAULT_SIZE).is_none());
        assert!(GrubEnv::parse(b"# GRUB Environment Block\nno-equals\n").is_err());
        assert!(GrubEnv::parse(b"# GRUB Environment Block\nv=unterminated").is_err());
    }

    #[test]
    fn a_store_refuses_an_oversized_variable_set_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("grubenv");
        let mut env = GrubEnv::default();
        env.set("pad", &"x".repeat(990));
        std::fs::write(&one, env.render(DEFAULT_SIZE).unwrap()).unwrap();
        let before = std::fs::read(&one).unwrap();
        let store = GrubEnvStore::new(vec![one.clone()]).unwrap();
        let err = store.store(&BootState::default()).unwrap_err().to_string();
        assert!(err.contains("grubenv") && err.contains("1024"), "{err}");
        assert_eq!(std::fs::read(&one).unwrap(), before, "nothing written");
    }
}
