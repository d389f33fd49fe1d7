//! Fetching the artifacts of a verified desired state over MQTT.
//!
//! Only what the signed desired state names is fetched, and only as many bytes as it says
//! (its `artifacts` map, digest -> size). Manifests and chunks are not signed: anyone with
//! access to the broker can publish them, so nothing about them can make the node reject the
//! deployment or fetch more than the signed size.
//!
//! - A manifest that is malformed, names another size than the signed one, or was found
//!   false before is refused (counted, reported with the fetch) and the node waits for
//!   another; it stays subscribed to the manifest topic for the whole transfer, so a manifest
//!   the hub publishes again replaces one whose chunks never check out.
//! - A chunk that does not match its manifest is refused and the node waits for that chunk
//!   again (the hub publishing it again, or the retained copy after a reconnect).
//! - An assembled artifact whose sha256 is not its name (a forged manifest with chunks to
//!   match) is thrown away with its chunks; that manifest is remembered as false and the node
//!   waits for another. At most the signed size is downloaded per manifest.
//! - The deployment is rejected only for what its signer answers for: an artifact whose digest
//!   matches but that does not load, or the node's own disk failing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use anyhow::Result;
use lichen_sync::{Assembly, Envelope, MAX_ARTIFACT_SIZE, Manifest};
use sha2::{Digest, Sha256};

use super::update::SystemStep;
use super::{Bridge, DesiredState, artifacts, now_ms};
use crate::runtime::wasm::ArtifactStore;

/// False manifests remembered per artifact.
const KEEP_BAD_MANIFESTS: usize = 8;

/// A verified deployment waiting for its artifacts.
pub(super) struct Pending {
    pub(super) desired: DesiredState,
    pub(super) fingerprint: String,
    pub(super) signer: String,
    /// Artifacts still being fetched, by digest.
    pub(super) fetches: BTreeMap<String, Fetch>,
    /// The digest of the system update bundle being fetched ([`super::update`]), if one is.
    pub(super) system: Option<String>,
    /// Compiled artifacts for this node's engine being fetched: compiled sha256 -> the
    /// source module's.
    pub(super) precompiled: BTreeMap<String, String>,
    /// Source modules whose compiled form for this node comes with the deployment: stored
    /// without compiling.
    pub(super) compiled_elsewhere: BTreeSet<String>,
}

/// The transfer of one artifact.
pub(super) struct Fetch {
    /// Its size, from the signed desired state.
    pub(super) size: u64,
    /// `None` until a manifest of that size came.
    pub(super) assembly: Option<Assembly>,
    /// Fingerprint of the manifest the assembly follows.
    manifest: Option<String>,
    /// Chunks found already stored when the manifest came (from before a restart).
    pub(super) resumed: usize,
    /// Chunks received and stored in this run.
    pub(super) fetched: usize,
    /// Chunks received that were already stored.
    pub(super) redundant: usize,
    /// Manifests and chunks refused.
    pub(super) refused: u64,
    /// Why the last one was refused.
    pub(super) last_error: Option<String>,
    /// Fingerprints of manifests found false, newest last.
    bad_manifests: VecDeque<String>,
}

impl Fetch {
    fn new(size: u64) -> Self {
        Fetch {
            size,
            assembly: None,
            manifest: None,
            resumed: 0,
            fetched: 0,
            redundant: 0,
            refused: 0,
            last_error: None,
            bad_manifests: VecDeque::new(),
        }
    }

    fn mark_bad(&mut self, fingerprint: String) {
        if self.bad_manifests.len() == KEEP_BAD_MANIFESTS {
            self.bad_manifests.pop_front();
        }
        self.bad_manifests.push_back(fingerprint);
    }
}

/// What identifies a manifest message: the SHA-256 of its payload.
fn manifest_fingerprint(payload: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(payload).expect("a JSON value always serialises");
    hex::encode(Sha256::digest(&bytes))
}

impl Bridge {
    /// Applies a verified deployment, or first fetches the artifacts it names that the node
    /// lacks: each must be listed with its size in the signed `artifacts`.
    pub(super) async fn fetch_or_apply(&mut self, desired: DesiredState, signer: String) {
        self.cancel_pending();
        if let Some((digest, _)) = desired
            .artifacts
            .iter()
            .find(|(d, _)| !lichen_sync::is_digest(d))
        {
            let reason = format!(
                "deployment version {}: artifacts key {digest:?} is not a sha256 digest (64 lowercase hex digits)",
                desired.version
            );
            return self.reject(Some(&desired), reason).await;
        }
        if let Err(reason) = super::check_precompiled(&desired) {
            return self.reject(Some(&desired), reason.to_string()).await;
        }
        let (precompiled, compiled_elsewhere) = self.precompiled_for_this_node(&desired);
        let mut fetches = BTreeMap::new();
        // A system update comes first: the deployment waits for the system it names.
        let (missing, system) = match self.system_step(&desired).await {
            None => return,
            Some(SystemStep::Wait) => return self.publish_reported().await,
            Some(SystemStep::Fetch(digest, size)) => {
                fetches.insert(digest.clone(), Fetch::new(size));
                (vec![digest.clone()], Some(digest))
            }
            Some(SystemStep::Deploy) => (
                artifacts::referenced_digests(&desired.deployment)
                    .into_iter()
                    .filter(|d| !self.agent.artifacts().contains(d))
                    .chain(precompiled.keys().cloned())
                    .collect::<Vec<_>>(),
                None,
            ),
        };
        if missing.is_empty() {
            return self.apply(desired, signer).await;
        }
        for digest in missing.iter().filter(|_| system.is_none()) {
            let reason = match desired.artifacts.get(digest) {
                None => format!(
                    "deployment version {} names artifact sha256:{digest}, which this node lacks, without its size: \
                     the node fetches only artifacts listed with their size in the signed \"artifacts\" of the desired state",
                    desired.version
                ),
                Some(&size) if size > MAX_ARTIFACT_SIZE => format!(
                    "deployment version {}: artifacts[{digest}] is {size} bytes, over the {MAX_ARTIFACT_SIZE}-byte limit for artifacts fetched over MQTT",
                    desired.version
                ),
                Some(&size) => {
                    fetches.insert(digest.clone(), Fetch::new(size));
                    continue;
                }
            };
            return self.reject(Some(&desired), reason).await;
        }
        tracing::info!(
            version = desired.version,
            artifacts = ?missing,
            "fetching the artifacts of the desired state from the hub"
        );
        self.handle.subscribe(
            missing
                .iter()
                .map(|d| self.topics.artifact_manifest(d))
                .collect(),
        );
        self.pending = Some(Pending {
            fingerprint: super::fingerprint(&desired),
            desired,
            signer,
            fetches,
            system,
            precompiled,
            compiled_elsewhere,
        });
        self.publish_reported().await;
    }

    /// The compiled artifacts of `desired` this node fetches: see [`precompiled_for`].
    fn precompiled_for_this_node(
        &self,
        desired: &DesiredState,
    ) -> (BTreeMap<String, String>, BTreeSet<String>) {
        precompiled_for(self.agent.artifacts(), desired)
    }

    /// Unsubscribes from every topic of the pending transfer and forgets it (its chunks stay
    /// stored for a later try).
    pub(super) fn cancel_pending(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let mut filters = Vec::new();
        for (digest, fetch) in &pending.fetches {
            filters.push(self.topics.artifact_manifest(digest));
            if let Some(a) = &fetch.assembly {
                filters.extend(
                    a.missing()
                        .into_iter()
                        .map(|i| self.topics.artifact_chunk(digest, i)),
                );
            }
        }
        self.handle.unsubscribe(filters);
    }

    /// Rejects the pending deployment because of artifact `digest`, dropping its chunks.
    async fn reject_pending(&mut self, digest: &str, reason: String) {
        let desired = self.pending.as_ref().map(|p| p.desired.clone());
        self.cancel_pending();
        let chunks = self.chunks.clone();
        let digest = digest.to_owned();
        let _ = tokio::task::spawn_blocking(move || chunks.remove(&digest)).await;
        let version = desired.as_ref().map_or(0, |d| d.version);
        self.reject(
            desired.as_ref(),
            format!("deployment version {version} rejected: {reason}"),
        )
        .await;
    }

    /// Refuses a manifest or chunk of artifact `digest` (the transfer goes on): counts it,
    /// reports why, and remembers a false manifest.
    async fn refuse(&mut self, digest: &str, bad_manifest: Option<String>, reason: String) {
        let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(digest))
        else {
            return;
        };
        if let Some(fingerprint) = bad_manifest {
            fetch.mark_bad(fingerprint);
        }
        fetch.refused += 1;
        fetch.last_error = Some(format!("{} {reason}", now_ms()));
        self.rejected_messages += 1;
        self.error(format!(
            "artifact transfer: {reason}; waiting for a good copy"
        ));
        self.publish_reported().await;
    }

    pub(super) async fn on_manifest(&mut self, digest: String, envelope: Envelope) {
        let fingerprint = manifest_fingerprint(&envelope.payload);
        let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(&digest))
        else {
            return;
        };
        if fetch.manifest.as_ref() == Some(&fingerprint)
            || fetch.bad_manifests.contains(&fingerprint)
        {
            // The retained copy again, or one already found false.
            return;
        }
        let size = fetch.size;
        let manifest = match serde_json::from_value::<Manifest>(envelope.payload)
            .map_err(|e| format!("manifest of artifact sha256:{digest} is malformed: {e}"))
            .and_then(|m| m.validate(&digest).map(|()| m).map_err(|e| e.to_string()))
            .and_then(|m| {
                if m.size == size {
                    Ok(m)
                } else {
                    Err(format!(
                        "manifest of artifact sha256:{digest} says {} bytes; the signed desired state says {size}",
                        m.size
                    ))
                }
            }) {
            Ok(m) => m,
            Err(reason) => return self.refuse(&digest, Some(fingerprint), reason).await,
        };
        let chunks = self.chunks.clone();
        let loaded = {
            let manifest = manifest.clone();
            tokio::task::spawn_blocking(move || -> Result<BTreeSet<u32>> {
                match chunks.load(&manifest.digest)? {
                    Some((stored, present)) if stored == manifest => Ok(present),
                    _ => {
                        chunks.reset(&manifest)?;
                        Ok(BTreeSet::new())
                    }
                }
            })
            .await
        };
        let present = match loaded {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return self
                    .reject_pending(&digest, format!("cannot store artifact chunks: {e:#}"))
                    .await;
            }
            Err(e) => {
                return self
                    .reject_pending(&digest, format!("chunk store task failed: {e}"))
                    .await;
            }
        };
        let assembly = Assembly::new(manifest, present);
        tracing::info!(
            %digest,
            chunks = assembly.manifest().chunks.len(),
            already_stored = assembly.held(),
            "artifact manifest received; asking for the missing chunks"
        );
        let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(&digest))
        else {
            return;
        };
        // A manifest replacing one whose chunks did not come: its chunk topics go.
        let previous: Vec<u32> = fetch
            .assembly
            .as_ref()
            .map(Assembly::missing)
            .unwrap_or_default();
        fetch.resumed = assembly.held();
        let missing = assembly.missing();
        let complete = assembly.complete();
        fetch.assembly = Some(assembly);
        fetch.manifest = Some(fingerprint);
        self.handle.unsubscribe(
            previous
                .into_iter()
                .map(|i| self.topics.artifact_chunk(&digest, i))
                .collect(),
        );
        self.handle.subscribe(
            missing
                .into_iter()
                .map(|i| self.topics.artifact_chunk(&digest, i))
                .collect(),
        );
        self.publish_reported().await;
        if complete {
            self.finish_artifact(&digest).await;
        }
    }

    pub(super) async fn on_chunk(&mut self, digest: String, index: u32, bytes: Vec<u8>) {
        let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(&digest))
        else {
            return;
        };
        let Some(assembly) = &fetch.assembly else {
            return;
        };
        if assembly.has(index) {
            fetch.redundant += 1;
            return;
        }
        if let Err(e) = assembly.manifest().check_chunk(index, &bytes) {
            return self.refuse(&digest, None, e.to_string()).await;
        }
        let chunks = self.chunks.clone();
        let d = digest.clone();
        let stored = tokio::task::spawn_blocking(move || chunks.put(&d, index, &bytes)).await;
        if let Ok(Err(e)) | Err(e) = stored.map_err(anyhow::Error::from) {
            return self
                .reject_pending(&digest, format!("cannot store chunk {index}: {e:#}"))
                .await;
        }
        let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(&digest))
        else {
            return;
        };
        let Some(assembly) = fetch.assembly.as_mut() else {
            return;
        };
        assembly.stored(index);
        fetch.fetched += 1;
        self.chunks_fetched += 1;
        let complete = assembly.complete();
        self.handle
            .unsubscribe(vec![self.topics.artifact_chunk(&digest, index)]);
        if complete {
            self.finish_artifact(&digest).await;
        }
    }

    /// Assembles a complete artifact, checks its digest, adds it to the artifact store; applies
    /// the pending deployment when it was the last one.
    async fn finish_artifact(&mut self, digest: &str) {
        let Some((manifest, fingerprint)) = self
            .pending
            .as_ref()
            .and_then(|p| p.fetches.get(digest))
            .and_then(|f| Some((f.assembly.as_ref()?.manifest().clone(), f.manifest.clone()?)))
        else {
            return;
        };
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.system.as_deref() == Some(digest))
        {
            if let Err(reason) = self.finish_system_bundle(manifest).await {
                self.forged_whole(digest, fingerprint, reason).await;
            }
            return;
        }
        let chunks = self.chunks.clone();
        let assembled = {
            let manifest = manifest.clone();
            tokio::task::spawn_blocking(move || chunks.assemble(&manifest)).await
        };
        let bytes = match assembled {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return self
                    .reject_pending(digest, format!("cannot assemble: {e:#}"))
                    .await;
            }
            Err(e) => {
                return self
                    .reject_pending(digest, format!("assembly task failed: {e}"))
                    .await;
            }
        };
        if let Err(e) = manifest.check_whole(&bytes) {
            drop(bytes);
            return self.forged_whole(digest, fingerprint, e.to_string()).await;
        }
        let (compiled_for, compiled_elsewhere) = self
            .pending
            .as_ref()
            .map(|p| {
                (
                    p.precompiled.get(digest).cloned(),
                    p.compiled_elsewhere.contains(digest),
                )
            })
            .unwrap_or_default();
        let store = self.agent.artifacts();
        let added = match compiled_for {
            Some(module) => store.add_precompiled(&module, bytes).await.map_err(|e| {
                format!(
                    "compiled artifact sha256:{digest} for module sha256:{module} is refused: {e:#}"
                )
            }),
            None if compiled_elsewhere => store.add_source(bytes).await.map(drop).map_err(|e| {
                format!("artifact sha256:{digest} is not a WebAssembly module: {e:#}")
            }),
            None => store
                .add(bytes)
                .await
                .map(drop)
                .map_err(|e| format!("artifact sha256:{digest} does not load: {e:#}")),
        };
        if let Err(reason) = added {
            return self.reject_pending(digest, reason).await;
        }
        self.chunks.remove(digest);
        tracing::info!(%digest, "artifact received and verified");
        self.handle
            .unsubscribe(vec![self.topics.artifact_manifest(digest)]);
        let done = {
            let Some(pending) = self.pending.as_mut() else {
                return;
            };
            pending.fetches.remove(digest);
            pending.fetches.is_empty()
        };
        if done && let Some(pending) = self.pending.take() {
            self.apply(pending.desired, pending.signer).await;
        }
    }

    /// A whole artifact that is not the signed one (a manifest with chunks to match): start
    /// over with the next manifest (the node is still subscribed to the manifest topic).
    async fn forged_whole(&mut self, digest: &str, fingerprint: String, reason: String) {
        let chunks = self.chunks.clone();
        let d = digest.to_owned();
        let _ = tokio::task::spawn_blocking(move || chunks.remove(&d)).await;
        if let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(digest))
        {
            fetch.assembly = None;
            fetch.manifest = None;
        }
        self.refuse(digest, Some(fingerprint), reason).await;
    }
}

/// The compiled artifacts of `desired` this node takes (compiled sha256 -> module): those for
/// its engine fingerprint, for modules it has no compiled form of yet; and the modules
/// compiled for it. A module compiled only for other engines is compiled here, and the log
/// says why. The hub link and `lichen import` decide alike.
pub(super) fn precompiled_for(
    store: &ArtifactStore,
    desired: &DesiredState,
) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let engine = store.engine();
    let mut fetch = BTreeMap::new();
    let mut ours = BTreeSet::new();
    for p in desired
        .precompiled
        .iter()
        .filter(|p| p.engine == engine.fingerprint())
    {
        ours.insert(p.module.clone());
        if !store.has_compiled(&p.module) {
            fetch.insert(p.sha256.clone(), p.module.clone());
        }
    }
    for p in desired
        .precompiled
        .iter()
        .filter(|p| !ours.contains(&p.module))
    {
        tracing::warn!(
            module = %p.module,
            "deployment version {}: module sha256:{} is precompiled for engine {} (target {}), not this node's engine {} (target {}); compiling the source instead",
            desired.version,
            p.module,
            p.engine,
            p.target,
            engine.fingerprint(),
            engine.target()
        );
    }
    (fetch, ours)
}
