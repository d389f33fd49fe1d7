//! `lichen import BUNDLE`: a bundle checked exactly as a desired state from the hub, on a task
//! of its own so that the hub link keeps serving the broker (commands, artifacts, reported
//! state) while a bundle is read from a slow USB stick or its artifacts compile.
//!
//! The [`Importer`] takes one import at a time. It opens the bundle ([`Bundle`]), reads
//! `bundle.json` alone and checks the node, the version (newer than the applied one) and the
//! signature by a trusted key before it touches an artifact. Then it streams every artifact
//! member through SHA-256 against its name, with nothing written anywhere, and checks that each
//! digest the deployment names is in the bundle or the store. Only then, in a second pass, it
//! reads each artifact the store lacks (one at a time, within its bound), checks its digest
//! again (the bundle may have changed since) and adds it to the artifact store. Compiled
//! artifacts (`lichen hub bundle --precompile TARGET`) are taken as the hub link takes them:
//! the one signed for this node's engine fingerprint is stored and its module is not compiled
//! here; those for other engines are checked like every member and left out. The verified
//! desired state goes to the hub link's bridge, which applies it as it applies one from the
//! hub (or records the refusal), and answers the caller.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::bundle::{Bundle, Expected, Limits};
use super::{DesiredState, TrustedKey, artifacts, verify};
use crate::api::types::ApiError;
pub use crate::api::types::{ImportReport, ImportRequest};
use crate::store::StateStore;
use crate::supervisor::Agent;
pub use crate::supervisor::ImportRoute;
use crate::supervisor::{ImportJob, ImportReply as Reply};

/// A checked bundle, on its way to the bridge.
pub(super) struct Checked {
    /// The bundle, for messages.
    pub path: PathBuf,
    /// What the check found.
    pub outcome: Result<Verified, Refusal>,
    /// Where the answer goes.
    pub reply: Reply,
}

/// A bundle whose signature and artifacts verified; its artifacts are in the store.
pub(super) struct Verified {
    /// The desired state, signature checked.
    pub desired: DesiredState,
    /// Id of the key that signed it.
    pub signer: String,
    /// Artifacts the import added to the store.
    pub added: Vec<String>,
}

/// Why a bundle is refused (the version, once `bundle.json` was read).
pub(super) struct Refusal {
    /// The desired-state version of the bundle, if it got that far.
    pub version: Option<u64>,
    /// What is wrong, naming the member.
    pub reason: String,
}

impl Refusal {
    fn new(version: Option<u64>, reason: impl Into<String>) -> Self {
        Self {
            version,
            reason: reason.into(),
        }
    }
}

/// Checks bundles one at a time, off the bridge's loop.
pub(super) struct Importer {
    /// This node's id.
    pub node: String,
    /// `hub.trusted-keys`.
    pub keys: Vec<TrustedKey>,
    /// `hub.insecure-dev`.
    pub insecure_dev: bool,
    /// Where the applied hub version is kept.
    pub store: StateStore,
    /// The agent, whose artifact store gets the artifacts.
    pub agent: Agent,
    /// Size bounds of bundle members.
    pub limits: Limits,
}

impl Importer {
    /// Takes import jobs until the sender goes, handing each checked bundle to `checked`.
    pub async fn run(self, mut jobs: mpsc::Receiver<ImportJob>, checked: mpsc::Sender<Checked>) {
        let me = std::sync::Arc::new(self);
        while let Some(job) = jobs.recv().await {
            let runtime = tokio::runtime::Handle::current();
            let path = job.path.clone();
            let task = {
                let me = me.clone();
                tokio::task::spawn_blocking(move || me.check(&path, &runtime))
            };
            let outcome = match task.await {
                Ok(outcome) => outcome,
                Err(e) => {
                    let _ = job
                        .reply
                        .send(Err(ApiError::internal(format!("bundle check failed: {e}"))));
                    continue;
                }
            };
            let message = Checked {
                path: job.path,
                outcome,
                reply: job.reply,
            };
            if checked.send(message).await.is_err() {
                return;
            }
        }
    }

    /// Every check of a bundle, then its missing artifacts into the store. Blocking: runs on a
    /// blocking thread, with `runtime` to await the artifact store.
    fn check(&self, path: &Path, runtime: &tokio::runtime::Handle) -> Result<Verified, Refusal> {
        let shown = path.display();
        let bundle =
            Bundle::open(path, self.limits).map_err(|e| Refusal::new(None, format!("{e:#}")))?;
        let index = bundle
            .index()
            .map_err(|e| Refusal::new(None, format!("{e:#}")))?;
        let desired = index.desired;
        let version = Some(desired.version);
        if index.node != self.node {
            return Err(Refusal::new(
                version,
                format!(
                    "bundle {shown} is for node {:?}; this node is {:?}",
                    index.node, self.node
                ),
            ));
        }
        let applied = super::applied_version(&self.store);
        if desired.version <= applied {
            return Err(Refusal::new(
                version,
                format!(
                    "bundle {shown} holds version {}, not newer than the applied version {applied}",
                    desired.version
                ),
            ));
        }
        if let Some(system) = &desired.system {
            // Offline, a system update is its own bundle (`lichen update`).
            return Err(Refusal::new(
                version,
                format!(
                    "bundle {shown} names system update {} (system): apply it with `lichen update BUNDLE`, then import a desired state without it",
                    system.version
                ),
            ));
        }
        let signer = match verify(&desired, &self.node, &self.keys) {
            Ok(key) => key,
            Err(reason) if self.insecure_dev => {
                tracing::warn!(
                    "INSECURE: importing deployment version {} despite: {reason} (hub.insecure-dev)",
                    desired.version
                );
                "none (insecure-dev)".to_owned()
            }
            Err(reason) => return Err(Refusal::new(version, reason.to_string())),
        };
        super::check_precompiled(&desired)
            .map_err(|reason| Refusal::new(version, reason.to_string()))?;
        // The compiled forms for this node's engine it lacks (compiled sha256 -> module), and
        // the modules that have one: those are stored without compiling. Compiled forms for
        // other engines may be in the bundle (one bundle for several targets): checked like
        // every member, not stored.
        let store = self.agent.artifacts();
        let (compiled, compiled_here) = super::fetch::precompiled_for(store, &desired);
        // Each digest the signed text names and each compiled form it lists, with the size
        // the desired state signs for it (a member must be exactly that size); one without
        // is bounded by Limits::artifact.
        let expected: Expected = artifacts::referenced_digests(&desired.deployment)
            .into_iter()
            .chain(desired.precompiled.iter().map(|p| p.sha256.clone()))
            .map(|d| {
                let size = desired.artifacts.get(&d).copied();
                (d, size)
            })
            .collect();
        let left_out: std::collections::BTreeSet<&str> = desired
            .precompiled
            .iter()
            .map(|p| p.sha256.as_str())
            .filter(|d| !compiled.contains_key(*d))
            .collect();
        // First pass: every member hashed as it streams by; nothing kept, nothing written.
        let in_bundle = bundle
            .artifacts(&expected, |name, reader, _| {
                let found = sha256_of(reader)?;
                if found != name {
                    anyhow::bail!(
                        "artifact file artifacts/{name} of bundle {shown} was tampered with or corrupted: its content has sha256 {found}"
                    );
                }
                Ok(())
            })
            .map_err(|e| Refusal::new(version, format!("{e:#}")))?;
        if let Some(digest) = expected.keys().find(|d| {
            !in_bundle.contains(*d) && !left_out.contains(d.as_str()) && !store.contains(d)
        }) {
            return Err(Refusal::new(
                version,
                format!(
                    "the deployment names artifact sha256:{digest}, which is neither in bundle {shown} nor on this node"
                ),
            ));
        }
        // Second pass: what the store lacks goes in, one artifact in memory at a time.
        let mut added = Vec::new();
        bundle
            .artifacts(&expected, |name, reader, size| {
                if left_out.contains(name)
                    || (!compiled.contains_key(name) && store.contains(name))
                {
                    return Ok(());
                }
                let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                reader.read_to_end(&mut bytes)?;
                let found = lichen_sync::sha256_hex(&bytes);
                if found != name {
                    anyhow::bail!(
                        "artifact file artifacts/{name} of bundle {shown} changed while it was imported: its content now has sha256 {found}"
                    );
                }
                if let Some(module) = compiled.get(name) {
                    runtime.block_on(store.add_precompiled(module, bytes)).map_err(|e| {
                        anyhow::anyhow!(
                            "compiled artifact sha256:{name} for module sha256:{module} is refused: {e:#}"
                        )
                    })?;
                } else if compiled_here.contains(name) {
                    runtime.block_on(store.add_source(bytes)).map_err(|e| {
                        anyhow::anyhow!("artifact sha256:{name} is not a WebAssembly module: {e:#}")
                    })?;
                } else {
                    runtime.block_on(store.add(bytes)).map_err(|e| {
                        anyhow::anyhow!("artifact sha256:{name} does not load: {e:#}")
                    })?;
                }
                added.push(name.to_owned());
                Ok(())
            })
            .map_err(|e| Refusal::new(version, format!("{e:#}")))?;
        Ok(Verified {
            desired,
            signer,
            added,
        })
    }
}

/// The hex SHA-256 of everything `reader` yields.
fn sha256_of(reader: &mut dyn Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(reader, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
