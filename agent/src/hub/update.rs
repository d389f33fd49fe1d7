//! System updates pushed by the hub (A/B boards): a desired state may name a signed update
//! bundle in its `system` field (version, target, size, sha256), signed with the rest of the
//! desired state ([`super::signed_bytes`]).
//!
//! - The fields are checked before anything is fetched: a node without `[update]`, another
//!   target, a size over [`MAX_SYSTEM_BUNDLE_SIZE`] or a malformed field rejects the desired
//!   state, naming the field, and nothing changes.
//! - When the booted system already has that version, the update is done: the deployment of
//!   the desired state is applied as usual. When that version is armed (written, waiting for
//!   the reboot) the node waits. When the journal says an update to that version was rolled
//!   back, the desired state is rejected with the rollback's reason (the hub must send another
//!   version; the node does not loop writing a system that failed its health check).
//! - Otherwise the bundle travels as an artifact named by its sha256, through the chunked,
//!   resumable transfer of [`super::fetch`] (bounded by the signed size, resumed after a
//!   disconnect or a restart). The deployment and its artifacts wait for the new system.
//! - The assembled bundle is streamed into `<state>/update/incoming/<sha256>.lub` while
//!   hashing; then verified as `lichen update` verifies (the bundle's own signature by
//!   `update.trusted-keys` and `hub.trusted-keys`, its target), its manifest must say the
//!   signed version and target, it is written to the inactive slot, the boot state is armed to
//!   try it once, and the board's reboot command runs, as `lichen update` does.
//!
//! Reported state's `system.hub-update` says where the push stands (`fetching`, `writing`,
//! `armed`, `rejected` with the reason).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lichen_sync::{MAX_ARTIFACT_SIZE, Manifest, is_digest};
use lichen_update::journal::{JournalFile, OutcomeKind, Phase};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Bridge, DesiredState, artifacts::ChunkStore, now_ms};
use crate::update::SystemSource;

/// Largest update bundle a hub may push (the artifact transfer's own bound).
pub const MAX_SYSTEM_BUNDLE_SIZE: u64 = MAX_ARTIFACT_SIZE;
/// Longest `system.version` and `system.target`, in bytes.
pub const MAX_SYSTEM_NAME: usize = 64;

/// The `system` field of a desired state: the update bundle the node should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SystemUpdate {
    /// The system version the bundle holds (its manifest's `version`).
    pub version: String,
    /// The target it is for (the node's `update.target`).
    pub target: String,
    /// Size of the bundle file in bytes (at most [`MAX_SYSTEM_BUNDLE_SIZE`]).
    pub size: u64,
    /// sha256 of the bundle file, 64 lowercase hex digits: its artifact name.
    pub sha256: String,
}

impl SystemUpdate {
    /// The line it adds to the signed bytes (fields checked by [`SystemUpdate::validate`]
    /// hold no space or newline).
    pub fn signed_line(&self) -> String {
        format!(
            "system {} {} {} {}\n",
            self.version, self.target, self.size, self.sha256
        )
    }

    /// Checks each field alone; the error names it.
    pub fn validate(&self) -> Result<(), BadField> {
        for (field, value) in [("version", &self.version), ("target", &self.target)] {
            if value.is_empty()
                || value.len() > MAX_SYSTEM_NAME
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
            {
                return Err(BadField::Name {
                    field,
                    value: value.clone(),
                });
            }
        }
        if !is_digest(&self.sha256) {
            return Err(BadField::Digest(self.sha256.clone()));
        }
        if self.size == 0 || self.size > MAX_SYSTEM_BUNDLE_SIZE {
            return Err(BadField::Size(self.size));
        }
        Ok(())
    }
}

/// A field of a desired state's `system` that is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadField {
    /// `version` or `target` is empty, too long or has another character.
    #[error(
        "system.{field} {value:?} must be 1 to {MAX_SYSTEM_NAME} characters of A-Z a-z 0-9 . _ + -"
    )]
    Name {
        /// `version` or `target`.
        field: &'static str,
        /// What it holds.
        value: String,
    },
    /// `sha256` is not a digest.
    #[error("system.sha256 {0:?} is not a sha256 digest (64 lowercase hex digits)")]
    Digest(String),
    /// `size` is zero or over the bound.
    #[error("system.size {0} is outside 1 to {MAX_SYSTEM_BUNDLE_SIZE} bytes")]
    Size(u64),
}

/// Why a desired state's system update is rejected.
#[derive(Debug, thiserror::Error)]
pub(super) enum Rejected {
    /// A field is out of bounds.
    #[error(transparent)]
    Field(#[from] BadField),
    /// The node has no A/B slots.
    #[error(
        "system: names update {version} but this node has no [update] section (no A/B slots): it takes no system updates"
    )]
    NoSlots {
        /// The version asked for.
        version: String,
    },
    /// The node's A/B system cannot be read.
    #[error("system: cannot read this node's A/B system: {0}")]
    Board(#[source] lichen_update::board::UpdateError),
    /// The update is for another target.
    #[error("system.target is {asked:?}; this node's target is {own:?}")]
    OtherTarget {
        /// The update's target.
        asked: String,
        /// This node's.
        own: String,
    },
    /// The update journal cannot be read.
    #[error("system: cannot read the update journal: {0}")]
    Journal(#[source] lichen_update::journal::JournalError),
    /// That version was tried here and rolled back.
    #[error("system.version {version} was tried and rolled back ({reason}); send another version")]
    RolledBack {
        /// The version.
        version: String,
        /// The recorded reason, or `no reason recorded`.
        reason: String,
    },
}

/// What a desired state's system update asks of the node now.
pub(super) enum SystemStep {
    /// No update named, or the booted system already has its version: apply the deployment.
    Deploy,
    /// That version is written and armed; the node waits for the reboot.
    Wait,
    /// Fetch the bundle (digest, size) first.
    Fetch(String, u64),
}

/// Where the last pushed update stands, for reported state.
pub(super) struct Push {
    version: String,
    phase: &'static str,
    detail: Option<String>,
    at_ms: u64,
}

impl Push {
    fn new(version: &str, phase: &'static str, detail: Option<String>) -> Self {
        Push {
            version: version.to_owned(),
            phase,
            detail,
            at_ms: now_ms(),
        }
    }
}

/// Decides [`SystemStep`] for `update` on the board `source` (reads the running system and
/// the update journal). An error is the reason to reject the desired state.
fn step(source: Option<&SystemSource>, update: &SystemUpdate) -> Result<SystemStep, Rejected> {
    update.validate()?;
    let Some(source) = source else {
        return Err(Rejected::NoSlots {
            version: update.version.clone(),
        });
    };
    let board = source.board().map_err(Rejected::Board)?;
    if update.target != board.system().target {
        return Err(Rejected::OtherTarget {
            asked: update.target.clone(),
            own: board.system().target.clone(),
        });
    }
    if board.system().version == update.version {
        return Ok(SystemStep::Deploy);
    }
    let journal = JournalFile::in_state_dir(source.state_dir())
        .load()
        .map_err(Rejected::Journal)?;
    if let Some(p) = &journal.pending
        && p.version == update.version
        && matches!(p.phase, Phase::Armed)
    {
        return Ok(SystemStep::Wait);
    }
    if let Some(last) = &journal.last
        && last.version == update.version
        && matches!(last.result, OutcomeKind::RolledBack)
    {
        return Err(Rejected::RolledBack {
            version: update.version.clone(),
            reason: last
                .reason
                .clone()
                .unwrap_or_else(|| "no reason recorded".to_string()),
        });
    }
    Ok(SystemStep::Fetch(update.sha256.clone(), update.size))
}

/// Where a pushed bundle is assembled.
fn incoming(state_dir: &Path, digest: &str) -> PathBuf {
    state_dir
        .join("update")
        .join("incoming")
        .join(format!("{digest}.lub"))
}

/// Streams the stored chunks of `manifest` into `out` (synced), hashing as it goes; fails
/// unless the result is exactly the signed size and digest.
fn assemble_to_file(chunks: &ChunkStore, manifest: &Manifest, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    // Chunk indices are u32 on the wire; a manifest's chunk count was bounded when it was read.
    for (index, _) in (0u32..).zip(&manifest.chunks) {
        let path = chunks.chunk_path(&manifest.digest, index)?;
        // A stored chunk was checked against the manifest: at most its chunk size.
        let mut bytes = Vec::new();
        fs::File::open(&path)
            .and_then(|f| {
                f.take(u64::from(manifest.chunk_size) + 1)
                    .read_to_end(&mut bytes)
            })
            .with_context(|| format!("reading {}", path.display()))?;
        total += bytes.len() as u64;
        hash.update(&bytes);
        file.write_all(&bytes)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    let digest = hex::encode(hash.finalize());
    if total != manifest.size || digest != manifest.digest {
        bail!(
            "the assembled bundle is {total} bytes with sha256 {digest}, not the signed {} bytes with system.sha256 {}",
            manifest.size,
            manifest.digest
        );
    }
    Ok(())
}

/// The operator's side (`lichen hub deploy --update BUNDLE`): reads a bundle from `lichen hub
/// update-bundle` (at most [`MAX_SYSTEM_BUNDLE_SIZE`] bytes) and describes it for the
/// desired state from its manifest. Returns the description and the bytes to publish.
pub fn describe_bundle(path: &Path) -> Result<(SystemUpdate, Vec<u8>)> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SYSTEM_BUNDLE_SIZE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_SYSTEM_BUNDLE_SIZE {
        bail!(
            "{} is over the {MAX_SYSTEM_BUNDLE_SIZE}-byte limit for bundles pushed over MQTT",
            path.display()
        );
    }
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut manifest = None;
    for entry in archive
        .entries()
        .with_context(|| format!("{} is not an update bundle (tar)", path.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", path.display()))?;
        if entry.path().is_ok_and(|p| p == Path::new("manifest.json")) {
            let mut text = Vec::new();
            entry
                .by_ref()
                .take(64 * 1024)
                .read_to_end(&mut text)
                .with_context(|| format!("reading the manifest of {}", path.display()))?;
            manifest = Some(lichen_update::bundle::parse_manifest(path, &text)?);
            break;
        }
    }
    let manifest = manifest.with_context(|| format!("{} has no manifest.json", path.display()))?;
    let update = SystemUpdate {
        version: manifest.version,
        target: manifest.target,
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&bytes)),
    };
    update.validate()?;
    Ok((update, bytes))
}

impl Bridge {
    /// What `desired`'s system update asks now; a rejection is already recorded when `None`.
    pub(super) async fn system_step(&mut self, desired: &DesiredState) -> Option<SystemStep> {
        let Some(update) = &desired.system else {
            return Some(SystemStep::Deploy);
        };
        match step(self.system.as_ref(), update) {
            Ok(SystemStep::Fetch(digest, size)) => {
                self.push = Some(Push::new(&update.version, "fetching", None));
                Some(SystemStep::Fetch(digest, size))
            }
            Ok(step) => Some(step),
            Err(rejected) => {
                let reason = rejected.to_string();
                self.push = Some(Push::new(&update.version, "rejected", Some(reason.clone())));
                self.rejected_messages += 1;
                self.reject(Some(desired), reason).await;
                None
            }
        }
    }

    /// The bundle of the pending desired state has all its chunks: assemble, verify, write
    /// the inactive slot, arm it and reboot. `Err` is a whole-file mismatch (a forged
    /// manifest with chunks to match): the transfer goes on.
    pub(super) async fn finish_system_bundle(&mut self, manifest: Manifest) -> Result<(), String> {
        let (Some(pending), Some(source)) = (self.pending.as_ref(), self.system.clone()) else {
            return Ok(());
        };
        let desired = pending.desired.clone();
        let Some(update) = desired.system.clone() else {
            return Ok(());
        };
        let path = incoming(source.state_dir(), &manifest.digest);
        let chunks = self.chunks.clone();
        let assembled = {
            let (manifest, path) = (manifest.clone(), path.clone());
            tokio::task::spawn_blocking(move || assemble_to_file(&chunks, &manifest, &path)).await
        };
        match assembled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = fs::remove_file(&path);
                return Err(format!("{e:#}"));
            }
            Err(e) => return Err(format!("assembly task failed: {e}")),
        }
        self.cancel_pending();
        self.chunks.remove(&manifest.digest);
        self.push = Some(Push::new(&update.version, "writing", None));
        self.publish_reported().await;
        let keys = self.keys.clone();
        let applied = {
            let (path, update) = (path.clone(), update.clone());
            tokio::task::spawn_blocking(move || {
                source.apply_pushed(&path, &update.version, &update.target, &keys)
            })
            .await
        };
        let _ = fs::remove_file(&path);
        let result = match applied {
            Ok(r) => r,
            Err(e) => Err(format!("update task failed: {e}")),
        };
        match result {
            Ok((summary, reboot)) => {
                tracing::info!("system update {} from the hub: {summary}", update.version);
                let _ = self
                    .store
                    .log_event(None, "update-armed", &summary)
                    .await
                    .map_err(|e| tracing::warn!("cannot log the update: {e}"));
                self.push = Some(Push::new(&update.version, "armed", Some(summary)));
                self.publish_reported().await;
                // The reboot request, as `lichen update` makes it.
                let rebooted =
                    tokio::task::spawn_blocking(move || crate::update::reboot(&reboot)).await;
                if let Ok(Err(e)) | Err(e) = rebooted.map_err(anyhow::Error::from) {
                    self.error(format!("system update {}: {e:#}", update.version));
                    self.publish_reported().await;
                }
            }
            Err(reason) => {
                let reason = format!("system update {}: {reason}", update.version);
                self.push = Some(Push::new(&update.version, "rejected", Some(reason.clone())));
                self.rejected_messages += 1;
                self.reject(Some(&desired), reason).await;
            }
        }
        Ok(())
    }

    /// Reported state's `system`: the board's, with `hub-update` (the last pushed update).
    pub(super) fn system_reported(&self) -> Option<serde_json::Value> {
        let mut value = self.system.as_ref()?.reported();
        if let (Some(object), Some(push)) = (value.as_object_mut(), &self.push) {
            object.insert(
                "hub-update".into(),
                serde_json::json!({
                    "version": push.version,
                    "phase": push.phase,
                    "detail": push.detail,
                    "at-ms": push.at_ms,
                }),
            );
        }
        Some(value)
    }

    /// Part of [`Bridge::seen_now`]: where the push stands.
    pub(super) fn push_seen(&self) -> String {
        self.push
            .as_ref()
            .map(|p| format!("|push:{}:{}", p.version, p.phase))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> SystemUpdate {
        SystemUpdate {
            version: "2".into(),
            target: "x86_64".into(),
            size: 10,
            sha256: "a".repeat(64),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        type Break = fn(&mut SystemUpdate);
        let cases: [(&str, Break); 5] = [
            ("system.version", |u| u.version = "2 3".into()),
            ("system.target", |u| u.target = String::new()),
            ("system.sha256", |u| u.sha256 = "A".repeat(64)),
            ("system.size", |u| u.size = MAX_SYSTEM_BUNDLE_SIZE + 1),
            ("system.size", |u| u.size = 0),
        ];
        assert_eq!(update().validate(), Ok(()));
        for (field, break_it) in cases {
            let mut u = update();
            break_it(&mut u);
            let err = u.validate().expect_err(field);
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn a_node_without_update_refuses_a_system_update() {
        let err = step(None, &update()).err().expect("refused");
        assert!(err.to_string().contains("no [update] section"), "{err}");
    }
}
