//! What the node says about its A/B system: the hub's reported state and hub-pushed updates
//! ([`SystemSource`]) and `lichen doctor`'s rows ([`doctor_checks`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use lichen_update::board::{Board, UpdateError};
use lichen_update::config::UpdateConfig;
use lichen_update::journal::{JournalFile, OutcomeKind, Phase};

use super::TrustedKeys;
use crate::api::types::DoctorCheck;
use crate::config::AgentConfig;
use crate::keys::TrustedKey;
use crate::util::now_ms;

/// Where the hub bridge reads the A/B system from for reported state: the `[update]` section
/// and the agent's state directory (which holds the update journal).
#[derive(Debug, Clone)]
pub struct SystemSource {
    section: UpdateConfig,
    state_dir: PathBuf,
}

impl SystemSource {
    /// The source for a config with `[update]`; `None` on a board without A/B slots.
    pub fn new(config: &AgentConfig, state_dir: &Path) -> Option<SystemSource> {
        Some(SystemSource {
            section: config.update.clone()?,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// The board (config, boot state, booted slot, running system).
    pub(crate) fn board(&self) -> Result<Board, UpdateError> {
        Board::open(&self.section, &self.state_dir)
    }

    /// The agent's state directory (it holds the update journal).
    pub(crate) fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Applies a bundle the hub pushed (the hub link's system update): verified as `lichen update`
    /// verifies it, by `update.trusted-keys` and `hub_keys`; its manifest must say the signed
    /// version and target (`signed_version`, `signed_target`: the hub's `SystemUpdate`).
    /// Returns a summary and the reboot command to run.
    pub(crate) fn apply_pushed(
        &self,
        bundle: &Path,
        signed_version: &str,
        signed_target: &str,
        hub_keys: &[TrustedKey],
    ) -> Result<(String, Vec<String>), String> {
        let mut keys =
            TrustedKeys::from_config(&self.section, None).map_err(|e| format!("{e:#}"))?;
        keys.0.extend(hub_keys.iter().cloned());
        let lock_dir = self.state_dir.join("update");
        std::fs::create_dir_all(&lock_dir)
            .map_err(|e| format!("cannot create {}: {e}", lock_dir.display()))?;
        let lock = std::fs::File::create(lock_dir.join("lock"))
            .map_err(|e| format!("cannot create the update lock: {e}"))?;
        lock.try_lock()
            .map_err(|_| "a `lichen update` is running on this node".to_string())?;
        let board = self.board().map_err(|e| e.to_string())?;
        let bundle = board
            .verify(bundle, &keys)
            .map_err(|e| format!("the bundle is refused: {e}"))?;
        let manifest = &bundle.manifest;
        if manifest.version != signed_version {
            return Err(format!(
                "the bundle's manifest says version {:?}; system.version says {:?}",
                manifest.version, signed_version
            ));
        }
        if manifest.target != signed_target {
            return Err(format!(
                "the bundle's manifest says target {:?}; system.target says {:?}",
                manifest.target, signed_target
            ));
        }
        let report = board
            .apply(&bundle, now_ms(), &mut |_| {})
            .map_err(|e| e.to_string())?;
        let summary = format!(
            "slot {} written with version {} ({} bytes, read back and verified); boot state {}",
            report.slot, report.version, report.write.bytes, report.state
        );
        Ok((summary, board.reboot_command(true)))
    }

    /// What changes reported state's `system`: the journal (an update armed, committed,
    /// rolled back). Cheap: one small file, read every second by the bridge.
    pub fn fingerprint(&self) -> String {
        match JournalFile::in_state_dir(&self.state_dir).load() {
            Ok(journal) => serde_json::to_string(&journal).unwrap_or_default(),
            Err(err) => err.to_string(),
        }
    }

    /// Reported state's `system`: the booted slot and its version, the update in progress
    /// and how the last one ended (`rolled-back` with its reason, ...).
    pub fn reported(&self) -> serde_json::Value {
        use serde_json::json;
        let board = match Board::open(&self.section, &self.state_dir) {
            Ok(board) => board,
            Err(err) => return json!({ "error": format!("cannot read the A/B system: {err}") }),
        };
        let journal = JournalFile::in_state_dir(&self.state_dir).load();
        let (pending, last, error) = match journal {
            Ok(journal) => (journal.pending, journal.last, None),
            Err(err) => (None, None, Some(err.to_string())),
        };
        json!({
            "booted-slot": board.booted().as_str(),
            "version": board.system().version,
            "target": board.system().target,
            "update-in-progress": pending.map(|p| json!({
                "phase": match p.phase { Phase::Writing => "writing", Phase::Armed => "armed" },
                "version": p.version,
                "slot": p.to.as_str(),
            })),
            "last-update": last.map(|o| json!({
                "result": o.result,
                "version": o.version,
                "from-version": o.from_version,
                "slot": o.slot.as_str(),
                "reason": o.reason,
                "at-ms": o.at_ms,
            })),
            "error": error,
        })
    }
}

/// `lichen doctor`'s rows about system updates, for a config with `[update]`.
pub fn doctor_checks(config: &AgentConfig) -> Vec<DoctorCheck> {
    let Some(section) = &config.update else {
        return Vec::new();
    };
    let row = |name: &str, status: &str, detail: String| DoctorCheck {
        name: name.into(),
        status: status.into(),
        detail,
    };
    let state_dir = config
        .state_dir
        .clone()
        .unwrap_or_else(crate::state_dir::default_state_dir);
    let board = match Board::open(section, &state_dir) {
        Ok(board) => board,
        Err(err) => {
            return vec![row(
                "system slot",
                "missing",
                format!("cannot read the A/B system: {err}"),
            )];
        }
    };
    let status = board.status();
    let mut rows = vec![row(
        "system slot",
        "ok",
        format!(
            "booted slot {}: version {} ({})",
            status.booted, status.system.version, status.system.target
        ),
    )];
    rows.push(match &status.state {
        Ok(state) => row(
            "boot state",
            "ok",
            format!("{state} ({})", status.boot_store),
        ),
        Err(err) => row("boot state", "warn", err.to_string()),
    });
    let other = status.booted.other();
    rows.push(match &status.other {
        Ok(Some(t)) => row(
            "other slot",
            "ok",
            format!(
                "slot {other}: version {} ({}, {} bytes, sha256 {})",
                t.version, t.target, t.size, t.sha256
            ),
        ),
        Ok(None) => row(
            "other slot",
            "ok",
            format!("slot {other}: no image named (never written, or its write was cut short)"),
        ),
        Err(err) => row("other slot", "warn", format!("slot {other}: {err}")),
    });
    match &status.journal {
        Ok(journal) => {
            if let Some(p) = &journal.pending {
                let detail = match (p.phase, p.to == status.booted) {
                    (Phase::Armed, true) => format!(
                        "version {} in slot {}: first boot, health check running",
                        p.version, p.to
                    ),
                    (Phase::Armed, false) => format!(
                        "version {} armed in slot {}: the next reboot tries it",
                        p.version, p.to
                    ),
                    (Phase::Writing, _) => {
                        format!("version {} being written to slot {}", p.version, p.to)
                    }
                };
                rows.push(row("update in progress", "ok", detail));
            }
            rows.push(match &journal.last {
                Some(o) => row(
                    "last update",
                    if o.result == OutcomeKind::Committed {
                        "ok"
                    } else {
                        "warn"
                    },
                    o.describe(),
                ),
                None => row("last update", "ok", "none".into()),
            });
        }
        Err(err) => rows.push(row("last update", "warn", err.to_string())),
    }
    rows
}
