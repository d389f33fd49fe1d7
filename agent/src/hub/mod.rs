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
//! - delivers commands from `cmd/<workload>` as `command` events ([`commands`]): each runs once
//!   in effect (its writes, inbox id and result commit together) and gets a result, whatever it
//!   was;
//! - keeps the outbox under its quota, dropping the oldest telemetry and counting the drops;
//! - publishes reported state (retained) at start, on every connection, deployment, rejection,
//!   quota drop, and workload status change.
//!
//! - applies bundles given to `lichen import` ([`ImportRoute::import_bundle`], [`bundle`]), verified exactly
//!   as a desired state from the hub, with no network; the bundle is read and its artifacts
//!   checked and stored by an importer task of its own, so the link keeps serving meanwhile;
//! - fetches the artifacts a verified deployment names by digest and the node lacks, in chunks
//!   over MQTT ([`artifacts`], [`fetch`]): only as many bytes as the signed desired state says,
//!   resumable across reconnects and restarts, each chunk and the whole artifact checked before
//!   use; forged manifests and chunks are refused without rejecting the deployment.
//!
//! The wire format of `desired` and the signature's canonical bytes are documented in
//! `docs/topics.md`.

pub mod artifacts;
pub mod bundle;
mod commands;
mod desired;
mod doctor;
mod fetch;
mod import;
pub mod precompile;
mod reported;
pub mod signing;
pub mod update;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lichen_sync::{
    HubUrl, Inbound, InboundError, Quota, RowId, RowKind, RowSize, SessionConfig, SessionEvent,
    SyncHandle, SyncSession, TlsFiles, Topics,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::types::ApiError;
use crate::config::{HubSection, parse_size};
use crate::store::{SqliteOutbox, StateStore};
use crate::supervisor::Agent;

pub use desired::{
    DesiredState, MAX_PRECOMPILED, PrecompiledArtifact, PrecompiledError, check_precompiled,
    fingerprint,
};
use desired::{Ignored, Settled};
pub use doctor::{doctor_check, hub_check, probe};
use fetch::Pending;
pub use import::{ImportReport, ImportRequest, ImportRoute};
pub use signing::{
    SIGNATURE_CONTEXT, SIGNATURE_CONTEXT_V2, TrustedKey, base64_decode, base64_encode,
    canonical_bytes, generate_key, key_id, parse_public_key, sign, sign_desired, signed_bytes,
    verify,
};

/// `hub_state` key of the applied hub deployment version.
const APPLIED_VERSION: &str = "applied-version";
/// `hub_state` key of the fingerprint of the applied desired state ([`fingerprint`]).
const APPLIED_DESIRED: &str = "applied-desired";
/// Desired states (and manifests) remembered as refused or ignored, so the retained copy that
/// comes back on every connection is not handled again.
const KEEP_SETTLED: usize = 16;
/// `hub_state` key of the dropped-telemetry counts (JSON object, workload -> count).
const DROPPED: &str = "dropped-telemetry";
/// How often the outbox size and the workload statuses are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Errors kept for reported state.
const KEEP_ERRORS: usize = 10;

/// The session settings for `url` and `node`, with TLS and credentials as given.
pub fn session_config(
    url: &str,
    node: &str,
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
    credentials: Option<(&str, &str)>,
) -> Result<SessionConfig> {
    let url = HubUrl::parse(url)?;
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
    /// Starts the session and the bridge for `agent` as `[hub]` says; `system` (A/B boards)
    /// adds the system's slots and last update to reported state.
    pub async fn start(
        agent: Agent,
        hub: &HubSection,
        system: Option<crate::update::SystemSource>,
    ) -> Result<Self> {
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
        let importer = import::Importer {
            node: hub.node_id.clone(),
            keys: keys.clone(),
            insecure_dev: hub.insecure_dev,
            store: store.clone(),
            agent: agent.clone(),
            limits: bundle::Limits::default(),
        };
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
            system,
            push: None,
        };
        tracing::info!(url = %hub.url, node = %hub.node_id, "connecting to the hub");
        let session = tokio::spawn(session.run());
        bridge.publish_reported().await;
        let (imports_tx, imports) = mpsc::channel(4);
        if !bridge.agent.imports().route(imports_tx) {
            tracing::warn!("a second hub link for this agent: `lichen import` goes to the first");
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
    /// The A/B system (slots, last update), on boards with `[update]`.
    system: Option<crate::update::SystemSource>,
    /// Where the last system update pushed by the hub stands ([`update`]).
    push: Option<update::Push>,
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

use crate::util::now_ms;

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
        applied_version(&self.store)
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

#[cfg(test)]
mod tests;
