//! Desired state: what the hub sends on `desired`, the bytes its publisher signs, and the
//! node's decisions on it: verify, remember a refused message (by fingerprint, so it never uses
//! up its version), ignore a stale one and say so, apply.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use anyhow::{Context, Result, bail};
use lichen_sync::Envelope;
use ring::signature::{ED25519, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    APPLIED_DESIRED, APPLIED_VERSION, Bridge, KEEP_SETTLED, SIGNATURE_CONTEXT,
    SIGNATURE_CONTEXT_V2, base64_decode, base64_encode, now_ms, pem_or_der,
};
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
    /// signed with the rest ([`signed_bytes`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, u64>,
    /// ed25519 signature of [`signed_bytes`], base64.
    #[serde(default)]
    pub signature: Option<String>,
    /// Id of the key that signed ([`key_id`]).
    #[serde(default)]
    pub key_id: Option<String>,
}

/// The bytes a publisher signs: `lichen-desired-v1\n<node>\n<version>\n<deployment>`. The node
/// and version are inside so that a signed deployment cannot be replayed to another node or
/// under a higher version.
pub fn canonical_bytes(node: &str, version: u64, deployment: &str) -> Vec<u8> {
    format!("{SIGNATURE_CONTEXT}\n{node}\n{version}\n{deployment}").into_bytes()
}

/// The bytes a publisher signs for `desired`: [`canonical_bytes`] when it lists no artifacts,
/// else `lichen-desired-v2\n<node>\n<version>\n<count>\n` then one `<sha256> <size>\n` line
/// per artifact (in digest order) and the deployment text, so the sizes the node fetches are
/// the publisher's too.
pub fn signed_bytes(node: &str, desired: &DesiredState) -> Vec<u8> {
    if desired.artifacts.is_empty() {
        return canonical_bytes(node, desired.version, &desired.deployment);
    }
    let mut text = format!(
        "{SIGNATURE_CONTEXT_V2}\n{node}\n{}\n{}\n",
        desired.version,
        desired.artifacts.len()
    );
    for (digest, size) in &desired.artifacts {
        text.push_str(&format!("{digest} {size}\n"));
    }
    text.push_str(&desired.deployment);
    text.into_bytes()
}

/// What identifies a desired-state message: the SHA-256 of its payload as the node reads it
/// (version, deployment, artifacts, signature and key id). Two messages with the same version
/// but another text or signature differ, so refusing one never refuses the other.
pub fn fingerprint(desired: &DesiredState) -> String {
    let bytes = serde_json::to_vec(desired).expect("a desired state always serialises");
    hex::encode(Sha256::digest(&bytes))
}

/// A key's id: the first 16 hex digits of the SHA-256 of its 32 public-key bytes.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// A publisher key the node trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// [`key_id`] of the key.
    pub id: String,
    /// The raw ed25519 public key.
    pub public: Vec<u8>,
}

/// Parses an ed25519 public key written as 64 hex digits or as base64 of its 32 bytes.
pub fn parse_public_key(text: &str) -> Result<TrustedKey> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).context("hex public key")?
    } else {
        base64_decode(text)
            .with_context(|| format!("public key {text:?} is neither 64 hex digits nor base64"))?
    };
    if bytes.len() != 32 {
        bail!(
            "public key {text:?} has {} bytes; an ed25519 public key has 32",
            bytes.len()
        );
    }
    Ok(TrustedKey {
        id: key_id(&bytes),
        public: bytes,
    })
}

/// Signs `desired` for `node` ([`signed_bytes`]: with its artifact sizes, if it lists any)
/// with a PKCS#8 ed25519 key; returns the base64 signature and the key id.
pub fn sign_desired(pkcs8: &[u8], node: &str, desired: &DesiredState) -> Result<(String, String)> {
    let der = pem_or_der(pkcs8)?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("not an ed25519 PKCS#8 private key: {e}"))?;
    let signature = pair.sign(&signed_bytes(node, desired));
    Ok((
        base64_encode(signature.as_ref()),
        key_id(pair.public_key().as_ref()),
    ))
}

/// Checks the signature of `desired` for `node` against `keys`; returns the signing key's id.
pub fn verify(desired: &DesiredState, node: &str, keys: &[TrustedKey]) -> Result<String, String> {
    let Some(signature) = &desired.signature else {
        return Err(format!(
            "deployment version {} is unsigned; this node accepts only deployments signed by a trusted key",
            desired.version
        ));
    };
    let signature = base64_decode(signature).map_err(|e| {
        format!(
            "deployment version {}: signature is not base64: {e}",
            desired.version
        )
    })?;
    if keys.is_empty() {
        return Err(format!(
            "deployment version {} is signed, but this node trusts no key (hub.trusted-keys is empty)",
            desired.version
        ));
    }
    let candidates: Vec<&TrustedKey> = match &desired.key_id {
        Some(id) => {
            let found: Vec<_> = keys.iter().filter(|k| &k.id == id).collect();
            if found.is_empty() {
                return Err(format!(
                    "deployment version {} is signed by key {id}, which is not in hub.trusted-keys",
                    desired.version
                ));
            }
            found
        }
        None => keys.iter().collect(),
    };
    let message = signed_bytes(node, desired);
    for key in candidates {
        if UnparsedPublicKey::new(&ED25519, &key.public)
            .verify(&message, &signature)
            .is_ok()
        {
            return Ok(key.id.clone());
        }
    }
    Err(format!(
        "deployment version {} has a bad signature (tampered, signed for another node or version, or by another key)",
        desired.version
    ))
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
                return self.reject(Some(&desired), reason).await;
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
