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
    DesiredState, MAX_PRECOMPILED, PrecompiledArtifact, check_precompiled, fingerprint,
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
mod tests {
    use super::*;
    use crate::store::OutboxRecord;
    use serde_json::json;

    fn desired(version: u64, text: &str) -> DesiredState {
        DesiredState {
            version,
            deployment: text.into(),
            artifacts: BTreeMap::new(),
            precompiled: Vec::new(),
            system: None,
            signature: None,
            key_id: None,
        }
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
        let err = verify(&bigger, "n1", std::slice::from_ref(&key))
            .unwrap_err()
            .to_string();
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
    fn an_mqtts_url_needs_a_ca_file() {
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
