//! The link to the MQTT hub: runs a [`lichen_sync::SyncSession`] over the state store's outbox
//! and acts on what the hub sends.
//!
//! Started by `lichen run` when the agent config has a `[hub]` section. [`HubLink::start`]:
//! - drains the outbox (telemetry, reported state, command results) through the session, woken
//!   by the store after every commit that adds rows;
//! - applies deployments from `desired` ([`DesiredState`]): only a version newer than the one
//!   applied, only with a valid ed25519 signature from a trusted key (unless `insecure-dev`),
//!   validated exactly as `lichen deploy` does ([`Agent::deploy_text`]); a rejection leaves the
//!   running deployment alone and is reported;
//! - delivers commands from `cmd/<workload>` as `command` events, once per message id (the
//!   inbox table remembers ids across restarts), and queues each result for `cmd-result`;
//! - keeps the outbox under its quota, dropping the oldest telemetry and counting the drops;
//! - publishes reported state (retained) at start, on every connection, deployment, rejection,
//!   quota drop, and workload status change.
//!
//! - applies bundles given to `lichen import` ([`import_bundle`], [`bundle`]), verified exactly
//!   as a desired state from the hub, with no network; the bundle is read and its artifacts
//!   checked and stored by an importer task of its own, so the link keeps serving meanwhile;
//! - fetches the artifacts a verified deployment names by digest and the node lacks, in chunks
//!   over MQTT ([`artifacts`]): resumable across reconnects and restarts, each chunk and the
//!   whole artifact checked before use; a tampered one rejects the deployment.
//!
//! The wire format of `desired` and the signature's canonical bytes are documented in
//! `docs/topics.md`.

pub mod artifacts;
pub mod bundle;
mod import;
pub mod signing;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lichen_sync::{
    Assembly, Envelope, Inbound, InboundError, Manifest, Quota, RowId, RowKind, RowSize,
    SessionConfig, SessionEvent, SyncHandle, SyncSession, TlsFiles, Topics,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::control::Control;
use crate::api::types::{ApiError, DeployReport, SendRequest};
use crate::config::{HubSection, parse_size};
use crate::store::{OutboxRecord, SqliteOutbox, StateStore};
use crate::supervisor::Agent;

pub use import::{ImportReport, ImportRequest, import_bundle};
pub use signing::{
    SIGNATURE_CONTEXT, TrustedKey, base64_decode, base64_encode, canonical_bytes, generate_key,
    key_id, parse_public_key, sign, verify,
};

/// `hub_state` key of the applied hub deployment version.
const APPLIED_VERSION: &str = "applied-version";
/// `hub_state` key of the dropped-telemetry counts (JSON object, workload -> count).
const DROPPED: &str = "dropped-telemetry";
/// How often the outbox size and the workload statuses are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Errors kept for reported state.
const KEEP_ERRORS: usize = 10;

/// The payload of a `desired` message: one deployment for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DesiredState {
    /// The hub's version of the desired state; applied only if newer than the applied one.
    pub version: u64,
    /// The deployment document (TOML, the same text `lichen deploy` takes).
    pub deployment: String,
    /// ed25519 signature of [`canonical_bytes`], base64.
    #[serde(default)]
    pub signature: Option<String>,
    /// Id of the key that signed ([`key_id`]).
    #[serde(default)]
    pub key_id: Option<String>,
}

/// A parsed hub URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    /// Whether it is `mqtts://`.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (1883 for `mqtt://`, 8883 for `mqtts://` unless given).
    pub port: u16,
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
pub fn parse_url(url: &str) -> Result<HubUrl> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        bail!("hub url {url:?} must start with mqtt:// or mqtts://");
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .with_context(|| format!("hub url {url:?} has an invalid port {port:?}"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        bail!("hub url {url:?} has no valid host");
    }
    Ok(HubUrl {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    })
}

/// The session settings for `url` and `node`, with TLS and credentials as given.
pub fn session_config(
    url: &str,
    node: &str,
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
    credentials: Option<(&str, &str)>,
) -> Result<SessionConfig> {
    let url = parse_url(url)?;
    let mut config = SessionConfig::new(node, url.host, url.port);
    if url.tls {
        let ca = ca_file.context("an mqtts:// hub url needs a CA file (hub.ca-file)")?;
        config.tls = Some(TlsFiles {
            ca: ca.to_path_buf(),
            client: client.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
        });
    } else if client.is_some() {
        bail!("a client certificate needs an mqtts:// hub url");
    }
    config.credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
    // Reconnect quickly at first: a board on a flaky link should not wait long after a blip.
    config.backoff_initial = Duration::from_millis(500);
    config.backoff_max = Duration::from_secs(60);
    Ok(config)
}

/// The session settings of a `[hub]` section.
pub fn section_session_config(hub: &HubSection) -> Result<SessionConfig> {
    let client = match (&hub.client_cert, &hub.client_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => bail!("hub.client-cert and hub.client-key go together"),
    };
    let credentials = match (&hub.username, &hub.password) {
        (Some(u), p) => Some((u.as_str(), p.as_deref().unwrap_or(""))),
        (None, None) => None,
        (None, Some(_)) => bail!("hub.password needs hub.username"),
    };
    session_config(
        &hub.url,
        &hub.node_id,
        hub.ca_file.as_deref(),
        client,
        credentials,
    )
}

/// A running hub link; [`HubLink::shutdown`] stops it.
pub struct HubLink {
    handle: SyncHandle,
    session: JoinHandle<()>,
    bridge: JoinHandle<()>,
    importer: JoinHandle<()>,
}

impl HubLink {
    /// Starts the session and the bridge for `agent` as `[hub]` says.
    pub async fn start(agent: Agent, hub: &HubSection) -> Result<Self> {
        let config = section_session_config(hub).context("invalid [hub] section")?;
        let keys = hub
            .trusted_keys
            .iter()
            .enumerate()
            .map(|(i, k)| parse_public_key(k).with_context(|| format!("hub.trusted-keys[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let quota = parse_size(&hub.outbox_quota).context("invalid hub.outbox-quota")?;
        let store = agent.store().clone();
        let (session, handle, events) =
            SyncSession::new(config, Arc::new(SqliteOutbox::new(store.clone())))
                .context("cannot set up the hub session")?;
        {
            let handle = handle.clone();
            store.set_outbox_listener(move || handle.outbox_changed());
        }
        if hub.insecure_dev {
            tracing::warn!(
                "hub.insecure-dev is set: deployments from the hub are applied WITHOUT a valid signature"
            );
        }
        let dropped: BTreeMap<String, u64> = store
            .hub_state(DROPPED)?
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let topics = Topics::new(&hub.node_id).context("invalid hub.node-id")?;
        // The state directory holds the database and the artifact store.
        let state_dir = store
            .path()
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let chunks = artifacts::ChunkStore::new(state_dir.join("artifacts").join("partial"));
        let importer = import::Importer {
            node: hub.node_id.clone(),
            keys: keys.clone(),
            insecure_dev: hub.insecure_dev,
            store: store.clone(),
            agent: agent.clone(),
            limits: bundle::Limits::default(),
        };
        let mut bridge = Bridge {
            topics,
            handle: handle.clone(),
            chunks,
            pending: None,
            chunks_fetched: 0,
            agent,
            store,
            node: hub.node_id.clone(),
            url: hub.url.clone(),
            keys,
            insecure_dev: hub.insecure_dev,
            quota: Quota::new(quota),
            dropped,
            connected: false,
            reconnects: 0,
            last_connection_error: None,
            last_rejection: None,
            rejected_version: None,
            errors: Vec::new(),
            rejected_messages: 0,
            commands: Arc::new(AtomicU64::new(0)),
            last_seen: String::new(),
        };
        tracing::info!(url = %hub.url, node = %hub.node_id, "connecting to the hub");
        let session = tokio::spawn(session.run());
        bridge.publish_reported().await;
        let (imports_tx, imports) = mpsc::channel(4);
        if !import::route_imports(imports_tx) {
            tracing::warn!("a second hub link in this process: `lichen import` goes to the first");
        }
        let (checked_tx, checked) = mpsc::channel(1);
        let importer = tokio::spawn(importer.run(imports, checked_tx));
        let bridge = tokio::spawn(bridge.run(events, checked));
        Ok(Self {
            handle,
            session,
            bridge,
            importer,
        })
    }

    /// Disconnects and stops the bridge.
    pub async fn shutdown(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session).await;
        self.bridge.abort();
        self.importer.abort();
    }
}

struct Rejection {
    version: Option<u64>,
    reason: String,
    at_ms: u64,
}

/// A verified deployment waiting for its artifacts.
struct Pending {
    desired: DesiredState,
    signer: String,
    /// Artifacts still being fetched, by digest.
    fetches: BTreeMap<String, Fetch>,
}

/// The transfer of one artifact.
#[derive(Default)]
struct Fetch {
    /// `None` until the manifest came.
    assembly: Option<Assembly>,
    /// Chunks found already stored when the manifest came (from before a restart).
    resumed: usize,
    /// Chunks received and stored in this run.
    fetched: usize,
    /// Chunks received that were already stored.
    redundant: usize,
}

/// The agent side of the session: acts on its events and keeps what reported state says.
struct Bridge {
    topics: Topics,
    handle: SyncHandle,
    chunks: artifacts::ChunkStore,
    pending: Option<Pending>,
    chunks_fetched: u64,
    agent: Agent,
    store: StateStore,
    node: String,
    url: String,
    keys: Vec<TrustedKey>,
    insecure_dev: bool,
    quota: Quota,
    dropped: BTreeMap<String, u64>,
    connected: bool,
    reconnects: u64,
    last_connection_error: Option<String>,
    last_rejection: Option<Rejection>,
    /// The newest desired version already rejected (not validated again on every reconnect).
    rejected_version: Option<u64>,
    errors: Vec<String>,
    rejected_messages: u64,
    commands: Arc<AtomicU64>,
    /// What the last reported state said of the deployment and workloads, to notice changes.
    last_seen: String,
}

/// The hub version of the desired state applied last (0 before the first).
fn applied_version(store: &StateStore) -> u64 {
    store
        .hub_state(APPLIED_VERSION)
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Bridge {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<SessionEvent>,
        mut imports: mpsc::Receiver<import::Checked>,
    ) {
        let mut check = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => return,
                },
                Some(checked) = imports.recv() => {
                    let result = self.finish_import(checked.path, checked.outcome).await;
                    let _ = checked.reply.send(result);
                },
                _ = check.tick() => {
                    self.enforce_quota().await;
                    if self.seen_now().await != self.last_seen {
                        self.publish_reported().await;
                    }
                }
            }
        }
    }

    fn error(&mut self, text: String) {
        tracing::warn!("hub: {text}");
        self.errors.push(format!("{} {text}", now_ms()));
        if self.errors.len() > KEEP_ERRORS {
            self.errors.remove(0);
        }
    }

    async fn on_event(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Connected { .. } => {
                self.connected = true;
                self.publish_reported().await;
            }
            SessionEvent::ConnectFailed { error, .. }
            | SessionEvent::Disconnected { error, .. } => {
                self.connected = false;
                self.reconnects += 1;
                // A new reason is worth a reported state (queued: the hub reads it when the
                // link is back); the same reason on every retry is not worth a write each.
                let new = self.last_connection_error.as_ref() != Some(&error);
                self.last_connection_error = Some(error);
                if new {
                    self.publish_reported().await;
                }
            }
            SessionEvent::Subscribed => {}
            SessionEvent::SubscribeRefused { filter } => {
                self.error(format!("the broker refused the subscription to {filter}"));
                self.publish_reported().await;
            }
            SessionEvent::Inbound(Inbound::Desired(envelope)) => self.on_desired(envelope).await,
            SessionEvent::Inbound(Inbound::Command {
                workload,
                envelope,
                ack,
            }) => self.on_command(workload, envelope, ack),
            SessionEvent::Inbound(Inbound::ArtifactManifest { digest, envelope }) => {
                self.on_manifest(digest, envelope).await
            }
            SessionEvent::Inbound(Inbound::ArtifactChunk {
                digest,
                index,
                bytes,
            }) => self.on_chunk(digest, index, bytes).await,
            SessionEvent::Rejected(e) => {
                self.rejected_messages += 1;
                let text = e.to_string();
                if let InboundError::Malformed { topic, .. } = &e
                    && topic.ends_with("/desired")
                {
                    self.last_rejection = Some(Rejection {
                        version: None,
                        reason: text.clone(),
                        at_ms: now_ms(),
                    });
                }
                self.error(text);
                self.publish_reported().await;
            }
            SessionEvent::Unpublishable(bad) => {
                self.error(bad.to_string());
            }
            SessionEvent::Outbox(e) => self.error(e.to_string()),
        }
    }

    fn applied_version(&self) -> u64 {
        applied_version(&self.store)
    }

    async fn reject(&mut self, version: Option<u64>, reason: String) {
        self.rejected_version = version.or(self.rejected_version);
        self.error(format!("desired state rejected: {reason}"));
        self.record_rejection(version, reason, "hub-rejected").await;
    }

    /// Logs a rejection as event `event`, keeps it as the last one and reports it.
    async fn record_rejection(&mut self, version: Option<u64>, reason: String, event: &str) {
        let _ = self
            .store
            .log_event(None, event, &reason)
            .await
            .map_err(|e| tracing::warn!("cannot log the rejection: {e}"));
        self.last_rejection = Some(Rejection {
            version,
            reason,
            at_ms: now_ms(),
        });
        self.publish_reported().await;
    }

    async fn on_desired(&mut self, envelope: Envelope) {
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
        let applied = self.applied_version();
        if desired.version <= applied {
            tracing::debug!(
                version = desired.version,
                applied,
                "desired state is not newer than the applied one"
            );
            return;
        }
        if self.rejected_version == Some(desired.version) {
            return;
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.desired.version == desired.version)
        {
            return;
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
            Err(reason) => return self.reject(Some(desired.version), reason).await,
        };
        self.fetch_or_apply(desired, signer).await;
    }

    /// Applies a verified deployment, or first fetches the artifacts it names that the node
    /// lacks.
    async fn fetch_or_apply(&mut self, desired: DesiredState, signer: String) {
        self.cancel_pending();
        let missing: Vec<String> = artifacts::referenced_digests(&desired.deployment)
            .into_iter()
            .filter(|d| !self.agent.artifacts().contains(d))
            .collect();
        if missing.is_empty() {
            return self.apply(desired, signer).await;
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
            desired,
            signer,
            fetches: missing.into_iter().map(|d| (d, Fetch::default())).collect(),
        });
        self.publish_reported().await;
    }

    /// Unsubscribes from every topic of the pending transfer and forgets it (its chunks stay
    /// stored for a later try).
    fn cancel_pending(&mut self) {
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
        let version = self.pending.as_ref().map(|p| p.desired.version);
        self.cancel_pending();
        let chunks = self.chunks.clone();
        let digest = digest.to_owned();
        let _ = tokio::task::spawn_blocking(move || chunks.remove(&digest)).await;
        self.reject(
            version,
            format!(
                "deployment version {} rejected: {reason}",
                version.unwrap_or(0)
            ),
        )
        .await;
    }

    async fn on_manifest(&mut self, digest: String, envelope: Envelope) {
        let Some(fetch) = self
            .pending
            .as_mut()
            .and_then(|p| p.fetches.get_mut(&digest))
        else {
            return;
        };
        if fetch.assembly.is_some() {
            return;
        }
        let manifest = match serde_json::from_value::<Manifest>(envelope.payload)
            .map_err(|e| format!("manifest of artifact sha256:{digest} is malformed: {e}"))
            .and_then(|m| m.validate(&digest).map(|()| m).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(reason) => return self.reject_pending(&digest, reason).await,
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
        let missing = assembly.missing();
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
        fetch.resumed = assembly.held();
        let complete = assembly.complete();
        fetch.assembly = Some(assembly);
        self.handle
            .unsubscribe(vec![self.topics.artifact_manifest(&digest)]);
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

    async fn on_chunk(&mut self, digest: String, index: u32, bytes: Vec<u8>) {
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
            return self.reject_pending(&digest, e.to_string()).await;
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
        let Some(manifest) = self
            .pending
            .as_ref()
            .and_then(|p| p.fetches.get(digest))
            .and_then(|f| f.assembly.as_ref())
            .map(|a| a.manifest().clone())
        else {
            return;
        };
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
            return self.reject_pending(digest, e.to_string()).await;
        }
        if let Err(e) = self.agent.artifacts().add(bytes).await {
            return self
                .reject_pending(
                    digest,
                    format!("artifact sha256:{digest} does not load: {e:#}"),
                )
                .await;
        }
        self.chunks.remove(digest);
        tracing::info!(%digest, "artifact received and verified");
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

    /// Refuses an import: reported like a hub rejection (but the version stays open to the
    /// hub: a damaged bundle says nothing of the hub's copy); returns the error for the caller.
    async fn reject_import(&mut self, version: Option<u64>, reason: String) -> ApiError {
        let reason = format!("import refused: {reason}");
        self.error(reason.clone());
        self.record_rejection(version, reason.clone(), "import-rejected")
            .await;
        ApiError::invalid(reason)
    }

    /// `lichen import`, once the importer has checked the bundle and put its artifacts in the
    /// store: applies it as a desired state from the hub, or records why it was refused.
    async fn finish_import(
        &mut self,
        path: std::path::PathBuf,
        outcome: Result<import::Verified, import::Refusal>,
    ) -> Result<ImportReport, ApiError> {
        let verified = match outcome {
            Ok(v) => v,
            Err(refusal) => return Err(self.reject_import(refusal.version, refusal.reason).await),
        };
        let desired = verified.desired;
        let version = Some(desired.version);
        // A hub version may have been applied while the importer worked.
        let applied = self.applied_version();
        if desired.version <= applied {
            let reason = format!(
                "bundle {} holds version {}, not newer than the applied version {applied}",
                path.display(),
                desired.version
            );
            return Err(self.reject_import(version, reason).await);
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.desired.version <= desired.version)
        {
            self.cancel_pending();
        }
        let v = desired.version;
        match self.apply_checked(desired, verified.signer.clone()).await {
            Ok(deployment) => Ok(ImportReport {
                node: self.node.clone(),
                version: v,
                signer: verified.signer,
                artifacts: verified.added,
                deployment,
            }),
            Err(reason) => Err(self.reject_import(version, reason).await),
        }
    }

    /// Applies a verified deployment whose artifacts are all in the store; a rejection is
    /// recorded for the hub.
    async fn apply(&mut self, desired: DesiredState, signer: String) {
        let version = desired.version;
        if let Err(reason) = self.apply_checked(desired, signer).await {
            self.reject(Some(version), reason).await;
        }
    }

    /// Applies a verified deployment; returns the reason if it is invalid.
    async fn apply_checked(
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
                self.publish_reported().await;
                Ok(report)
            }
            Err(e) => Err(format!(
                "deployment version {} is invalid: {}",
                desired.version, e.error
            )),
        }
    }

    /// Runs a hub command and queues its result; the broker gets the command's PUBACK only once
    /// the id is in the inbox and the result in the outbox (one transaction), so a crash before
    /// that makes the broker deliver it again.
    fn on_command(&mut self, workload: String, envelope: Envelope, ack: lichen_sync::InboundAck) {
        let agent = self.agent.clone();
        let store = self.store.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let id = envelope.id.to_string();
            match store.inbox_contains(&id) {
                Ok(true) => {
                    tracing::debug!(%id, "hub command already handled before a restart");
                    ack.ack();
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot read the inbox: {e}"),
            }
            let result = match parse_command(&envelope.payload) {
                Err(error) => json!({"cmd": id, "ok": false, "error": error}),
                Ok(req) => match agent.send(&workload, req).await {
                    Ok(reply) => json!({"cmd": id, "ok": true, "reply": reply.reply}),
                    Err(e) => json!({"cmd": id, "ok": false, "error": e.error}),
                },
            };
            commands.fetch_add(1, Ordering::Relaxed);
            let record = OutboxRecord {
                kind: RowKind::CmdResult.as_str().to_owned(),
                workload: workload.clone(),
                stream: String::new(),
                payload: result.to_string().into_bytes(),
                created_at_ms: now_ms(),
            };
            match store.command_done(&id, record).await {
                Ok(_) => ack.ack(),
                // Not acknowledged: the broker delivers it again after a reconnect.
                Err(e) => tracing::warn!(%id, %workload, "cannot queue the command result: {e}"),
            }
        });
    }

    async fn enforce_quota(&mut self) {
        let plan = match drop_over_quota(&self.store, &mut self.quota).await {
            Ok(Some(plan)) => plan,
            Ok(None) => return,
            Err(e) => return self.error(e),
        };
        for (workload, n) in &plan.per_workload {
            *self.dropped.entry(workload.clone()).or_default() += n;
        }
        tracing::warn!(
            rows = plan.ids.len(),
            bytes = plan.bytes,
            "outbox over its quota: dropped the oldest telemetry"
        );
        if let Ok(text) = serde_json::to_string(&self.dropped) {
            let _ = self.store.set_hub_state(DROPPED, &text).await;
        }
        self.publish_reported().await;
    }

    /// What reported state says of the deployment and workloads now, to notice changes.
    async fn seen_now(&self) -> String {
        let version = self
            .store
            .current_deployment()
            .ok()
            .flatten()
            .map_or(0, |d| d.version);
        let mut seen = format!("{version}");
        if let Some(p) = &self.pending {
            for (digest, f) in &p.fetches {
                let held = f.assembly.as_ref().map_or(0, Assembly::held);
                seen.push_str(&format!("|{digest}:{held}"));
            }
        }
        for w in self.agent.ps().await {
            seen.push_str(&format!(
                "|{}:{}:{}",
                w.name,
                w.state,
                w.last_error.unwrap_or_default()
            ));
        }
        seen
    }

    async fn reported(&self) -> serde_json::Value {
        let deployment = self.store.current_deployment().ok().flatten();
        let applied = self.applied_version();
        let workloads: Vec<serde_json::Value> = self
            .agent
            .ps()
            .await
            .into_iter()
            .map(|w| {
                json!({
                    "name": w.name,
                    "state": w.state,
                    "module": w.module_digest,
                    "restarts": w.restarts,
                    "traps": w.traps,
                    "events": w.events_handled,
                    "last-error": w.last_error,
                })
            })
            .collect();
        json!({
            "node": self.node,
            "agent": env!("CARGO_PKG_VERSION"),
            "insecure-dev": self.insecure_dev,
            "warning": self.insecure_dev.then_some(
                "INSECURE: hub.insecure-dev is set, deployments are applied without a valid signature"
            ),
            "applied-version": (applied > 0).then_some(applied),
            "deployment": deployment.map(|d| json!({
                "local-version": d.version,
                "source": d.source_name,
                "digest": d.digest,
            })),
            "last-rejection": self.last_rejection.as_ref().map(|r| json!({
                "version": r.version,
                "reason": r.reason,
                "at-ms": r.at_ms,
            })),
            "artifacts": self.pending.as_ref().map(|p| json!({
                "version": p.desired.version,
                "fetching": p.fetches.iter().map(|(digest, f)| json!({
                    "digest": digest,
                    "chunks": f.assembly.as_ref().map(|a| a.manifest().chunks.len()),
                    "held": f.assembly.as_ref().map_or(0, Assembly::held),
                    "resumed": f.resumed,
                    "fetched": f.fetched,
                    "redundant": f.redundant,
                })).collect::<Vec<_>>(),
            })),
            "connection": {
                "url": self.url,
                "connected": self.connected,
                "reconnects": self.reconnects,
                "last-error": self.last_connection_error,
            },
            "workloads": workloads,
            "counters": {
                "dropped-telemetry": self.dropped,
                "commands": self.commands.load(Ordering::Relaxed),
                "rejected-messages": self.rejected_messages,
                "artifact-chunks": self.chunks_fetched,
                "outbox-rows": self.store.outbox_len().unwrap_or(0),
            },
            "errors": self.errors,
        })
    }

    async fn publish_reported(&mut self) {
        self.last_seen = self.seen_now().await;
        let record = OutboxRecord {
            kind: RowKind::State.as_str().to_owned(),
            workload: String::new(),
            stream: String::new(),
            payload: self.reported().await.to_string().into_bytes(),
            created_at_ms: now_ms(),
        };
        if let Err(e) = self.store.push_outbox(record).await {
            tracing::warn!("cannot queue reported state: {e}");
        }
    }
}

/// Deletes the oldest telemetry rows until the outbox is within `quota` (reported state,
/// command results and events are never dropped); returns what was dropped, `None` when the
/// outbox was within its quota.
async fn drop_over_quota(
    store: &StateStore,
    quota: &mut Quota,
) -> std::result::Result<Option<lichen_sync::DropPlan>, String> {
    let bytes = store
        .outbox_bytes()
        .map_err(|e| format!("cannot measure the outbox: {e}"))?;
    if bytes <= quota.limit_bytes() {
        return Ok(None);
    }
    let rows = store
        .oldest_telemetry(bytes - quota.limit_bytes())
        .map_err(|e| format!("cannot read the outbox: {e}"))?;
    let plan = quota.plan(
        bytes,
        rows.into_iter().map(|r| RowSize {
            id: RowId(u64::try_from(r.id).unwrap_or(0)),
            workload: r.workload,
            kind: RowKind::Telemetry,
            bytes: r.bytes,
        }),
    );
    if plan.ids.is_empty() {
        return Ok(None);
    }
    let ids = plan
        .ids
        .iter()
        .filter_map(|id| i64::try_from(id.0).ok())
        .collect();
    store
        .delete_outbox(ids)
        .await
        .map_err(|e| format!("cannot drop telemetry over the quota: {e}"))?;
    Ok(Some(plan))
}

/// A hub command's payload: `{"command": NAME, "payload": TEXT or any JSON}`.
fn parse_command(payload: &serde_json::Value) -> Result<SendRequest, String> {
    let command = payload
        .get("command")
        .and_then(|c| c.as_str())
        .ok_or_else(|| {
            "command message has no \"command\" string (expected {\"command\": NAME, \"payload\": ...})"
                .to_owned()
        })?;
    let payload = match payload.get("payload") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Ok(SendRequest {
        command: command.to_owned(),
        payload,
    })
}

/// `doctor`'s view of a `[hub]` section: status and detail, including whether the broker
/// accepts a connection with the section's TLS files and credentials right now.
pub fn doctor_check(hub: Option<&HubSection>) -> (&'static str, String) {
    let (status, detail) = static_check(hub);
    let Some(hub) = hub else {
        return (status, detail);
    };
    match probe(hub) {
        Ok(()) => (
            status,
            format!("{detail}; the broker accepted a test connection"),
        ),
        Err(e) => ("fail", format!("{detail}; cannot connect: {e}")),
    }
}

/// Connects once to the hub as `[hub]` says (TLS, client certificate, credentials) under a
/// client id of its own (the node's would push the running agent off the broker); returns
/// why it failed. Runs on a thread of its own: it may be called from async code.
pub fn probe(hub: &HubSection) -> std::result::Result<(), String> {
    let hub = hub.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        runtime.block_on(probe_async(&hub))
    })
    .join()
    .unwrap_or_else(|_| Err("the connection probe panicked".to_owned()))
}

async fn probe_async(hub: &HubSection) -> std::result::Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};
    let config = section_session_config(hub).map_err(|e| format!("{e:#}"))?;
    let broker = format!(
        "{}://{}:{}",
        if config.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        },
        config.host,
        config.port
    );
    let mut options = MqttOptions::new(
        format!("{}-doctor-{}", config.node, std::process::id()),
        config.host.clone(),
        config.port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        let tls = lichen_sync::rustls_config(tls).map_err(|e| e.to_string())?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    eventloop.network_options.set_connection_timeout(5);
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let mut text = format!("{broker}: {e}");
                    if text.contains("invalid peer certificate")
                        && let Some(tls) = &config.tls
                    {
                        text.push_str(&format!(
                            " (the broker's certificate is not trusted by the CA file {})",
                            tls.ca.display()
                        ));
                    }
                    return Err(text);
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("{broker}: no CONNACK within 10 s")));
    if result.is_ok() {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }
    result
}

fn static_check(hub: Option<&HubSection>) -> (&'static str, String) {
    match hub {
        None => ("ok", "no [hub] section: the node runs offline".to_owned()),
        Some(hub) if hub.insecure_dev => (
            "warn",
            format!(
                "INSECURE: hub.insecure-dev is set, deployments from {} are applied WITHOUT a valid signature",
                hub.url
            ),
        ),
        Some(hub) if hub.trusted_keys.is_empty() => (
            "warn",
            format!(
                "node {} syncs with {}, but hub.trusted-keys is empty: every hub deployment will be rejected",
                hub.node_id, hub.url
            ),
        ),
        Some(hub) => (
            "ok",
            format!(
                "node {} syncs with {}; deployments must be signed by one of {} trusted key(s)",
                hub.node_id,
                hub.url,
                hub.trusted_keys.len()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_quota_drops_the_oldest_telemetry_first_and_never_state_or_results() {
        use crate::store::{NewDeployment, NewWorkload, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
        store
            .apply_deployment(NewDeployment {
                source_name: "t".into(),
                source_text: String::new(),
                digest: String::new(),
                description: None,
                workloads: ["a", "b"]
                    .map(|n| NewWorkload {
                        name: n.into(),
                        spec_json: "{}".into(),
                        module_digest: "x".into(),
                    })
                    .to_vec(),
            })
            .await
            .unwrap();
        let push = |kind: &str, workload: &str, tag: u32| OutboxRecord {
            kind: kind.into(),
            workload: workload.into(),
            stream: if kind == "telemetry" {
                "s".into()
            } else {
                String::new()
            },
            payload: format!("{{\"tag\":{tag},\"pad\":\"{}\"}}", "x".repeat(80)).into_bytes(),
            created_at_ms: 1,
        };
        // Oldest first: a result, then telemetry of a and b interleaved, state in between.
        store.push_outbox(push("cmd-result", "a", 0)).await.unwrap();
        for tag in 1..=10 {
            let w = if tag % 2 == 1 { "a" } else { "b" };
            store.push_outbox(push("telemetry", w, tag)).await.unwrap();
            if tag == 5 {
                store.push_outbox(push("state", "", 100)).await.unwrap();
            }
        }
        let row = 100 + crate::store::OUTBOX_ROW_OVERHEAD;
        // Room for 8 rows of the 12: 4 must go, all telemetry, the 4 oldest (tags 1-4).
        let mut quota = Quota::new(8 * row);
        let plan = drop_over_quota(&store, &mut quota)
            .await
            .unwrap()
            .expect("over");
        assert_eq!(plan.ids.len(), 4, "{plan:?}");
        assert_eq!(plan.per_workload.get("a"), Some(&2));
        assert_eq!(plan.per_workload.get("b"), Some(&2));
        let left: Vec<(String, u64)> = store
            .outbox_peek(100)
            .unwrap()
            .into_iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
                (r.kind, v["tag"].as_u64().unwrap())
            })
            .collect();
        let tags: Vec<u64> = left.iter().map(|(_, t)| *t).collect();
        assert_eq!(tags, vec![0, 5, 100, 6, 7, 8, 9, 10], "{left:?}");
        assert!(drop_over_quota(&store, &mut quota).await.unwrap().is_none());
        // Below the size of what may never be dropped: every telemetry row goes, the rest stays.
        let mut tiny = Quota::new(row);
        let plan = drop_over_quota(&store, &mut tiny)
            .await
            .unwrap()
            .expect("over");
        assert_eq!(plan.ids.len(), 6);
        assert!(plan.still_over > 0);
        let kinds: Vec<String> = store
            .outbox_peek(100)
            .unwrap()
            .into_iter()
            .map(|r| r.kind)
            .collect();
        assert_eq!(kinds, vec!["cmd-result", "state"]);
    }

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1999").unwrap(),
            HubUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1999
            }
        );
        assert_eq!(parse_url("mqtts://hub.example").unwrap().port, 8883);
        assert_eq!(parse_url("mqtt://hub").unwrap().port, 1883);
        assert!(parse_url("http://hub").is_err());
        assert!(parse_url("mqtt://hub:x").is_err());
        let err = format!(
            "{:#}",
            session_config("mqtts://h", "n", None, None, None).unwrap_err()
        );
        assert!(err.contains("CA file"), "{err}");
    }

    #[test]
    fn desired_state_refuses_unknown_fields() {
        let ok: DesiredState =
            serde_json::from_value(json!({"version": 1, "deployment": "x"})).unwrap();
        assert_eq!(ok.version, 1);
        assert!(serde_json::from_value::<DesiredState>(json!({"version": 1})).is_err());
        assert!(
            serde_json::from_value::<DesiredState>(
                json!({"version": 1, "deployment": "x", "extra": 1})
            )
            .is_err()
        );
    }
}
