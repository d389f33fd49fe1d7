//! System updates on A/B boards, wired into the agent (the logic is in `lichen-update`):
//!
//! - `lichen update BUNDLE` ([`run`]): verifies a bundle against the node's trusted keys and
//!   target, writes it to the inactive slot, arms "try it once" and reboots;
//! - `lichen hub update-bundle` ([`make_bundle`]): signs a root image into a bundle with a
//!   publisher key from `lichen hub keygen`;
//! - at every daemon start ([`start`]): confirms the boot, or runs the health check of a new
//!   slot's first boot and commits it or rolls it back, and logs the outcome as an event;
//! - `lichen doctor` ([`doctor_checks`]): the booted slot, the other slot's version and the
//!   last update's outcome.
//!
//! Signatures use the deployment keys' formats (`hub.trusted-keys`, `lichen hub keygen`); the
//! trusted keys are `update.trusted-keys` plus `hub.trusted-keys`. The outcome is in `lichen
//! events`, `lichen doctor` and the hub's reported state (`system`, [`SystemSource`]).
//!
//! The start-up part is in `update/boot.rs`, the reports in `update/report.rs`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use lichen_update::board::{Board, UpdateError};
use lichen_update::bundle::{BundleSignature, SignatureError, Signer, Verifier};
use lichen_update::config::UpdateConfig;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::config::{AgentConfig, HubSection};
use crate::keys::{TrustedKey, base64_decode, base64_encode, key_id, parse_public_key};
use crate::render::{EXIT_FAILURE, EXIT_INVALID, emit, push_json};
use crate::util::{error_chain, now_ms};

mod boot;
mod report;

pub use boot::{HubProbe, start};
pub use report::{SystemSource, doctor_checks};

/// The configuration `lichen update` reads when `--config` is not given: the board's.
pub const BOARD_CONFIG: &str = "/etc/lichen/lichen.toml";

/// Options of `lichen update`.
#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// The update bundle (from `lichen hub update-bundle`).
    pub bundle: PathBuf,
    /// Agent configuration with the `[update]` section.
    #[arg(long, value_name = "FILE", default_value = BOARD_CONFIG)]
    pub config: PathBuf,
    /// State directory (holds the update journal) [default: from the config].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Write and arm the slot, but do not reboot.
    #[arg(long)]
    pub no_reboot: bool,
}

/// Options of `lichen hub update-bundle`.
#[derive(Debug, Clone, Args)]
pub struct UpdateBundleArgs {
    /// The root slot image (squashfs), e.g. `rootfs.img` from `images/build --rootfs-only`.
    pub rootfs: PathBuf,
    /// The system version the image holds (its /etc/lichen/system.json).
    #[arg(long, value_name = "V")]
    pub system_version: String,
    /// The target it is for (the nodes' update.target): x86_64, arm64, ...
    #[arg(long, value_name = "TARGET")]
    pub target: String,
    /// Publisher private key (PKCS#8, PEM or DER), from `lichen hub keygen`.
    #[arg(long, value_name = "KEYFILE")]
    pub key: PathBuf,
    /// Where to write the bundle.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

/// The node's trusted publisher keys, as a bundle [`Verifier`].
pub struct TrustedKeys(Vec<TrustedKey>);

impl TrustedKeys {
    /// `update.trusted-keys` and `hub.trusted-keys`; a bad key is an error naming it.
    pub fn from_config(update: &UpdateConfig, hub: Option<&HubSection>) -> Result<TrustedKeys> {
        let mut keys = Vec::new();
        for (i, text) in update.trusted_keys.iter().enumerate() {
            keys.push(parse_public_key(text).with_context(|| format!("update.trusted-keys[{i}]"))?);
        }
        for (i, text) in hub
            .map(|h| h.trusted_keys.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            keys.push(parse_public_key(text).with_context(|| format!("hub.trusted-keys[{i}]"))?);
        }
        Ok(TrustedKeys(keys))
    }
}

/// Why the node's trusted keys refuse a bundle's signature.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No key to check against.
    #[error(
        "the bundle is signed, but this node trusts no key (update.trusted-keys and hub.trusted-keys are empty)"
    )]
    NoTrustedKey,
    /// The signature field is not base64.
    #[error("manifest.sig: the signature is not base64: {0}")]
    NotBase64(#[source] SignatureError),
    /// The signature names a key (given) the node does not trust.
    #[error("signed by key {0}, which is not one of this node's trusted keys")]
    UnknownKey(String),
    /// No candidate key verifies the signature.
    #[error("bad signature (the manifest was changed, or signed by another key)")]
    Mismatch,
}

impl TrustedKeys {
    fn check(&self, message: &[u8], sig: &BundleSignature) -> Result<String, VerifyError> {
        if self.0.is_empty() {
            return Err(VerifyError::NoTrustedKey);
        }
        let signature =
            base64_decode(&sig.signature).map_err(|e| VerifyError::NotBase64(e.into()))?;
        let candidates: Vec<&TrustedKey> = match &sig.key_id {
            Some(id) => {
                let found: Vec<_> = self.0.iter().filter(|k| &k.id == id).collect();
                if found.is_empty() {
                    return Err(VerifyError::UnknownKey(id.clone()));
                }
                found
            }
            None => self.0.iter().collect(),
        };
        candidates
            .into_iter()
            .find(|key| {
                UnparsedPublicKey::new(&ED25519, &key.public)
                    .verify(message, &signature)
                    .is_ok()
            })
            .map(|key| key.id.clone())
            .ok_or(VerifyError::Mismatch)
    }
}

impl Verifier for TrustedKeys {
    fn verify(&self, message: &[u8], sig: &BundleSignature) -> Result<String, SignatureError> {
        Ok(self.check(message, sig)?)
    }
}

/// A publisher key from `lichen hub keygen`, as a bundle [`Signer`].
struct PublisherKey(Ed25519KeyPair);

impl PublisherKey {
    fn load(path: &Path) -> Result<PublisherKey> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        // The same PEM or DER forms `lichen hub keygen` writes and deployments are signed with.
        let der = crate::keys::pem_or_der(&bytes)
            .with_context(|| format!("{}: not a PKCS#8 private key", path.display()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| {
            anyhow!(
                "{} is not an ed25519 PKCS#8 private key: {e}",
                path.display()
            )
        })?;
        Ok(PublisherKey(pair))
    }
}

impl Signer for PublisherKey {
    fn sign(&self, message: &[u8]) -> Result<BundleSignature, SignatureError> {
        Ok(BundleSignature {
            key_id: Some(key_id(self.0.public_key().as_ref())),
            signature: base64_encode(self.0.sign(message).as_ref()),
        })
    }
}

/// `lichen hub update-bundle`: signs a root image into a bundle.
pub fn make_bundle(args: UpdateBundleArgs, json: bool) -> Result<ExitCode> {
    let key = PublisherKey::load(&args.key)?;
    let manifest = lichen_update::bundle::write_bundle(
        &args.out,
        &args.system_version,
        &args.target,
        &args.rootfs,
        &key,
    )?;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &manifest);
    } else {
        out.extend_from_slice(
            format!(
                "update bundle {}: version {} for {}, image {} bytes, sha256 {}, signed by key {}\n",
                args.out.display(),
                manifest.version,
                manifest.target,
                manifest.image.size,
                manifest.image.sha256,
                key_id(key.0.public_key().as_ref()),
            )
            .as_bytes(),
        );
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// `lichen update BUNDLE`. Exit 2 when the bundle is refused (nothing changed), 1 on any
/// other failure (the running slot stays the boot slot), 0 when armed (and rebooting).
pub fn run(args: UpdateArgs, json: bool) -> ExitCode {
    match apply(&args, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(err.as_ref()));
            let refused = err.chain().any(|cause| {
                matches!(
                    cause.downcast_ref::<UpdateError>(),
                    Some(UpdateError::Bundle(_))
                )
            });
            ExitCode::from(if refused { EXIT_INVALID } else { EXIT_FAILURE })
        }
    }
}

fn apply(args: &UpdateArgs, json: bool) -> Result<()> {
    let config = AgentConfig::load(Some(&args.config))?;
    let section = config.update.as_ref().with_context(|| {
        format!(
            "{} has no [update] section: this node takes no system updates",
            args.config.display()
        )
    })?;
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(crate::state_dir::default_state_dir);
    let keys = TrustedKeys::from_config(section, config.hub.as_ref())?;
    // One update at a time.
    let lock_dir = state_dir.join("update");
    std::fs::create_dir_all(&lock_dir)
        .with_context(|| format!("cannot create {}", lock_dir.display()))?;
    let lock = std::fs::File::create(lock_dir.join("lock"))
        .with_context(|| format!("cannot create the update lock in {}", lock_dir.display()))?;
    lock.try_lock()
        .map_err(|_| anyhow!("another `lichen update` is running on this node"))?;

    let board = Board::open(section, &state_dir)?;
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let bundle = board
        .verify(&args.bundle, &keys)
        .with_context(|| format!("refusing {}", args.bundle.display()))?;
    let manifest = &bundle.manifest;
    say(format!(
        "bundle {}: version {} for {}, signed by key {}, image {} bytes (sha256 {})",
        args.bundle.display(),
        manifest.version,
        manifest.target,
        bundle.signer,
        manifest.image.size,
        manifest.image.sha256
    ));
    say(format!(
        "writing slot {} (running: slot {}, version {})",
        board.booted().other(),
        board.booted(),
        board.system().version
    ));
    let size = manifest.image.size.max(1);
    let mut shown = 0;
    let started = Instant::now();
    let report = board.apply(&bundle, now_ms(), &mut |bytes| {
        let percent = bytes * 100 / size;
        if percent >= shown + 10 || bytes == size {
            shown = percent;
            say(format!("  {percent:>3}% {bytes} bytes"));
        }
    })?;
    let summary = serde_json::json!({
        "slot": report.slot.as_str(),
        "device": report.device,
        "version": report.version,
        "bytes-written": report.write.bytes,
        "sha256": report.write.sha256,
        "read-back": if report.write.direct_read_back { "device (O_DIRECT)" } else { "page cache" },
        "write-ms": millis(report.write.write_time),
        "verify-ms": millis(report.write.verify_time),
        "total-ms": millis(started.elapsed()),
        "boot-state": report.state.to_string(),
        "reboot": !args.no_reboot,
    });
    if json {
        let mut out = Vec::new();
        push_json(&mut out, &summary);
        emit(&out)?;
    } else {
        say(format!(
            "slot {} written and read back ({} bytes in {:.1} s, verified in {:.1} s); boot state {}",
            report.slot,
            report.write.bytes,
            report.write.write_time.as_secs_f64(),
            report.write.verify_time.as_secs_f64(),
            report.state
        ));
    }
    if args.no_reboot {
        say(format!(
            "not rebooting (--no-reboot): the next boot tries slot {} once",
            report.slot
        ));
        return Ok(());
    }
    say(format!("rebooting into slot {} for one try", report.slot));
    reboot(&board.reboot_command(true))
}

/// Runs the board's reboot command (also for updates pushed by the hub).
pub(crate) fn reboot(command: &[String]) -> Result<()> {
    let (program, args) = command
        .split_first()
        .context("update.reboot-command is empty")?;
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run the reboot command {program}"))?;
    if !status.success() {
        return Err(anyhow!(
            "the reboot command {command:?} exited with {status}"
        ));
    }
    Ok(())
}

/// Whole milliseconds of `d` for the JSON summary, saturating (u64 milliseconds are 584 million
/// years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
