//! The socket loop: one MQTT session to the hub, driven by [`Drain`], [`Backoff`] and
//! [`InboundDedup`].
//!
//! [`SyncSession::run`] connects (client id = node id, persistent session, keep-alive), subscribes
//! to `desired` and `cmd/+`, publishes at QoS 1 what [`Drain`] says, deletes outbox rows once
//! their PUBACK came, and reconnects with [`Backoff`] when the connection drops. What happens is
//! told to the caller as [`SessionEvent`]s on a channel: inbound deployments and commands,
//! malformed inbound messages (logged and reported, the connection stays up), connections and
//! their failures.
//!
//! Each connection gets a fresh rumqttc client and event loop, polled in its own task; when the
//! connection drops both are thrown away and [`Drain`] resends what was not acknowledged, so
//! rumqttc's own retransmission never duplicates ours.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use thiserror::Error;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::dedup::InboundDedup;
use crate::drain::{Drain, UnpublishableRow};
use crate::message::{Envelope, MessageId};
use crate::outbox::{Outbox, OutboxError, RowId};
use crate::topics::{NameError, TopicKind, Topics};

/// TLS settings: the CA that signs the broker's certificate, and optionally the node's own
/// certificate and key for mutual TLS (all PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) trusted for the broker.
    pub ca: PathBuf,
    /// The node's certificate chain and private key (PKCS#8, PKCS#1 or SEC1), for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// How to reach and talk to the hub.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Node id: MQTT client id and the `<node>` of every topic.
    pub node: String,
    /// Broker host name (checked against its certificate with TLS).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS, or plain TCP when `None`.
    pub tls: Option<TlsFiles>,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// MQTT keep-alive (at least 5 s).
    pub keep_alive: Duration,
    /// Time allowed for TCP + TLS + CONNACK.
    pub connect_timeout: Duration,
    /// Most QoS 1 publishes waiting for their PUBACK.
    pub max_inflight: u16,
    /// Largest MQTT packet accepted or sent, in bytes.
    pub max_packet_bytes: usize,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Inbound command ids remembered for de-duplication.
    pub dedup_capacity: usize,
    /// How often the outbox is read even without [`SyncHandle::outbox_changed`].
    pub outbox_poll: Duration,
}

impl SessionConfig {
    /// Plain TCP to `host:port` as `node`, with the defaults: keep-alive 30 s, connect timeout
    /// 10 s, 100 in flight, packets up to 1 MiB, back-off 1 s to 5 min, 4096 command ids.
    pub fn new(node: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        SessionConfig {
            node: node.into(),
            host: host.into(),
            port,
            tls: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_inflight: 100,
            max_packet_bytes: 1 << 20,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            dedup_capacity: 4096,
            outbox_poll: Duration::from_secs(1),
        }
    }

    fn broker(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

/// A configuration that cannot work.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The node id cannot be one topic level.
    #[error("invalid node id: {0}")]
    Node(#[from] NameError),
    /// A TLS file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file: `CA file`, `client certificate`, `client key`.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{what} {} holds no {expected}", path.display())]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
    },
    /// rustls refused the certificates or key.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// Keep-alive below what MQTT clients accept.
    #[error("keep-alive {0:?} is shorter than 5 s")]
    KeepAlive(Duration),
    /// No publish could ever be in flight.
    #[error("max_inflight must be at least 1")]
    MaxInflight,
}

/// An inbound message from the hub that was accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A deployment on `desired` (retained: it comes again on every connection; the agent
    /// applies it only if its version is newer).
    Desired(Envelope),
    /// A command for `workload`, seen for the first time. The broker gets its PUBACK only
    /// when the receiver calls [`InboundAck::ack`], once the command is durably handled; until
    /// then the broker keeps it and redelivers it after a reconnect.
    Command {
        /// The workload it is for.
        workload: String,
        /// The command.
        envelope: Envelope,
        /// Acknowledges the command's PUBLISH.
        ack: InboundAck,
    },
    /// An artifact's chunk manifest (comes only after [`SyncHandle::subscribe`] to it).
    ArtifactManifest {
        /// The artifact's sha256, from the topic.
        digest: String,
        /// The manifest, in its envelope (not yet checked).
        envelope: Envelope,
    },
    /// One chunk of an artifact (comes only after [`SyncHandle::subscribe`] to it).
    ArtifactChunk {
        /// The artifact's sha256, from the topic.
        digest: String,
        /// The chunk's index, from the topic.
        index: u32,
        /// The raw bytes (not yet checked).
        bytes: Vec<u8>,
    },
}

/// The PUBACK of an inbound command, sent when the agent has made the command durable
/// (manual acknowledgement: a crash before that makes the broker deliver it again).
///
/// The session sends it on the connection it has then, for the copy that came on that
/// connection: a command redelivered after a reconnect while the agent still handled the first
/// copy is held until this ack, not acknowledged as a duplicate at once.
#[derive(Debug, Clone)]
pub struct InboundAck {
    id: MessageId,
    session: mpsc::UnboundedSender<MessageId>,
}

impl InboundAck {
    /// Tells the session to send the PUBACK. With no connection, nothing is sent and the broker
    /// redelivers the command on the next one (the agent's inbox de-duplicates it).
    pub fn ack(self) {
        let _ = self.session.send(self.id);
    }
}

impl PartialEq for InboundAck {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

/// An inbound message that was refused; the session carries on.
#[derive(Debug, Error)]
pub enum InboundError {
    /// A message on a topic this node does not handle.
    #[error("message on unexpected topic {topic:?}")]
    UnexpectedTopic {
        /// The topic.
        topic: String,
    },
    /// The payload is not a Lichen envelope.
    #[error("malformed message on {topic:?}: {source}")]
    Malformed {
        /// The topic it came on.
        topic: String,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
}

/// What happened in the session, for the agent to act on and report.
#[derive(Debug)]
pub enum SessionEvent {
    /// Connected to the broker (CONNACK accepted).
    Connected {
        /// Whether the broker still had this node's session (subscriptions, queued commands).
        session_present: bool,
    },
    /// A connection attempt failed.
    ConnectFailed {
        /// What failed, naming the broker.
        error: String,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// An established connection dropped.
    Disconnected {
        /// Why, naming the broker.
        error: String,
        /// Records sent but not acknowledged, to be sent again.
        resend: usize,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// A deployment or a new command arrived.
    Inbound(Inbound),
    /// An inbound message was refused.
    Rejected(InboundError),
    /// An outbox row could never be published and was deleted.
    Unpublishable(UnpublishableRow),
    /// The broker accepted the subscriptions to `desired` and `cmd/+`: inbound messages flow.
    Subscribed,
    /// The broker refused a subscription (an ACL, most likely).
    SubscribeRefused {
        /// The topic filter.
        filter: String,
    },
    /// Reading or deleting outbox rows failed; retried later.
    Outbox(OutboxError),
}

/// A change of the session's extra subscriptions.
#[derive(Debug)]
enum SubscriptionChange {
    Add(Vec<String>),
    Remove(Vec<String>),
}

/// Controls a running [`SyncSession`]. Dropping every handle stops the session too.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    notify: Arc<Notify>,
    stop: Arc<watch::Sender<bool>>,
    subscriptions: mpsc::UnboundedSender<SubscriptionChange>,
}

impl SyncHandle {
    /// Subscribes (QoS 1) to these topic filters as well as `desired` and `cmd/+`, now and
    /// after every reconnect, until [`SyncHandle::unsubscribe`]. Used for artifact transfers.
    pub fn subscribe(&self, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self.subscriptions.send(SubscriptionChange::Add(filters));
        }
    }

    /// Drops filters added by [`SyncHandle::subscribe`].
    pub fn unsubscribe(&self, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self.subscriptions.send(SubscriptionChange::Remove(filters));
        }
    }

    /// New rows are in the outbox: read them now rather than at the next poll.
    pub fn outbox_changed(&self) {
        self.notify.notify_one();
    }

    /// Disconnect cleanly and make [`SyncSession::run`] return.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

/// Builds the rustls client configuration with the ring provider, from PEM files.
pub fn rustls_config(tls: &TlsFiles) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
        std::fs::read(path).map_err(|source| ConfigError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    }
    fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let pem = read(what, path)?;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(ConfigError::Pem {
                what,
                path: path.to_owned(),
                expected: "PEM certificate",
            });
        }
        Ok(certs)
    }

    let mut roots = rustls::RootCertStore::empty();
    for cert in certs("CA file", &tls.ca)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs("client certificate", cert)?;
            let pem = read("client key", key)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| ConfigError::Pem {
                what: "client key",
                path: key.to_owned(),
                expected: "PEM private key",
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

/// Acknowledged rows are deleted in batches of this many, or at the next tick.
const DELETE_BATCH: usize = 256;
/// How often acknowledged rows are deleted when the batch is not full.
const TICK: Duration = Duration::from_millis(20);

/// How a connection ended.
enum End {
    Shutdown,
    Lost { error: String, was_connected: bool },
}

/// One node's MQTT session (see the module docs).
pub struct SyncSession {
    topics: Topics,
    options: MqttOptions,
    broker: String,
    ca: Option<PathBuf>,
    connect_timeout: Duration,
    max_inflight: usize,
    outbox_poll: Duration,
    outbox: Arc<dyn Outbox>,
    drain: Drain,
    backoff: Backoff,
    dedup: InboundDedup,
    acked: Vec<RowId>,
    events: mpsc::Sender<SessionEvent>,
    notify: Arc<Notify>,
    stop: watch::Receiver<bool>,
    /// Filters subscribed besides `desired` and `cmd/+`.
    extra: BTreeSet<String>,
    /// Filters dropped while disconnected: the broker's persistent session may still hold
    /// them, so they are unsubscribed on the next connection.
    stale: BTreeSet<String>,
    changes: mpsc::UnboundedReceiver<SubscriptionChange>,
    /// Commands handed to the agent and not yet acknowledged by it, with the copy to PUBACK on
    /// the current connection (`None`: it came on an earlier connection).
    pending_acks: HashMap<MessageId, Option<rumqttc::Publish>>,
    acks_tx: mpsc::UnboundedSender<MessageId>,
    acks: mpsc::UnboundedReceiver<MessageId>,
    /// Subscriptions handed to the client, oldest first, waiting for their packet id.
    unsent_subscribes: VecDeque<Vec<String>>,
    /// Subscriptions sent, by packet id, waiting for their SUBACK.
    sent_subscribes: HashMap<u16, Vec<String>>,
}

impl SyncSession {
    /// A session for `config` draining `outbox`. Returns the session (run it with
    /// [`SyncSession::run`]), its handle, and the channel its events arrive on; keep reading
    /// it, the session waits when it is full.
    pub fn new(
        config: SessionConfig,
        outbox: Arc<dyn Outbox>,
    ) -> Result<(SyncSession, SyncHandle, mpsc::Receiver<SessionEvent>), ConfigError> {
        let topics = Topics::new(&config.node)?;
        if config.keep_alive < Duration::from_secs(5) {
            return Err(ConfigError::KeepAlive(config.keep_alive));
        }
        if config.max_inflight == 0 {
            return Err(ConfigError::MaxInflight);
        }
        let mut options = MqttOptions::new(config.node.clone(), config.host.clone(), config.port);
        options
            .set_clean_session(false)
            // Commands are acknowledged once the agent has them durably (InboundAck); every
            // other inbound message right after it is handed over.
            .set_manual_acks(true)
            .set_keep_alive(config.keep_alive)
            .set_inflight(config.max_inflight)
            .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes);
        if let Some(tls) = &config.tls {
            let tls = rustls_config(tls)?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        }
        if let Some((user, password)) = &config.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        let (events, events_rx) = mpsc::channel(256);
        let (stop_tx, stop) = watch::channel(false);
        let notify = Arc::new(Notify::new());
        let (subscriptions, changes) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let max_inflight = usize::from(config.max_inflight);
        let session = SyncSession {
            drain: Drain::new(topics.clone(), max_inflight),
            topics,
            options,
            broker: config.broker(),
            ca: config.tls.as_ref().map(|t| t.ca.clone()),
            connect_timeout: config.connect_timeout,
            max_inflight,
            outbox_poll: config.outbox_poll,
            outbox,
            backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            dedup: InboundDedup::new(config.dedup_capacity),
            acked: Vec::new(),
            events,
            notify: notify.clone(),
            stop,
            extra: BTreeSet::new(),
            stale: BTreeSet::new(),
            changes,
            pending_acks: HashMap::new(),
            acks_tx,
            acks,
            unsent_subscribes: VecDeque::new(),
            sent_subscribes: HashMap::new(),
        };
        let handle = SyncHandle {
            notify,
            stop: Arc::new(stop_tx),
            subscriptions,
        };
        Ok((session, handle, events_rx))
    }

    /// Runs until [`SyncHandle::shutdown`] (or until every handle is dropped): connects,
    /// drains the outbox, hands inbound messages over, reconnects after failures.
    pub async fn run(mut self) {
        loop {
            if *self.stop.borrow() {
                return;
            }
            let end = self.connection().await;
            let resend = self.drain.on_disconnect();
            let (error, was_connected) = match end {
                End::Shutdown => return,
                End::Lost {
                    error,
                    was_connected,
                } => (error, was_connected),
            };
            let retry_in = self.backoff.next_delay();
            warn!(%error, ?retry_in, resend, "mqtt connection lost");
            self.emit(if was_connected {
                SessionEvent::Disconnected {
                    error,
                    resend,
                    retry_in,
                }
            } else {
                SessionEvent::ConnectFailed { error, retry_in }
            })
            .await;
            let sleep = tokio::time::sleep(retry_in);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = stopped(&mut self.stop) => return,
                    Some(change) = self.changes.recv() => self.change_subscriptions(change, None),
                    Some(id) = self.acks.recv() => {
                        self.pending_acks.remove(&id);
                    }
                }
            }
        }
    }

    /// One connection, from CONNECT until it drops or the session stops.
    async fn connection(&mut self) -> End {
        let (client, mut eventloop) =
            AsyncClient::new(self.options.clone(), self.max_inflight + 16);
        eventloop
            .network_options
            .set_connection_timeout(self.connect_timeout.as_secs().max(1));
        let (tx, mut rx) = mpsc::channel(1024);
        self.unsent_subscribes.clear();
        // Copies received on the old connection cannot be acknowledged on this one.
        self.pending_acks.values_mut().for_each(|p| *p = None);
        self.sent_subscribes.clear();
        let poller = tokio::spawn(poll_loop(eventloop, tx));
        let end = self.connected(&client, &mut rx).await;
        if matches!(end, End::Shutdown) {
            // Say goodbye so the broker does not publish a will or wait for keep-alive.
            if client.try_disconnect().is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(ev)) = rx.recv().await {
                        if ev == Event::Outgoing(Outgoing::Disconnect) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        poller.abort();
        self.flush_acked().await;
        end
    }

    async fn connected(
        &mut self,
        client: &AsyncClient,
        rx: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
    ) -> End {
        let mut connected = false;
        let mut more = true;
        let mut last_read = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let read_threshold = (self.max_inflight / 2).max(1);
        loop {
            if connected {
                if more && self.drain.wanted() >= read_threshold {
                    last_read = Instant::now();
                    more = self.read_outbox().await;
                }
                if let Err(error) = self.publish_ready(client).await {
                    return End::Lost {
                        error,
                        was_connected: true,
                    };
                }
            }
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => return End::Shutdown,
                ev = rx.recv() => match ev {
                    None => return End::Lost {
                        error: format!("{}: event loop stopped", self.broker),
                        was_connected: connected,
                    },
                    Some(Err(e)) => return End::Lost {
                        error: self.describe(&e),
                        was_connected: connected,
                    },
                    Some(Ok(ev)) => self.handle(ev, client, &mut connected).await,
                },
                _ = self.notify.notified() => more = true,
                Some(id) = self.acks.recv() => {
                    if let Some(Some(publish)) = self.pending_acks.remove(&id) {
                        ack_now(client, &publish);
                    }
                }
                Some(change) = self.changes.recv() => {
                    self.change_subscriptions(change, connected.then_some(client));
                }
                _ = tick.tick() => {
                    self.flush_acked().await;
                    if last_read.elapsed() >= self.outbox_poll {
                        more = true;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, ev: Event, client: &AsyncClient, connected: &mut bool) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                *connected = true;
                self.backoff.reset();
                info!(broker = %self.broker, session_present = ack.session_present, "mqtt connected");
                self.send_subscribe(
                    client,
                    vec![self.topics.desired(), self.topics.cmd_filter()],
                );
                if !self.extra.is_empty() {
                    let extra = self.extra.iter().cloned().collect();
                    self.send_subscribe(client, extra);
                }
                for filter in std::mem::take(&mut self.stale) {
                    if let Err(e) = client.try_unsubscribe(filter) {
                        warn!(error = %e, "cannot queue an unsubscribe");
                    }
                }
                self.emit(SessionEvent::Connected {
                    session_present: ack.session_present,
                })
                .await;
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(filters) = self.unsent_subscribes.pop_front() {
                    self.sent_subscribes.insert(pkid, filters);
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let filters = self.sent_subscribes.remove(&ack.pkid).unwrap_or_default();
                let base = filters.first() == Some(&self.topics.desired());
                let mut all = true;
                for (code, filter) in ack.return_codes.iter().zip(filters) {
                    if matches!(code, SubscribeReasonCode::Failure) {
                        all = false;
                        warn!(%filter, "broker refused the subscription");
                        self.emit(SessionEvent::SubscribeRefused { filter }).await;
                    }
                }
                if all && base {
                    self.emit(SessionEvent::Subscribed).await;
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let row = self.drain.on_sent(pkid);
                if row.is_none() {
                    debug!(pkid, "publish sent that no outbox row was waiting for");
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(id) = self.drain.on_puback(ack.pkid) {
                    self.acked.push(id);
                    if self.acked.len() >= DELETE_BATCH {
                        self.flush_acked().await;
                    }
                }
            }
            Event::Incoming(Packet::Publish(p)) => match self.inbound(&p) {
                // Acknowledged by the agent once durable.
                Ok(Some(msg @ Inbound::Command { .. })) => {
                    self.emit(SessionEvent::Inbound(msg)).await
                }
                Ok(Some(msg)) => {
                    self.emit(SessionEvent::Inbound(msg)).await;
                    ack_now(client, &p);
                }
                Ok(None) => {
                    let held = self.pending_acks.values().any(|h| {
                        h.as_ref()
                            .is_some_and(|h| h.pkid == p.pkid && h.topic == p.topic)
                    });
                    if !held {
                        ack_now(client, &p);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "inbound message refused");
                    self.emit(SessionEvent::Rejected(e)).await;
                    ack_now(client, &p);
                }
            },
            _ => {}
        }
    }

    /// Decodes one inbound message; `Ok(None)` for a command seen before.
    fn inbound(&mut self, publish: &rumqttc::Publish) -> Result<Option<Inbound>, InboundError> {
        let topic = publish.topic.as_str();
        let payload = &publish.payload[..];
        let kind = self.topics.parse(topic);
        let envelope = || {
            Envelope::from_bytes(payload).map_err(|source| InboundError::Malformed {
                topic: topic.to_owned(),
                source,
            })
        };
        match kind {
            Some(TopicKind::Desired) => Ok(Some(Inbound::Desired(envelope()?))),
            Some(TopicKind::ArtifactManifest { digest }) => Ok(Some(Inbound::ArtifactManifest {
                digest,
                envelope: envelope()?,
            })),
            Some(TopicKind::ArtifactChunk { digest, index }) => Ok(Some(Inbound::ArtifactChunk {
                digest,
                index,
                bytes: payload.to_vec(),
            })),
            Some(TopicKind::Cmd { workload }) => {
                let envelope = envelope()?;
                if !self.dedup.is_new(&envelope.id) {
                    if let Some(copy) = self.pending_acks.get_mut(&envelope.id) {
                        // The agent still handles the first copy: this one is acknowledged
                        // with it.
                        debug!(id = %envelope.id, %workload, "redelivered command held for its ack");
                        *copy = Some(publish.clone());
                    } else {
                        debug!(id = %envelope.id, %workload, "duplicate command ignored");
                    }
                    return Ok(None);
                }
                self.pending_acks
                    .insert(envelope.id.clone(), Some(publish.clone()));
                Ok(Some(Inbound::Command {
                    ack: InboundAck {
                        id: envelope.id.clone(),
                        session: self.acks_tx.clone(),
                    },
                    workload,
                    envelope,
                }))
            }
            _ => Err(InboundError::UnexpectedTopic {
                topic: topic.to_owned(),
            }),
        }
    }

    /// Hands a SUBSCRIBE for `filters` to the client, remembering them for its SUBACK.
    fn send_subscribe(&mut self, client: &AsyncClient, filters: Vec<String>) {
        let packet = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        match client.try_subscribe_many(packet) {
            Ok(()) => self.unsent_subscribes.push_back(filters),
            Err(e) => warn!(error = %e, "cannot queue the subscription"),
        }
    }

    /// Applies a change of the extra subscriptions; tells the broker when connected.
    fn change_subscriptions(&mut self, change: SubscriptionChange, client: Option<&AsyncClient>) {
        match change {
            SubscriptionChange::Add(filters) => {
                let new: Vec<String> = filters
                    .into_iter()
                    .filter(|f| {
                        self.stale.remove(f);
                        self.extra.insert(f.clone())
                    })
                    .collect();
                if let Some(client) = client
                    && !new.is_empty()
                {
                    self.send_subscribe(client, new);
                }
            }
            SubscriptionChange::Remove(filters) => {
                for filter in filters {
                    if !self.extra.remove(&filter) {
                        continue;
                    }
                    match client {
                        Some(client) => {
                            if let Err(e) = client.try_unsubscribe(filter) {
                                warn!(error = %e, "cannot queue an unsubscribe");
                            }
                        }
                        None => {
                            self.stale.insert(filter);
                        }
                    }
                }
            }
        }
    }

    /// Hands the client every publish the drain allows now.
    async fn publish_ready(&mut self, client: &AsyncClient) -> Result<(), String> {
        while let Some(next) = self.drain.next_publish() {
            match next {
                Ok(p) => client
                    .try_publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload)
                    .map_err(|e| format!("{}: cannot hand over a publish: {e}", self.broker))?,
                Err(bad) => {
                    warn!(error = %bad, "outbox row dropped");
                    self.acked.push(bad.row);
                    self.emit(SessionEvent::Unpublishable(bad)).await;
                }
            }
        }
        Ok(())
    }

    /// Reads what the drain wants from the outbox; returns whether more may be there.
    async fn read_outbox(&mut self) -> bool {
        let limit = self.drain.wanted();
        let after = self.drain.cursor();
        let outbox = self.outbox.clone();
        let read = tokio::task::spawn_blocking(move || outbox.next_rows(after, limit))
            .await
            .unwrap_or_else(|e| {
                Err(OutboxError {
                    op: "read",
                    reason: e.to_string(),
                })
            });
        match read {
            Ok(rows) => {
                let full = rows.len() >= limit;
                self.drain.add_rows(rows);
                full
            }
            Err(e) => {
                warn!(error = %e, "outbox read failed");
                self.emit(SessionEvent::Outbox(e)).await;
                false
            }
        }
    }

    /// Deletes the acknowledged rows; on failure they are kept and tried again.
    async fn flush_acked(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.acked);
        let outbox = self.outbox.clone();
        let (ids, result) = tokio::task::spawn_blocking(move || {
            let r = outbox.delete(&ids);
            (ids, r)
        })
        .await
        .expect("outbox delete task does not panic: Outbox::delete returns its errors");
        if let Err(e) = result {
            warn!(error = %e, rows = ids.len(), "outbox delete failed");
            self.acked.extend(ids);
            self.emit(SessionEvent::Outbox(e)).await;
        }
    }

    fn describe(&self, e: &ConnectionError) -> String {
        let mut text = format!("{}: {e}", self.broker);
        if text.contains("invalid peer certificate")
            && let Some(ca) = &self.ca
        {
            text.push_str(&format!(
                " (the broker's certificate is not trusted by the CA file {})",
                ca.display()
            ));
        }
        text
    }

    async fn emit(&self, ev: SessionEvent) {
        // Nobody listening is not an error: the session still drains the outbox.
        let _ = self.events.send(ev).await;
    }
}

/// Acknowledges an inbound message that needs no durable handling first (a duplicate, a
/// retained desired state or artifact chunk handed over, a refused message).
fn ack_now(client: &AsyncClient, publish: &rumqttc::Publish) {
    if let Err(e) = client.try_ack(publish) {
        debug!(error = %e, "PUBACK not sent: the connection is gone");
    }
}

/// Polls one connection's event loop and forwards what it yields, until the first error.
async fn poll_loop(mut eventloop: EventLoop, tx: mpsc::Sender<Result<Event, ConnectionError>>) {
    loop {
        let ev = eventloop.poll().await;
        let failed = ev.is_err();
        if tx.send(ev).await.is_err() || failed {
            return;
        }
    }
}

/// Resolves when the session must stop: shutdown asked, or every handle dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
