//! Desired state: what the hub sends on `desired` (its signed bytes are in [`super::signing`])
//! and the node's decisions on it: verify, remember a refused message (by fingerprint, so it
//! never uses up its version), ignore a stale one and say so, apply.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use lichen_sync::Envelope;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{APPLIED_DESIRED, APPLIED_VERSION, Bridge, KEEP_SETTLED, now_ms, verify};
use crate::api::types::DeployReport;

/// The payload of a `desired` message: one deployment for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DesiredState {
    /// The hub's version of the desired state; applied only if newer than the applied one.
    pub version: u64,
    /// The deployment document (TOML, the same text `lichen deploy` takes).
    pub deployment: String,
    /// Size in bytes of each artifact the deployment names by digest (`sha256` hex ->
    /// bytes). The node fetches only artifacts listed here, and only that many bytes of each;
    /// signed with the rest ([`super::signed_bytes`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, u64>,
    /// Components compiled off the node, each shipped beside its source module: the node
    /// whose engine fingerprint is `engine` fetches the one for it (its `sha256` must be in
    /// `artifacts` with its size) and loads it without compiling. Signed with the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub precompiled: Vec<PrecompiledArtifact>,
    /// A system update for A/B boards: the signed bundle the node should run
    /// ([`super::update`]); signed with the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<super::update::SystemUpdate>,
    /// ed25519 signature of [`super::signed_bytes`], base64.
    #[serde(default)]
    pub signature: Option<String>,
    /// Id of the key that signed ([`super::key_id`]).
    #[serde(default)]
    pub key_id: Option<String>,
}

/// Most precompiled artifacts one desired state may list.
pub const MAX_PRECOMPILED: usize = 256;

/// A module compiled for one engine by `lichen hub deploy --precompile` (Wasmtime's
/// serialized form, `.cwasm`), shipped beside its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrecompiledArtifact {
    /// sha256 of the source module the deployment names (`module = "sha256:..."`).
    pub module: String,
    /// Target triple it was compiled for (what the node reports as `engine.target`).
    pub target: String,
    /// Engine fingerprint it loads into (what the node reports as `engine.fingerprint`).
    pub engine: String,
    /// sha256 of the compiled bytes; listed in `artifacts` with its size.
    pub sha256: String,
}

impl PrecompiledArtifact {
    /// The line [`super::signed_bytes`] signs for it.
    pub fn signed_line(&self) -> String {
        format!(
            "precompiled {} {} {} {}\n",
            self.module, self.target, self.engine, self.sha256
        )
    }
}

/// A `precompiled` entry of a desired state that is out of bounds; the text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecompiledError {
    /// The list is longer than [`MAX_PRECOMPILED`].
    #[error(
        "deployment version {version}: precompiled lists {count} artifacts, over the limit of {MAX_PRECOMPILED}"
    )]
    TooMany {
        /// The desired state's version.
        version: u64,
        /// How many it lists.
        count: usize,
    },
    /// `module` is not a digest.
    #[error(
        "deployment version {version}: precompiled[{index}].module {module:?} is not a sha256 digest"
    )]
    ModuleNotDigest {
        /// The desired state's version.
        version: u64,
        /// The entry's index.
        index: usize,
        /// What `module` holds.
        module: String,
    },
    /// `module` is not one the deployment names.
    #[error(
        "deployment version {version}: precompiled[{index}].module sha256:{module} is not a module the deployment names"
    )]
    ModuleNotNamed {
        /// The desired state's version.
        version: u64,
        /// The entry's index.
        index: usize,
        /// The module's digest.
        module: String,
    },
    /// `target` is not a target triple.
    #[error(
        "deployment version {version}: precompiled[{index}].target {target:?} is not a target triple (1 to 64 of a-z, 0-9, '_', '-', '.')"
    )]
    Target {
        /// The desired state's version.
        version: u64,
        /// The entry's index.
        index: usize,
        /// What `target` holds.
        target: String,
    },
    /// `engine` is not an engine fingerprint.
    #[error(
        "deployment version {version}: precompiled[{index}].engine {engine:?} is not an engine fingerprint (32 lowercase hex digits)"
    )]
    Engine {
        /// The desired state's version.
        version: u64,
        /// The entry's index.
        index: usize,
        /// What `engine` holds.
        engine: String,
    },
    /// `sha256` is not in `artifacts`.
    #[error(
        "deployment version {version}: precompiled[{index}].sha256 {sha256:?} is not listed with its size in artifacts"
    )]
    NotListed {
        /// The desired state's version.
        version: u64,
        /// The entry's index.
        index: usize,
        /// The compiled form's digest.
        sha256: String,
    },
}

/// Checks the `precompiled` list of `desired`; the error names the field.
pub fn check_precompiled(desired: &DesiredState) -> Result<(), PrecompiledError> {
    let version = desired.version;
    if desired.precompiled.len() > MAX_PRECOMPILED {
        return Err(PrecompiledError::TooMany {
            version,
            count: desired.precompiled.len(),
        });
    }
    let named = super::artifacts::referenced_digests(&desired.deployment);
    for (index, p) in desired.precompiled.iter().enumerate() {
        if !lichen_sync::is_digest(&p.module) {
            return Err(PrecompiledError::ModuleNotDigest {
                version,
                index,
                module: p.module.clone(),
            });
        }
        if !named.contains(&p.module) {
            return Err(PrecompiledError::ModuleNotNamed {
                version,
                index,
                module: p.module.clone(),
            });
        }
        if p.target.is_empty()
            || p.target.len() > 64
            || !p
                .target
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(PrecompiledError::Target {
                version,
                index,
                target: p.target.clone(),
            });
        }
        if p.engine.len() != 32
            || !p
                .engine
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(PrecompiledError::Engine {
                version,
                index,
                engine: p.engine.clone(),
            });
        }
        if !desired.artifacts.contains_key(&p.sha256) {
            return Err(PrecompiledError::NotListed {
                version,
                index,
                sha256: p.sha256.clone(),
            });
        }
    }
    Ok(())
}

/// What identifies a desired-state message: the SHA-256 of its payload as the node reads it
/// (version, deployment, artifacts, signature and key id). Two messages with the same version
/// but another text or signature differ, so refusing one never refuses the other.
pub fn fingerprint(desired: &DesiredState) -> String {
    let bytes = serde_json::to_vec(desired).expect("a desired state always serialises");
    hex::encode(Sha256::digest(&bytes))
}

/// A desired state the node ignored: not newer than what it applies or fetches.
pub(super) struct Ignored {
    pub(super) version: u64,
    pub(super) lost_to: u64,
    pub(super) reason: String,
    pub(super) at_ms: u64,
}

/// Fingerprints of desired states already refused or ignored, newest last (bounded).
#[derive(Default)]
pub(super) struct Settled(VecDeque<String>);

impl Settled {
    pub(super) fn contains(&self, fingerprint: &str) -> bool {
        self.0.iter().any(|f| f == fingerprint)
    }

    pub(super) fn insert(&mut self, fingerprint: String) {
        if self.contains(&fingerprint) {
            return;
        }
        if self.0.len() == KEEP_SETTLED {
            self.0.pop_front();
        }
        self.0.push_back(fingerprint);
    }
}

impl Bridge {
    /// Rejects desired state `desired` (`None`: a payload that is not one): reported, and that
    /// exact message is not handled again. Its version stays open to any other message.
    pub(super) async fn reject(&mut self, desired: Option<&DesiredState>, reason: String) {
        if let Some(d) = desired {
            self.settled.insert(fingerprint(d));
        }
        self.error(format!("desired state rejected: {reason}"));
        self.record_rejection(desired.map(|d| d.version), reason, "hub-rejected")
            .await;
    }

    /// Ignores `desired` as stale: it lost to version `lost_to` (applied, or being fetched).
    /// Reported once per message, not on every reconnect.
    async fn ignore_stale(&mut self, desired: &DesiredState, lost_to: u64, what: &str) {
        self.settled.insert(fingerprint(desired));
        let reason = format!(
            "desired state version {} ignored as stale: version {lost_to} is {what}",
            desired.version
        );
        tracing::info!("hub: {reason}");
        let _ = self
            .store
            .log_event(None, "hub-ignored", &reason)
            .await
            .map_err(|e| tracing::warn!("cannot log the ignored desired state: {e}"));
        self.ignored = Some(Ignored {
            version: desired.version,
            lost_to,
            reason,
            at_ms: now_ms(),
        });
        self.publish_reported().await;
    }

    pub(super) async fn on_desired(&mut self, envelope: Envelope) {
        let desired: DesiredState = match serde_json::from_value(envelope.payload) {
            Ok(d) => d,
            Err(e) => {
                self.rejected_messages += 1;
                return self
                    .reject(
                        None,
                        format!(
                            "malformed desired state in message {}: {e} (expected version, deployment, signature, key-id)",
                            envelope.id
                        ),
                    )
                    .await;
            }
        };
        let fingerprint = fingerprint(&desired);
        if self.settled.contains(&fingerprint) {
            // Refused or ignored already: the retained copy, back on a new connection.
            return;
        }
        let applied = self.applied_version();
        if desired.version <= applied {
            let running = desired.version == applied
                && self
                    .store
                    .hub_state(APPLIED_DESIRED)
                    .ok()
                    .flatten()
                    // Applied before fingerprints were kept: the retained copy of it.
                    .is_none_or(|f| f == fingerprint);
            if !running {
                self.ignore_stale(&desired, applied, "applied").await;
            }
            return;
        }
        if let Some(p) = &self.pending {
            if p.fingerprint == fingerprint {
                return;
            }
            if p.desired.version >= desired.version {
                let lost_to = p.desired.version;
                return self
                    .ignore_stale(&desired, lost_to, "verified and fetching its artifacts")
                    .await;
            }
        }
        let signer = match verify(&desired, &self.node, &self.keys) {
            Ok(key) => key,
            Err(reason) if self.insecure_dev => {
                tracing::warn!(
                    "INSECURE: applying deployment version {} despite: {reason} (hub.insecure-dev)",
                    desired.version
                );
                "none (insecure-dev)".to_owned()
            }
            Err(reason) => {
                self.rejected_messages += 1;
                return self.reject(Some(&desired), reason.to_string()).await;
            }
        };
        self.fetch_or_apply(desired, signer).await;
    }

    /// Applies a verified deployment whose artifacts are all in the store; a rejection is
    /// recorded for the hub.
    pub(super) async fn apply(&mut self, desired: DesiredState, signer: String) {
        let kept = desired.clone();
        if let Err(reason) = self.apply_checked(desired, signer).await {
            self.reject(Some(&kept), reason).await;
        }
    }

    /// Applies a verified deployment; returns the reason if it is invalid.
    // The reason stays words: it is the agent API's error text, bound for reported state.
    pub(super) async fn apply_checked(
        &mut self,
        desired: DesiredState,
        signer: String,
    ) -> Result<DeployReport, String> {
        let name = format!("hub desired version {}", desired.version);
        match self
            .agent
            .deploy_text(&name, &desired.deployment, Path::new("/"))
            .await
        {
            Ok(report) => {
                if let Err(e) = self
                    .store
                    .set_hub_state(APPLIED_VERSION, &desired.version.to_string())
                    .await
                {
                    self.error(format!("cannot record the applied hub version: {e}"));
                }
                if let Err(e) = self
                    .store
                    .set_hub_state(APPLIED_DESIRED, &fingerprint(&desired))
                    .await
                {
                    self.error(format!("cannot record the applied desired state: {e}"));
                }
                for failure in &report.failures {
                    self.error(format!(
                        "workload {} failed after deployment version {}: {}",
                        failure.workload, desired.version, failure.message
                    ));
                }
                tracing::info!(
                    version = desired.version,
                    local_version = report.version,
                    signer,
                    "applied desired state from the hub"
                );
                self.last_rejection = None;
                self.ignored = None;
                self.publish_reported().await;
                Ok(report)
            }
            Err(e) => Err(format!(
                "deployment version {} is invalid: {}",
                desired.version, e.error
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precompiled_errors_name_the_version_and_the_field() {
        let target = PrecompiledError::Target {
            version: 7,
            index: 2,
            target: "x y".into(),
        };
        assert_eq!(
            target.to_string(),
            "deployment version 7: precompiled[2].target \"x y\" is not a target triple (1 to 64 of a-z, 0-9, '_', '-', '.')"
        );
        let listed = PrecompiledError::ModuleNotNamed {
            version: 7,
            index: 0,
            module: "ab".into(),
        };
        assert_eq!(
            listed.to_string(),
            "deployment version 7: precompiled[0].module sha256:ab is not a module the deployment names"
        );
    }
}
