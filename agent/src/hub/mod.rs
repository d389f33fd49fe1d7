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
//!   as a desired state from the hub, with no network;
//! - fetches the artifacts a verified deployment names by digest and the node lacks, in chunks
//!   over MQTT ([`artifacts`]): resumable across reconnects and restarts, each chunk and the
//!   whole artifact checked before use; a tampered one rejects the deployment.
//!
//! The wire format of `desired` and the signature's canonical bytes are documented in
//! `docs/topics.md`.

pub mod artifacts;
pub mod bundle;
mod commands;
mod desired;
mod doctor;
mod fetch;
mod reported;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lichen_sync::{
    Inbound, InboundError, Quota, RowId, RowKind, RowSize, SessionConfig, SessionEvent, SyncHandle,
    SyncSession, TlsFiles, Topics,
};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::types::{ApiError, DeployReport};
use crate::config::{HubSection, parse_size};
use crate::store::{SqliteOutbox, StateStore};
use crate::supervisor::Agent;
pub use desired::{
    DesiredState, TrustedKey, canonical_bytes, fingerprint, key_id, parse_public_key, sign_desired,
    signed_bytes, verify,
};
use desired::{Ignored, Settled};
pub use doctor::{doctor_check, probe};
use fetch::Pending;

/// Domain separation prefix of the signed bytes (see [`canonical_bytes`]).
pub const SIGNATURE_CONTEXT: &str = "lichen-desired-v1";
/// Domain separation prefix of the signed bytes of a desired state that lists artifacts
/// (see [`signed_bytes`]).
pub const SIGNATURE_CONTEXT_V2: &str = "lichen-desired-v2";
/// `hub_state` key of the fingerprint of the applied desired state ([`fingerprint`]).
const APPLIED_DESIRED: &str = "applied-desired";
/// Desired states (and manifests) remembered as refused or ignored, so the retained copy that
/// comes back on every connection is not handled again.
const KEEP_SETTLED: usize = 16;
/// `hub_state` key of the applied hub deployment version.
const APPLIED_VERSION: &str = "applied-version";
/// `hub_state` key of the dropped-telemetry counts (JSON object, workload -> count).
const DROPPED: &str = "dropped-telemetry";
/// How often the outbox size and the workload statuses are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Errors kept for reported state.
const KEEP_ERRORS: usize = 10;

/// Signs a desired state with a PKCS#8 ed25519 key (DER, or PEM `PRIVATE KEY`); returns the
/// base64 signature and the key id.
pub fn sign(pkcs8: &[u8], node: &str, version: u64, deployment: &str) -> Result<(String, String)> {
    let der = pem_or_der(pkcs8)?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("not an ed25519 PKCS#8 private key: {e}"))?;
    let signature = pair.sign(&canonical_bytes(node, version, deployment));
    Ok((
        base64_encode(signature.as_ref()),
        key_id(pair.public_key().as_ref()),
    ))
}

/// Body of `POST /v1/import`: a bundle on the node's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// Absolute path of the bundle (directory or `.tar`).
    pub path: String,
}

/// Answer of `POST /v1/import`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportReport {
    /// The node.
    pub node: String,
    /// The hub version of the desired state applied.
    pub version: u64,
    /// Id of the key that signed it.
    pub signer: String,
    /// Artifacts added to the store from the bundle.
    pub artifacts: Vec<String>,
    /// What the deployment did.
    pub deployment: DeployReport,
}

/// An import handed to the hub link.
struct ImportJob {
    path: std::path::PathBuf,
    reply: tokio::sync::oneshot::Sender<Result<ImportReport, ApiError>>,
}

/// Where imports go: the hub link of this process, set when it starts (one per daemon).
static IMPORTS: std::sync::OnceLock<mpsc::Sender<ImportJob>> = std::sync::OnceLock::new();

/// Verifies a bundle exactly as a desired state from the hub (node, version, signature by a
/// trusted key, every artifact's digest) and applies it; anything wrong changes nothing and is
/// an `invalid` error (and reported by the hub link). Needs the `[hub]` section, whose node id
/// and trusted keys the verification uses; works with the hub unreachable.
pub async fn import_bundle(req: ImportRequest) -> Result<ImportReport, ApiError> {
    let Some(imports) = IMPORTS.get() else {
        return Err(ApiError::unavailable(
            "this agent has no [hub] section: importing a bundle needs hub.node-id and hub.trusted-keys to verify it",
        ));
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    imports
        .send(ImportJob {
            path: req.path.into(),
            reply,
        })
        .await
        .map_err(|_| ApiError::unavailable("the hub link has stopped"))?;
    answer
        .await
        .map_err(|_| ApiError::internal("the hub link dropped the import"))?
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
}

impl HubLink {
    /// Starts the session and the bridge for `agent` as `[hub]` says.
    pub async fn start(agent: Agent, hub: &HubSection) -> Result<Self> {
        let mut config = section_session_config(hub).context("invalid [hub] section")?;
        let keys = hub
            .trusted_keys
            .iter()
            .enumerate()
            .map(|(i, k)| parse_public_key(k).with_context(|| format!("hub.trusted-keys[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let quota = parse_size(&hub.outbox_quota).context("invalid hub.outbox-quota")?;
        let store = agent.store().clone();
        // The state directory holds the database, the artifact store and the session's socket.
        let state_dir = store
            .path()
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        config.socket_dir = Some(state_dir.clone());
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
        let chunks = artifacts::ChunkStore::new(state_dir.join("artifacts").join("partial"));
        let answered = Arc::new(AtomicU64::new(0));
        let commands = commands::Commands::new(agent.clone(), store.clone(), answered.clone());
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
            subscribed: false,
            reconnects: 0,
            last_connection_error: None,
            last_rejection: None,
            ignored: None,
            settled: Settled::default(),
            errors: Vec::new(),
            rejected_messages: 0,
            answered,
            commands,
            last_seen: String::new(),
        };
        tracing::info!(url = %hub.url, node = %hub.node_id, "connecting to the hub");
        let session = tokio::spawn(session.run());
        bridge.publish_reported().await;
        let (imports_tx, imports) = mpsc::channel(4);
        if IMPORTS.set(imports_tx).is_err() {
            tracing::warn!("a second hub link in this process: `lichen import` goes to the first");
        }
        let bridge = tokio::spawn(bridge.run(events, imports));
        Ok(Self {
            handle,
            session,
            bridge,
        })
    }

    /// Disconnects and stops the bridge.
    pub async fn shutdown(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session).await;
        self.bridge.abort();
    }
}

struct Rejection {
    version: Option<u64>,
    reason: String,
    at_ms: u64,
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
    /// The broker accepted the subscriptions to `desired` and `cmd/+` on this connection.
    subscribed: bool,
    reconnects: u64,
    last_connection_error: Option<String>,
    last_rejection: Option<Rejection>,
    /// The last desired state ignored as stale.
    ignored: Option<Ignored>,
    /// Desired states refused or ignored (by fingerprint): not handled again when the
    /// retained copy comes back. A refused message never blocks another with its version.
    settled: Settled,
    errors: Vec<String>,
    rejected_messages: u64,
    /// Commands answered since the agent started.
    answered: Arc<AtomicU64>,
    commands: commands::Commands,
    /// What the last reported state said of the deployment and workloads, to notice changes.
    last_seen: String,
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
        mut imports: mpsc::Receiver<ImportJob>,
    ) {
        let mut check = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => return,
                },
                Some(job) = imports.recv() => {
                    let result = self.on_import(job.path).await;
                    let _ = job.reply.send(result);
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
                self.subscribed = false;
                self.reconnects += 1;
                // A new reason is worth a reported state (queued: the hub reads it when the
                // link is back); the same reason on every retry is not worth a write each.
                let new = self.last_connection_error.as_ref() != Some(&error);
                self.last_connection_error = Some(error);
                if new {
                    self.publish_reported().await;
                }
            }
            SessionEvent::Subscribed => {
                // Commands reach the node from now on: worth saying.
                self.subscribed = true;
                self.publish_reported().await;
            }
            SessionEvent::SubscribeRefused { filter } => {
                self.error(format!("the broker refused the subscription to {filter}"));
                self.publish_reported().await;
            }
            SessionEvent::Inbound(Inbound::Desired(envelope)) => self.on_desired(envelope).await,
            SessionEvent::Inbound(Inbound::Command {
                workload,
                envelope,
                ack,
            }) => self.commands.command(workload, envelope, ack),
            SessionEvent::Inbound(Inbound::RefusedCommand {
                workload,
                id,
                error,
                ack,
            }) => {
                self.rejected_messages += 1;
                self.error(error.clone());
                self.commands.refused(workload, id, error, ack);
            }
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
                if let InboundError::Malformed { topic, .. } | InboundError::TooLarge { topic, .. } =
                    &e
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
        self.store
            .hub_state(APPLIED_VERSION)
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
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

    /// Refuses an import: reported like a hub rejection (but the version stays open to the
    /// hub: a damaged bundle says nothing of the hub's copy); returns the error for the caller.
    async fn reject_import(&mut self, version: Option<u64>, reason: String) -> ApiError {
        let reason = format!("import refused: {reason}");
        self.error(reason.clone());
        self.record_rejection(version, reason.clone(), "import-rejected")
            .await;
        ApiError::invalid(reason)
    }

    /// `lichen import`: the same checks as a desired state from the hub, then the artifacts
    /// into the store and the deployment applied.
    async fn on_import(&mut self, path: std::path::PathBuf) -> Result<ImportReport, ApiError> {
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || bundle::read(&path)).await
        };
        let b = match read {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(self.reject_import(None, format!("{e:#}")).await),
            Err(e) => return Err(ApiError::internal(format!("bundle reader failed: {e}"))),
        };
        let desired = b.index.desired;
        let version = Some(desired.version);
        if b.index.node != self.node {
            let reason = format!(
                "bundle {} is for node {:?}; this node is {:?}",
                path.display(),
                b.index.node,
                self.node
            );
            return Err(self.reject_import(version, reason).await);
        }
        let applied = self.applied_version();
        if desired.version <= applied {
            let reason = format!(
                "bundle {} holds version {}, not newer than the applied version {applied}",
                path.display(),
                desired.version
            );
            return Err(self.reject_import(version, reason).await);
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
            Err(reason) => return Err(self.reject_import(version, reason).await),
        };
        for (name, bytes) in &b.artifacts {
            let found = lichen_sync::sha256_hex(bytes);
            if &found != name {
                let reason = format!(
                    "artifact file artifacts/{name} of bundle {} was tampered with or corrupted: its content has sha256 {found}",
                    path.display()
                );
                return Err(self.reject_import(version, reason).await);
            }
        }
        for digest in artifacts::referenced_digests(&desired.deployment) {
            if !b.artifacts.contains_key(&digest) && !self.agent.artifacts().contains(&digest) {
                let reason = format!(
                    "the deployment names artifact sha256:{digest}, which is neither in bundle {} nor on this node",
                    path.display()
                );
                return Err(self.reject_import(version, reason).await);
            }
        }
        let mut added = Vec::new();
        for (digest, bytes) in b.artifacts {
            if self.agent.artifacts().contains(&digest) {
                continue;
            }
            if let Err(e) = self.agent.artifacts().add(bytes).await {
                let reason = format!("artifact sha256:{digest} does not load: {e:#}");
                return Err(self.reject_import(version, reason).await);
            }
            added.push(digest);
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.desired.version <= desired.version)
        {
            self.cancel_pending();
        }
        let v = desired.version;
        match self.apply_checked(desired, signer.clone()).await {
            Ok(deployment) => Ok(ImportReport {
                node: self.node.clone(),
                version: v,
                signer,
                artifacts: added,
                deployment,
            }),
            Err(reason) => Err(self.reject_import(version, reason).await),
        }
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

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace ignored).
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = B64
            .iter()
            .position(|&b| b == c)
            .with_context(|| format!("{:?} is not a base64 character", char::from(c)))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// The DER of a PEM `PRIVATE KEY`, or the bytes as they are if they are not PEM.
fn pem_or_der(bytes: &[u8]) -> Result<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    let Some(start) = text.find("-----BEGIN PRIVATE KEY-----") else {
        bail!("key file is text but holds no -----BEGIN PRIVATE KEY----- block");
    };
    let body = &text[start + "-----BEGIN PRIVATE KEY-----".len()..];
    let end = body
        .find("-----END PRIVATE KEY-----")
        .context("key file has no -----END PRIVATE KEY----- line")?;
    base64_decode(&body[..end]).context("key file's PEM body is not base64")
}

/// A new ed25519 key pair: the private key as PKCS#8 PEM, and the public key as hex.
pub fn generate_key() -> Result<(String, String)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("cannot generate an ed25519 key: no system randomness"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("generated key does not parse: {e}"))?;
    let body = base64_encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, hex::encode(pair.public_key().as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxRecord;
    use serde_json::json;

    fn desired(version: u64, text: &str) -> DesiredState {
        DesiredState {
            version,
            deployment: text.into(),
            artifacts: BTreeMap::new(),
            signature: None,
            key_id: None,
        }
    }

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
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn signatures_verify_only_for_the_signed_node_version_and_text() {
        let (pem, public) = generate_key().unwrap();
        let key = parse_public_key(&public).unwrap();
        let mut d = desired(3, "[[workloads]]\n");
        let (sig, id) = sign(pem.as_bytes(), "n1", 3, &d.deployment).unwrap();
        assert_eq!(id, key.id);
        d.signature = Some(sig);
        d.key_id = Some(id);
        assert_eq!(
            verify(&d, "n1", std::slice::from_ref(&key)).unwrap(),
            key.id
        );
        let err = verify(&d, "n2", std::slice::from_ref(&key)).unwrap_err();
        assert!(err.contains("bad signature"), "{err}");
        let mut tampered = d.clone();
        tampered.deployment.push('#');
        assert!(verify(&tampered, "n1", std::slice::from_ref(&key)).is_err());
        let mut bumped = d.clone();
        bumped.version = 4;
        assert!(verify(&bumped, "n1", std::slice::from_ref(&key)).is_err());
        let (_, other) = generate_key().unwrap();
        let other = parse_public_key(&other).unwrap();
        let err = verify(&d, "n1", &[other]).unwrap_err();
        assert!(err.contains("not in hub.trusted-keys"), "{err}");
        let err = verify(&desired(5, "x"), "n1", &[key]).unwrap_err();
        assert!(err.contains("unsigned"), "{err}");
    }

    #[test]
    fn artifact_sizes_are_signed_with_the_text_and_fingerprints_tell_copies_apart() {
        let (pem, public) = generate_key().unwrap();
        let key = parse_public_key(&public).unwrap();
        let mut d = desired(3, "[[workloads]]\n");
        d.artifacts.insert("ab".repeat(32), 4096);
        let (sig, id) = sign_desired(pem.as_bytes(), "n1", &d).unwrap();
        d.signature = Some(sig);
        d.key_id = Some(id);
        verify(&d, "n1", std::slice::from_ref(&key)).unwrap();
        let text = String::from_utf8(signed_bytes("n1", &d)).unwrap();
        assert_eq!(
            text,
            format!(
                "lichen-desired-v2\nn1\n3\n1\n{} 4096\n[[workloads]]\n",
                "ab".repeat(32)
            )
        );
        // A bigger size (a forger's way to make the node fetch more) breaks the signature.
        let mut bigger = d.clone();
        bigger.artifacts.insert("ab".repeat(32), 512 << 20);
        let err = verify(&bigger, "n1", std::slice::from_ref(&key)).unwrap_err();
        assert!(err.contains("bad signature"), "{err}");
        // Without artifacts the v1 bytes are signed, as before.
        assert_eq!(
            signed_bytes("n1", &desired(3, "x")),
            canonical_bytes("n1", 3, "x")
        );
        // Same version, other signature: another message, refused or not on its own.
        let mut forged = d.clone();
        forged.signature = Some(base64_encode(&[0; 64]));
        assert_ne!(fingerprint(&forged), fingerprint(&d));
        assert_eq!(fingerprint(&d.clone()), fingerprint(&d));
    }

    #[test]
    fn public_keys_parse_from_hex_or_base64_and_bad_ones_are_named() {
        let hex_key = "11".repeat(32);
        let a = parse_public_key(&hex_key).unwrap();
        let b = parse_public_key(&base64_encode(&[0x11; 32])).unwrap();
        assert_eq!(a, b);
        let err = format!("{:#}", parse_public_key("abcd").unwrap_err());
        assert!(err.contains("\"abcd\""), "{err}");
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
