//! The update journal: what an update is doing and how the last one ended, kept on the data
//! partition (it outlives both slots) as one small JSON file, replaced atomically.
//!
//! `lichen update` records the update as `writing` before it touches the inactive slot and as
//! `armed` once the slot is verified and the boot state says "try it once". The agent reads
//! it at every start to tell a first boot of the new slot (run the health check) from a
//! fallback (report "rolled back" with the reason) or a write cut short ("interrupted").

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::slot::Slot;

/// The journal format this crate writes.
pub const FORMAT: u32 = 1;
/// Largest journal read.
pub const MAX_SIZE: u64 = 64 * 1024;
/// Longest reason kept (a longer one is cut).
pub const MAX_REASON: usize = 1000;

/// The journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Journal {
    /// [`FORMAT`].
    pub format: u32,
    /// The update in progress, if any.
    #[serde(default)]
    pub pending: Option<Pending>,
    /// How the last update ended.
    #[serde(default)]
    pub last: Option<Outcome>,
}

/// Where an update in progress is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The inactive slot is being written (it is marked bad in the boot state).
    Writing,
    /// The slot is written and verified, and the boot state tries it once at the next boot.
    Armed,
}

/// An update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pending {
    /// Its phase.
    pub phase: Phase,
    /// The slot running when it started.
    pub from: Slot,
    /// The slot it writes.
    pub to: Slot,
    /// The version it installs.
    pub version: String,
    /// The version running when it started.
    pub from_version: String,
    /// The image's sha256.
    pub sha256: String,
    /// The image's size.
    pub size: u64,
    /// When it started (ms since the Unix epoch).
    pub started_ms: u64,
    /// Why the new slot's first boot failed its health check (set before the agent reboots
    /// back, so the old slot can report it).
    #[serde(default)]
    pub failure: Option<String>,
}

/// How an update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// The new slot passed its health check and is the active one.
    Committed,
    /// The new slot failed its first boot; the board is back on the old one.
    RolledBack,
    /// The update stopped while writing (power loss, crash); the old slot runs on.
    Interrupted,
    /// `lichen update` failed before arming (the reason says why); the old slot runs on.
    Failed,
}

impl OutcomeKind {
    /// The word users read: `committed`, `rolled back`, `interrupted`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Committed => "committed",
            OutcomeKind::RolledBack => "rolled back",
            OutcomeKind::Interrupted => "interrupted",
            OutcomeKind::Failed => "failed",
        }
    }
}

/// How the last update ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Outcome {
    /// The result.
    pub result: OutcomeKind,
    /// The version it tried to install.
    pub version: String,
    /// The version running before.
    pub from_version: String,
    /// The slot it wrote.
    pub slot: Slot,
    /// Why (for anything but committed).
    #[serde(default)]
    pub reason: Option<String>,
    /// When it ended (ms since the Unix epoch).
    pub at_ms: u64,
}

impl Outcome {
    /// One line for `lichen doctor` and the event log.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "update {} -> {} (slot {}) {}",
            self.from_version,
            self.version,
            self.slot,
            self.result.as_str()
        );
        if let Some(reason) = &self.reason {
            text.push_str(": ");
            text.push_str(reason);
        }
        text
    }
}

/// Cuts `reason` to [`MAX_REASON`] characters.
pub fn bounded_reason(reason: &str) -> String {
    if reason.chars().count() <= MAX_REASON {
        reason.to_string()
    } else {
        let mut cut: String = reason.chars().take(MAX_REASON).collect();
        cut.push_str("...");
        cut
    }
}

/// What can go wrong with the journal file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("{what} the update journal {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a journal this agent reads.
    #[error("the update journal {path} is unreadable: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The journal's file.
#[derive(Debug, Clone)]
pub struct JournalFile {
    path: PathBuf,
}

impl JournalFile {
    /// The journal under a state directory: `<state>/update/journal.json`.
    pub fn in_state_dir(state_dir: &Path) -> JournalFile {
        JournalFile {
            path: state_dir.join("update").join("journal.json"),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the journal; a missing file is an empty journal.
    pub fn load(&self) -> Result<Journal, JournalError> {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Journal {
                    format: FORMAT,
                    ..Journal::default()
                });
            }
            Err(source) => {
                return Err(JournalError::Io {
                    what: "opening",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let mut bytes = Vec::new();
        file.take(MAX_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| JournalError::Io {
                what: "reading",
                path: self.path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_SIZE {
            return Err(JournalError::Corrupt {
                path: self.path.clone(),
                reason: format!("larger than {MAX_SIZE} bytes"),
            });
        }
        let journal: Journal =
            serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        if journal.format != FORMAT {
            return Err(JournalError::Corrupt {
                path: self.path.clone(),
                reason: format!("format {}, this agent reads {FORMAT}", journal.format),
            });
        }
        Ok(journal)
    }

    /// Replaces the journal atomically: a new file flushed, renamed over the old, and the
    /// directory flushed.
    pub fn save(&self, journal: &Journal) -> Result<(), JournalError> {
        let io = |what, source| JournalError::Io {
            what,
            path: self.path.clone(),
            source,
        };
        let dir = self
            .path
            .parent()
            .expect("the journal path has a directory");
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        let tmp = self.path.with_extension("json.new");
        let bytes = serde_json::to_vec_pretty(journal).expect("a journal serialises");
        let mut file = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replacing", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("flushing the directory of", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = JournalFile::in_state_dir(dir.path());
        assert_eq!(file.load().unwrap().pending, None);
        let journal = Journal {
            format: FORMAT,
            pending: Some(Pending {
                phase: Phase::Armed,
                from: Slot::A,
                to: Slot::B,
                version: "2".into(),
                from_version: "1".into(),
                sha256: "a".repeat(64),
                size: 10,
                started_ms: 1,
                failure: None,
            }),
            last: Some(Outcome {
                result: OutcomeKind::RolledBack,
                version: "2".into(),
                from_version: "1".into(),
                slot: Slot::B,
                reason: Some("workload counter failed".into()),
                at_ms: 2,
            }),
        };
        file.save(&journal).unwrap();
        assert_eq!(file.load().unwrap(), journal);
        assert_eq!(
            journal.last.unwrap().describe(),
            "update 1 -> 2 (slot B) rolled back: workload counter failed"
        );
    }

    #[test]
    fn a_damaged_journal_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = JournalFile::in_state_dir(dir.path());
        std::fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        std::fs::write(file.path(), b"{\"format\": 9}").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(
            err.contains("journal.json") && err.contains("format 9"),
            "{err}"
        );
        std::fs::write(file.path(), vec![b' '; 70_000]).unwrap();
        assert!(file.load().unwrap_err().to_string().contains("larger than"));
        assert_eq!(bounded_reason(&"x".repeat(2000)).len(), MAX_REASON + 3);
    }
}
