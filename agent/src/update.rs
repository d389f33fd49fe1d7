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
//! One file on purpose (about 700 lines): the agent's whole update integration, so the
//! restructuring of the agent crate can move it as one piece.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use lichen_update::board::{Board, Start, UpdateError};
use lichen_update::bundle::{BundleSignature, SignatureError, Signer, Verifier};
use lichen_update::config::UpdateConfig;
use lichen_update::health::{HealthCheck, HubHealth, Observation, Verdict, WorkloadHealth};
use lichen_update::journal::{JournalFile, Outcome, OutcomeKind, Phase};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::api::control::Control;
use crate::api::types::DoctorCheck;
use crate::config::{AgentConfig, HubSection};
use crate::hub::{TrustedKey, base64_decode, base64_encode, key_id, parse_public_key};
use crate::render::{EXIT_FAILURE, EXIT_INVALID, emit, push_json};
use crate::supervisor::Agent;
use crate::util::{error_chain, now_ms};

/// The configuration `lichen update` reads when `--config` is not given: the board's.
pub const BOARD_CONFIG: &str = "/etc/lichen/lichen.toml";
/// How often the health check looks at the workloads.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// How often the health check asks the hub (each probe is a connection).
const HUB_POLL: Duration = Duration::from_secs(5);

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
        let der = crate::hub::signing::pem_or_der(&bytes)
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

/// At the daemon's start, when the config has `[update]`: what this boot is (see
/// `lichen_update::board`), done in the background so the API serves meanwhile.
pub fn start(
    agent: Agent,
    config: &AgentConfig,
    state_dir: &Path,
) -> Option<tokio::task::JoinHandle<()>> {
    let section = config.update.clone()?;
    let hub = config.hub.clone();
    let state_dir = state_dir.to_path_buf();
    Some(tokio::spawn(async move {
        if let Err(err) = boot(&agent, &section, hub.as_ref(), &state_dir).await {
            let text = error_chain(err.as_ref());
            tracing::error!("system update: {text}; this boot is not confirmed");
            event(&agent, "update-error", &text).await;
        }
    }))
}

async fn boot(
    agent: &Agent,
    section: &UpdateConfig,
    hub: Option<&HubSection>,
    state_dir: &Path,
) -> Result<()> {
    let board = {
        let (section, state_dir) = (section.clone(), state_dir.to_path_buf());
        tokio::task::spawn_blocking(move || Board::open(&section, &state_dir)).await??
    };
    let board = std::sync::Arc::new(board);
    let start = {
        let board = board.clone();
        tokio::task::spawn_blocking(move || board.start(now_ms())).await??
    };
    match start {
        Start::Confirmed { outcome } => {
            if let Some(outcome) = outcome {
                report_outcome(agent, &outcome).await;
            }
            tracing::info!(slot = %board.booted(), version = %board.system().version, "system boot confirmed");
        }
        Start::AwaitingReboot(p) => {
            tracing::info!(version = %p.version, slot = %p.to, "an update is armed: the next reboot tries it");
        }
        Start::Rejected(p, reason) => {
            return fail_trial(agent, &board, &p, &reason).await;
        }
        Start::Trial(p) => {
            event(
                agent,
                "update-trial",
                &format!(
                    "first boot of slot {} (version {}): health check",
                    p.to, p.version
                ),
            )
            .await;
            match health_check(agent, hub, board.health_deadline()).await {
                Ok(summary) => {
                    let summary = format!("state database open; {summary}");
                    let outcome = {
                        let (board, p) = (board.clone(), p.clone());
                        tokio::task::spawn_blocking(move || board.commit(&p, &summary, now_ms()))
                            .await??
                    };
                    report_outcome(agent, &outcome).await;
                }
                Err(reason) => return fail_trial(agent, &board, &p, &reason).await,
            }
        }
    }
    let board2 = board.clone();
    tokio::task::spawn_blocking(move || board2.confirm()).await??;
    Ok(())
}

/// Records a failed first boot and reboots back to the old slot.
async fn fail_trial(
    agent: &Agent,
    board: &std::sync::Arc<Board>,
    pending: &lichen_update::journal::Pending,
    reason: &str,
) -> Result<()> {
    tracing::error!(slot = %pending.to, version = %pending.version, "health check failed: {reason}; rebooting to slot {}", pending.from);
    event(
        agent,
        "update-health-failed",
        &format!(
            "slot {} (version {}): {reason}; rebooting to slot {}",
            pending.to, pending.version, pending.from
        ),
    )
    .await;
    let command = {
        let (board, pending, reason) = (board.clone(), pending.clone(), reason.to_string());
        tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            board.reject(&pending, &reason)?;
            Ok(board.reboot_command(false))
        })
        .await??
    };
    tokio::task::spawn_blocking(move || reboot(&command)).await?
}

async fn report_outcome(agent: &Agent, outcome: &Outcome) {
    let kind = match outcome.result {
        OutcomeKind::Committed => "update-committed",
        OutcomeKind::RolledBack => "update-rolled-back",
        OutcomeKind::Interrupted => "update-interrupted",
        OutcomeKind::Failed => "update-failed",
    };
    if outcome.result == OutcomeKind::Committed {
        tracing::info!("{}", outcome.describe());
    } else {
        tracing::warn!("{}", outcome.describe());
    }
    event(agent, kind, &outcome.describe()).await;
}

async fn event(agent: &Agent, kind: &str, detail: &str) {
    if let Err(err) = agent.store().log_event(None, kind, detail).await {
        tracing::warn!("cannot log event {kind}: {err}");
    }
}

/// Runs the health check until it passes (its summary), fails or passes its deadline (why).
async fn health_check(
    agent: &Agent,
    hub: Option<&HubSection>,
    deadline: Duration,
) -> Result<String, String> {
    let until = Instant::now() + deadline;
    let mut hub_state = if hub.is_some() {
        HubHealth::NotAnswered("not asked yet".into())
    } else {
        HubHealth::NotConfigured
    };
    let mut hub_asked: Option<Instant> = None;
    let mut check: Option<HealthCheck> = None;
    loop {
        if let Some(hub) = hub
            && hub_state != HubHealth::Answered
            && hub_asked.is_none_or(|t| t.elapsed() >= HUB_POLL)
        {
            hub_asked = Some(Instant::now());
            let hub = hub.clone();
            hub_state = match tokio::task::spawn_blocking(move || crate::hub::probe(&hub)).await {
                Ok(Ok(())) => HubHealth::Answered,
                Ok(Err(why)) => HubHealth::NotAnswered(why.to_string()),
                Err(e) => HubHealth::NotAnswered(e.to_string()),
            };
        }
        let expected = {
            let store = agent.store().clone();
            tokio::task::spawn_blocking(move || store.current_deployment())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read the stored deployment: {e}"))?
                .map(|d| d.workloads.into_iter().map(|w| w.name).collect())
                .unwrap_or_default()
        };
        let seen = Observation {
            expected,
            workloads: agent
                .ps()
                .await
                .into_iter()
                .map(|w| WorkloadHealth {
                    name: w.name,
                    state: w.state,
                    events_handled: w.events_handled,
                    restarts: w.restarts,
                    traps: w.traps,
                    uptime_ms: w.uptime_ms,
                    last_error: w.last_error,
                })
                .collect(),
            hub: hub_state.clone(),
        };
        let check = check.get_or_insert_with(|| HealthCheck::new(&seen));
        match check.judge(&seen) {
            Verdict::Pass(summary) => return Ok(summary),
            Verdict::Fail(reason) => return Err(reason),
            Verdict::Wait(what) => {
                if Instant::now() >= until {
                    return Err(format!(
                        "not healthy within {}: still waiting for {what}",
                        humantime::format_duration(deadline)
                    ));
                }
            }
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

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

    /// Applies a bundle the hub pushed (see `hub::update`): verified as `lichen update`
    /// verifies it, by `update.trusted-keys` and `hub_keys`; its manifest must say the signed
    /// version and target. Returns a summary and the reboot command to run.
    pub(crate) fn apply_pushed(
        &self,
        bundle: &Path,
        signed: &crate::hub::update::SystemUpdate,
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
        if manifest.version != signed.version {
            return Err(format!(
                "the bundle's manifest says version {:?}; system.version says {:?}",
                manifest.version, signed.version
            ));
        }
        if manifest.target != signed.target {
            return Err(format!(
                "the bundle's manifest says target {:?}; system.target says {:?}",
                manifest.target, signed.target
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

/// Whole milliseconds of `d` for the JSON summary, saturating (u64 milliseconds are 584 million
/// years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(keys: &[String]) -> UpdateConfig {
        let mut text = String::from(
            "target = \"x86_64\"\nboot = \"grub\"\nboot-state = [\"/b/grubenv\"]\nslots = { A = \"/dev/vda2\", B = \"/dev/vda3\" }\n",
        );
        text.push_str(&format!("trusted-keys = {keys:?}\n"));
        toml::from_str(&text).expect("a valid [update] section")
    }

    #[test]
    fn bundles_verify_with_the_deployment_key_formats() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, public) = crate::hub::generate_key().unwrap();
        let (_, other) = crate::hub::generate_key().unwrap();
        std::fs::write(dir.path().join("key.pem"), &pem).unwrap();
        let signer = PublisherKey::load(&dir.path().join("key.pem")).unwrap();
        let signature = signer.sign(b"manifest").unwrap();

        let trusted =
            TrustedKeys::from_config(&section(&[other.clone(), public.clone()]), None).unwrap();
        assert_eq!(
            trusted.verify(b"manifest", &signature).unwrap(),
            signature.key_id.clone().unwrap()
        );
        let err = trusted
            .verify(b"tampered", &signature)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad signature"), "{err}");

        let stranger = TrustedKeys::from_config(&section(&[other]), None).unwrap();
        let err = stranger
            .verify(b"manifest", &signature)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not one of this node's trusted keys"), "{err}");
        let none = TrustedKeys::from_config(&section(&[]), None).unwrap();
        assert!(
            none.verify(b"manifest", &signature)
                .unwrap_err()
                .to_string()
                .contains("trusts no key")
        );

        let err = TrustedKeys::from_config(&section(&["zz".into()]), None)
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("update.trusted-keys[0]"),
            "{err:#}"
        );
    }
}
