//! A board under A/B updates: applying a verified bundle to the inactive slot, and what to do
//! at each start of the agent (confirm the boot, run the health check of a new slot's first
//! boot, or report a rollback or an interrupted update).
//!
//! The order of the writes is what keeps a board bootable through a power cut at any point:
//!
//! | step | journal | boot state | a power cut here boots |
//! | --- | --- | --- | --- |
//! | 1 | `writing` | | the old slot |
//! | 2 | | new slot marked bad (0 tries, last) | the old slot |
//! | 3 | | (new slot written, read back, trailer) | the old slot |
//! | 4 | `armed` | | the old slot |
//! | 5 | | new slot first, 1 try; old slot 3 | the new slot once, then the old |
//! | 6 | reboot | | |
//!
//! At the new slot's first boot the agent runs the health check: pass ([`Board::commit`]):
//! new slot active with 3 tries, journal `committed`; fail ([`Board::reject`]): the reason in
//! the journal, new slot marked bad, reboot. A crash, hang or power cut before a verdict
//! leaves the new slot with no tries, so the boot loader takes the old one, whose agent finds
//! the journal `armed` for the other slot and reports "rolled back" ([`decide`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bootstate::{BootState, BootStateError, BootStore};
use crate::bundle::{BundleError, VerifiedBundle, Verifier, open_verified};
use crate::config::{ConfigError, UpdateConfig};
use crate::journal::{
    Journal, JournalError, JournalFile, Outcome, OutcomeKind, Pending, Phase, bounded_reason,
};
use crate::slot::{Slot, SlotError, SlotTrailer, booted_slot, valid_name};
use crate::writer::{WriteError, WriteReport, write_slot};

/// Largest system.json read.
const MAX_SYSTEM_FILE: u64 = 4096;
/// Largest mount table read.
const MAX_MOUNTS: u64 = 1 << 20;

/// Anything that stops an update or a start decision.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// `[update]` is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A slot cannot be found or read.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The boot state cannot be read or written as asked.
    #[error("boot state: {0}")]
    BootState(#[from] BootStateError),
    /// The journal cannot be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The bundle is refused.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Writing the slot failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The running system's description cannot be read.
    #[error("{path}: {source}")]
    SystemRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The running system's description is not its JSON document.
    #[error("{path}: {source}")]
    SystemJson {
        /// The file.
        path: PathBuf,
        /// What the JSON reader says.
        source: serde_json::Error,
    },
    /// The running system's version or target is not a valid name.
    #[error("{path}: version and target must be 1-64 letters, digits and . _ + -")]
    SystemNames {
        /// The file.
        path: PathBuf,
    },
    /// The boot state is unreadable, so no update starts.
    #[error("cannot read the boot state ({0}): refusing to update")]
    BootStateUnreadable(#[source] BootStateError),
    /// A file of the board's init (`update.confirm-file`) cannot be written.
    #[error("cannot write {path}: {source}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The update is refused in this state.
    #[error("{0}")]
    Refused(String),
}

/// The running root's description (`/etc/lichen/system.json`, written by images/build).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemInfo {
    /// Its version.
    pub version: String,
    /// Its target.
    pub target: String,
}

/// Reads system.json.
pub fn read_system(path: &Path) -> Result<SystemInfo, UpdateError> {
    let text = read_small(path, MAX_SYSTEM_FILE).map_err(|source| UpdateError::SystemRead {
        path: path.to_path_buf(),
        source,
    })?;
    let info: SystemInfo =
        serde_json::from_str(&text).map_err(|source| UpdateError::SystemJson {
            path: path.to_path_buf(),
            source,
        })?;
    if !valid_name(&info.version) || !valid_name(&info.target) {
        return Err(UpdateError::SystemNames {
            path: path.to_path_buf(),
        });
    }
    Ok(info)
}

/// Reads at most `max` bytes of a regular file (never a FIFO or a device).
fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(max).read_to_string(&mut text)?;
    Ok(text)
}

/// What a start of the agent finds (see [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartDecision {
    /// No update in progress.
    Normal,
    /// An update is armed and the board has not rebooted into it yet.
    AwaitingReboot(Pending),
    /// This is the new slot's first boot: run the health check.
    Trial(Pending),
    /// The update stopped while writing.
    Interrupted(Pending),
    /// The new slot's first boot failed; the board is back on the old slot.
    RolledBack(Pending, String),
}

/// Decides what a start means from the journal, the booted slot and the boot state.
pub fn decide(journal: &Journal, booted: Slot, state: &BootState) -> StartDecision {
    let Some(pending) = journal.pending.clone() else {
        return StartDecision::Normal;
    };
    match pending.phase {
        Phase::Writing => StartDecision::Interrupted(pending),
        Phase::Armed if booted == pending.to => StartDecision::Trial(pending),
        Phase::Armed => {
            if state.order[0] == pending.to && state.left(pending.to) > 0 {
                StartDecision::AwaitingReboot(pending)
            } else {
                let reason = pending.failure.clone().unwrap_or_else(|| {
                    format!(
                        "slot {} did not confirm its first boot (a crash, a hang or a power cut before its health check passed)",
                        pending.to
                    )
                });
                StartDecision::RolledBack(pending, reason)
            }
        }
    }
}

/// What the agent must do after [`Board::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Confirm the boot; `outcome` is an update that just ended (to report).
    Confirmed {
        /// A rollback or interruption found at this start.
        outcome: Option<Outcome>,
    },
    /// Confirm the boot; an update waits for a reboot.
    AwaitingReboot(Pending),
    /// Run the health check, then [`Board::commit`] or [`Board::reject`].
    Trial(Pending),
    /// The new slot is not what the bundle said; it has been rejected: reboot.
    Rejected(Pending, String),
}

/// The slots, the boot state and the journal of this board.
pub struct Board {
    config: UpdateConfig,
    boot: Box<dyn BootStore>,
    journal: JournalFile,
    booted: Slot,
    system: SystemInfo,
}

/// What `lichen doctor` shows.
#[derive(Debug)]
pub struct Status {
    /// The booted slot.
    pub booted: Slot,
    /// The running system.
    pub system: SystemInfo,
    /// Where the boot state lives.
    pub boot_store: String,
    /// The boot state, or why it is unreadable.
    pub state: Result<BootState, BootStateError>,
    /// The other slot's trailer, or why it is unreadable.
    pub other: Result<Option<SlotTrailer>, SlotError>,
    /// The journal, or why it is unreadable.
    pub journal: Result<Journal, JournalError>,
}

/// What an applied update did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The slot written.
    pub slot: Slot,
    /// Its device.
    pub device: PathBuf,
    /// The version written.
    pub version: String,
    /// The write.
    pub write: WriteReport,
    /// The boot state armed.
    pub state: BootState,
}

impl Board {
    /// Opens the board: the configuration, the boot state store, the journal under
    /// `state_dir`, the booted slot and the running system.
    pub fn open(config: &UpdateConfig, state_dir: &Path) -> Result<Board, UpdateError> {
        config.validate()?;
        let boot = config.boot_store()?;
        let booted = booted_slot(&config.cmdline)?;
        let system = read_system(&config.system_file)?;
        if system.target != config.target {
            return Err(UpdateError::Refused(format!(
                "{} says target {:?} but update.target is {:?}",
                config.system_file.display(),
                system.target,
                config.target
            )));
        }
        Ok(Board {
            config: config.clone(),
            boot,
            journal: JournalFile::in_state_dir(state_dir),
            booted,
            system,
        })
    }

    /// The booted slot.
    pub fn booted(&self) -> Slot {
        self.booted
    }

    /// The running system.
    pub fn system(&self) -> &SystemInfo {
        &self.system
    }

    /// The health-check deadline.
    pub fn health_deadline(&self) -> std::time::Duration {
        self.config
            .health_deadline()
            .expect("validated when the board was opened")
    }

    /// The reboot command; `trial` adds what the boot loader needs to start a trial boot.
    pub fn reboot_command(&self, trial: bool) -> Vec<String> {
        let mut command = self.config.reboot_command.clone();
        if trial {
            command.extend(self.boot.trial_reboot_args());
        }
        command
    }

    /// The state for `lichen doctor`.
    pub fn status(&self) -> Status {
        let other = self
            .config
            .device(self.booted.other())
            .and_then(|dev| SlotTrailer::read(&dev));
        Status {
            booted: self.booted,
            system: self.system.clone(),
            boot_store: self.boot.describe(),
            state: self.boot.load(),
            other,
            journal: self.journal.load(),
        }
    }

    /// Verifies a bundle for this board's target (see [`open_verified`]).
    pub fn verify(
        &self,
        bundle: &Path,
        verifier: &dyn Verifier,
    ) -> Result<VerifiedBundle, UpdateError> {
        Ok(open_verified(bundle, &self.config.target, verifier)?)
    }

    /// Writes a verified bundle to the inactive slot and arms it (steps 1-5 of the module
    /// docs). On `Ok` the board boots the new slot once at its next reboot; on `Err` the boot
    /// state still boots the running slot, and the reboot must not happen.
    pub fn apply(
        &self,
        bundle: &VerifiedBundle,
        now_ms: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ApplyReport, UpdateError> {
        let mut journal = self.journal.load()?;
        if let Some(p) = &journal.pending
            && p.phase == Phase::Armed
        {
            return Err(UpdateError::Refused(if p.to == self.booted {
                format!(
                    "slot {} is on its first boot after the update to {}: wait for its health check",
                    p.to, p.version
                )
            } else {
                format!(
                    "the update to {} is armed in slot {}: reboot to try it first",
                    p.version, p.to
                )
            }));
        }
        let target = self.booted.other();
        let device = self.config.device(target)?;
        self.refuse_if_mounted(&device)?;
        let mut state = self.boot.load().map_err(UpdateError::BootStateUnreadable)?;
        let manifest = &bundle.manifest;
        let pending = Pending {
            phase: Phase::Writing,
            from: self.booted,
            to: target,
            version: manifest.version.clone(),
            from_version: self.system.version.clone(),
            sha256: manifest.image.sha256.clone(),
            size: manifest.image.size,
            started_ms: now_ms,
            failure: None,
        };
        journal.pending = Some(pending.clone());
        self.journal.save(&journal)?;

        let fail = |journal: &mut Journal, err: UpdateError| -> UpdateError {
            journal.pending = None;
            journal.last = Some(Outcome {
                result: OutcomeKind::Failed,
                version: pending.version.clone(),
                from_version: pending.from_version.clone(),
                slot: target,
                reason: Some(bounded_reason(&err.to_string())),
                at_ms: now_ms,
            });
            let _ = self.journal.save(journal);
            err
        };

        state.mark_bad(target);
        if let Err(e) = self.boot.store(&state) {
            return Err(fail(&mut journal, e.into()));
        }
        let trailer = SlotTrailer {
            version: manifest.version.clone(),
            target: manifest.target.clone(),
            size: manifest.image.size,
            sha256: manifest.image.sha256.clone(),
        };
        let write = bundle
            .image()
            .map_err(UpdateError::from)
            .and_then(|mut image| {
                write_slot(
                    &device,
                    &mut image,
                    manifest.image.size,
                    &manifest.image.sha256,
                    &trailer,
                    progress,
                )
                .map_err(UpdateError::from)
            });
        let write = match write {
            Ok(write) => write,
            Err(e) => return Err(fail(&mut journal, e)),
        };
        journal.pending = Some(Pending {
            phase: Phase::Armed,
            ..pending.clone()
        });
        self.journal.save(&journal)?;
        state.try_once(target);
        if let Err(e) = self.boot.store(&state) {
            // Leave the new slot unbootable, as it was.
            state.mark_bad(target);
            let _ = self.boot.store(&state);
            return Err(fail(
                &mut journal,
                UpdateError::Refused(format!(
                    "the boot state could not be armed and verified ({e}): not rebooting"
                )),
            ));
        }
        Ok(ApplyReport {
            slot: target,
            device,
            version: manifest.version.clone(),
            write,
            state,
        })
    }

    fn refuse_if_mounted(&self, device: &Path) -> Result<(), UpdateError> {
        let Ok(mounts) = read_small(&self.config.mounts, MAX_MOUNTS) else {
            return Ok(());
        };
        let canonical = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
        for line in mounts.lines() {
            let Some(source) = line.split_whitespace().next() else {
                continue;
            };
            let source = Path::new(source);
            if source == device || std::fs::canonicalize(source).ok().as_deref() == Some(&canonical)
            {
                return Err(UpdateError::Refused(format!(
                    "slot {} ({}) is mounted: refusing to write it",
                    self.booted.other(),
                    device.display()
                )));
            }
        }
        Ok(())
    }

    /// At the agent's start: decides what this boot is and does the bookkeeping of a
    /// rollback or an interrupted update (boot state first, then the journal, so a crash in
    /// between decides the same again).
    pub fn start(&self, now_ms: u64) -> Result<Start, UpdateError> {
        let mut journal = self.journal.load()?;
        let mut state = self.boot.load()?;
        let decision = decide(&journal, self.booted, &state);
        let finish = |journal: &mut Journal, p: &Pending, result, reason: String| {
            journal.pending = None;
            let outcome = Outcome {
                result,
                version: p.version.clone(),
                from_version: p.from_version.clone(),
                slot: p.to,
                reason: Some(bounded_reason(&reason)),
                at_ms: now_ms,
            };
            journal.last = Some(outcome.clone());
            outcome
        };
        match decision {
            StartDecision::Normal => {
                self.store_if_changed(&state, |s| s.mark_good(self.booted))?;
                Ok(Start::Confirmed { outcome: None })
            }
            StartDecision::AwaitingReboot(p) => Ok(Start::AwaitingReboot(p)),
            StartDecision::Trial(p) => {
                if self.system.version != p.version {
                    let reason = format!(
                        "slot {} runs version {:?}, the bundle said {:?}",
                        p.to, self.system.version, p.version
                    );
                    self.reject(&p, &reason)?;
                    return Ok(Start::Rejected(p, reason));
                }
                Ok(Start::Trial(p))
            }
            StartDecision::Interrupted(p) => {
                state.mark_bad(p.to);
                self.store_if_changed(&state, |s| s.mark_good(self.booted))?;
                let reason = format!(
                    "it stopped while writing slot {} (a power cut or a crash); slot {} holds no complete image",
                    p.to, p.to
                );
                let outcome = finish(&mut journal, &p, OutcomeKind::Interrupted, reason);
                self.journal.save(&journal)?;
                Ok(Start::Confirmed {
                    outcome: Some(outcome),
                })
            }
            StartDecision::RolledBack(p, reason) => {
                state.mark_bad(p.to);
                state.mark_good(self.booted);
                self.boot.store(&state)?;
                let outcome = finish(&mut journal, &p, OutcomeKind::RolledBack, reason);
                self.journal.save(&journal)?;
                Ok(Start::Confirmed {
                    outcome: Some(outcome),
                })
            }
        }
    }

    fn store_if_changed(
        &self,
        state: &BootState,
        change: impl FnOnce(&mut BootState),
    ) -> Result<(), UpdateError> {
        let mut new = *state;
        change(&mut new);
        let stored = self.boot.load().ok();
        if stored != Some(new) {
            self.boot.store(&new)?;
        }
        Ok(())
    }

    /// The health check passed: the new slot becomes the active one.
    pub fn commit(
        &self,
        pending: &Pending,
        summary: &str,
        now_ms: u64,
    ) -> Result<Outcome, UpdateError> {
        let mut state = self.boot.load()?;
        state.mark_active(pending.to);
        self.boot.store(&state)?;
        let mut journal = self.journal.load()?;
        journal.pending = None;
        let outcome = Outcome {
            result: OutcomeKind::Committed,
            version: pending.version.clone(),
            from_version: pending.from_version.clone(),
            slot: pending.to,
            reason: Some(bounded_reason(summary)),
            at_ms: now_ms,
        };
        journal.last = Some(outcome.clone());
        self.journal.save(&journal)?;
        Ok(outcome)
    }

    /// The health check failed: the reason goes to the journal (for the old slot to report)
    /// and the new slot is marked bad; the caller reboots. The new slot has no tries left
    /// since the boot loader took its one, so the reboot reaches the old slot even if the
    /// boot state cannot be written.
    pub fn reject(&self, pending: &Pending, reason: &str) -> Result<(), UpdateError> {
        let mut journal = self.journal.load()?;
        if let Some(p) = journal.pending.as_mut() {
            p.failure = Some(bounded_reason(&format!("health check failed: {reason}")));
        }
        self.journal.save(&journal)?;
        let mut state = self.boot.load()?;
        state.mark_bad(pending.to);
        self.boot.store(&state)?;
        Ok(())
    }

    /// Tells the board's init that this boot is confirmed (`update.confirm-file`).
    pub fn confirm(&self) -> Result<(), UpdateError> {
        if let Some(path) = &self.config.confirm_file {
            std::fs::write(
                path,
                format!("slot {} version {}\n", self.booted, self.system.version),
            )
            .map_err(|source| UpdateError::WriteFile {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
