//! The socket loop: one MQTT session to the hub, driven by [`Drain`], [`Backoff`] and
//! [`InboundState`].
//!
//! [`SyncSession::run`] connects (client id = node id, persistent session, keep-alive), subscribes
//! to `desired` and `cmd/+`, publishes at QoS 1 what [`Drain`] says, deletes outbox rows once
//! their PUBACK came, and reconnects with [`Backoff`] when the connection drops. What happens is
//! told to the caller as [`SessionEvent`]s on a channel: inbound deployments and commands,
//! malformed or oversized inbound messages (refused, reported and acknowledged: the connection
//! stays up), connections and their failures.
//!
//! Each connection gets a fresh rumqttc client and event loop, polled in its own task, reaching
//! the broker through [`crate::link`] (the session's own TCP/TLS connection, with the size
//! guard on the way in); when the connection drops all of it is thrown away and [`Drain`]
//! resends what was not acknowledged, so rumqttc's own retransmission never duplicates ours.
//!
//! Backpressure, never a dropped session: requests for the client (publishes, PUBACKs,
//! subscriptions) are handed over only while its request channel has room; what does not fit
//! waits in the session, in order, and goes when the event loop has taken the earlier ones. The
//! session stops reading inbound messages while the agent holds `max_pending_commands`
//! commands it has not acknowledged.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, Transport,
};
use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::{ConfigError, SessionConfig, rustls_config};
use crate::drain::Drain;
use crate::guard::{MAX_STAND_IN, stand_in_seq};
use crate::inbound::{AckKey, Decoded, InboundState};
use crate::link::{Relay, SocketDir, connect_upstream};
use crate::outbox::{Outbox, RowId};
use crate::topics::Topics;

use crate::handle::{SessionEvent, SubscriptionChange, SyncHandle};

mod outbox_side;

/// Acknowledged rows are deleted in batches of this many, or at the next tick.
const DELETE_BATCH: usize = 256;
/// How often acknowledged rows are deleted when the batch is not full.
const TICK: Duration = Duration::from_millis(20);
/// Events one connection's poller may queue for the session: with packets of up to
/// `max_packet_bytes` each, this bounds what waits in memory.
const EVENT_QUEUE: usize = 32;

/// How a connection ended.
enum End {
    Shutdown,
    Lost { error: String, was_connected: bool },
}

/// A request for the MQTT client that waits in the session until the client has room.
#[derive(Debug)]
enum Request {
    /// The PUBACK of an inbound message.
    Ack(rumqttc::Publish),
    /// A SUBSCRIBE of these filters (QoS 1).
    Subscribe(Vec<String>),
    /// An UNSUBSCRIBE.
    Unsubscribe(String),
}

/// One node's MQTT session (see the module docs).
pub struct SyncSession {
    topics: Topics,
    options: MqttOptions,
    broker: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    ca: Option<PathBuf>,
    socket_dir: SocketDir,
    connect_timeout: Duration,
    max_inflight: usize,
    max_packet_bytes: usize,
    max_pending_commands: usize,
    outbox_poll: Duration,
    outbox: Arc<dyn Outbox>,
    drain: Drain,
    backoff: Backoff,
    inbound: InboundState,
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
    acks: mpsc::UnboundedReceiver<AckKey>,
    /// Requests waiting for room in the client's request channel, oldest first.
    requests: VecDeque<Request>,
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
        if config.max_pending_commands == 0 {
            return Err(ConfigError::MaxPending);
        }
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(rustls_config(files)?)),
            None => None,
        };
        let socket_dir =
            SocketDir::create(config.socket_dir.as_deref()).map_err(ConfigError::SocketDir)?;
        // rumqttc reaches the broker through the guard on the session's Unix socket: nothing
        // over the limit gets to it, but a stand-in may have a topic of up to 64 KiB.
        let incoming = config.max_packet_bytes.max(MAX_STAND_IN);
        let mut options = config.base_options(
            &config.node,
            socket_dir.socket().to_string_lossy().into_owned(),
            0,
            incoming,
        );
        options
            .set_transport(Transport::Unix)
            .set_clean_session(false)
            // Commands are acknowledged once the agent has them durably (InboundAck); every
            // other inbound message right after it is handed over.
            .set_manual_acks(true)
            .set_inflight(config.max_inflight);
        let (events, events_rx) = mpsc::channel(256);
        let (stop_tx, stop) = watch::channel(false);
        let notify = Arc::new(Notify::new());
        let (subscriptions, changes) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let max_inflight = usize::from(config.max_inflight);
        let session = SyncSession {
            drain: Drain::new(topics.clone(), max_inflight, config.max_packet_bytes),
            inbound: InboundState::new(
                topics.clone(),
                config.max_command_bytes,
                config.max_packet_bytes,
                config.dedup_capacity,
                acks_tx,
            ),
            topics,
            options,
            broker: config.broker(),
            host: config.host.clone(),
            port: config.port,
            tls,
            ca: config.tls.as_ref().map(|t| t.ca.clone()),
            socket_dir,
            connect_timeout: config.connect_timeout,
            max_inflight,
            max_packet_bytes: config.max_packet_bytes,
            max_pending_commands: config.max_pending_commands,
            outbox_poll: config.outbox_poll,
            outbox,
            backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            acked: Vec::new(),
            events,
            notify: notify.clone(),
            stop,
            extra: BTreeSet::new(),
            stale: BTreeSet::new(),
            changes,
            acks,
            requests: VecDeque::new(),
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
                    Some(change) = self.changes.recv() => self.change_subscriptions(change, false),
                    Some(key) = self.acks.recv() => {
                        self.inbound.acked(&key);
                    }
                }
            }
        }
    }

    /// One connection, from CONNECT until it drops or the session stops.
    async fn connection(&mut self) -> End {
        let upstream = tokio::select! {
            biased;
            _ = stopped(&mut self.stop) => return End::Shutdown,
            up = connect_upstream(&self.host, self.port, self.tls.clone(), self.connect_timeout) => up,
        };
        let upstream = match upstream {
            Ok(s) => s,
            Err(e) => {
                return End::Lost {
                    error: self.describe(&e),
                    was_connected: false,
                };
            }
        };
        let socket = self.socket_dir.socket().to_path_buf();
        let _ = std::fs::remove_file(&socket);
        let listener = match UnixListener::bind(&socket) {
            Ok(l) => l,
            Err(e) => {
                return End::Lost {
                    error: format!(
                        "{}: cannot listen on the local socket {}: {e}",
                        self.broker,
                        socket.display()
                    ),
                    was_connected: false,
                };
            }
        };
        let relay = Relay::start(listener, socket, upstream, self.max_packet_bytes);
        let (client, mut eventloop) =
            AsyncClient::new(self.options.clone(), self.max_inflight + 16);
        eventloop
            .network_options
            .set_connection_timeout(self.connect_timeout.as_secs().max(1));
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
        self.requests.clear();
        self.unsent_subscribes.clear();
        self.sent_subscribes.clear();
        // Copies received on the old connection cannot be acknowledged on this one.
        self.inbound.new_connection();
        let poller = tokio::spawn(poll_loop(eventloop, tx));
        let end = self.connected(&client, &mut rx, &relay).await;
        if matches!(end, End::Shutdown) {
            // PUBACKs the agent asked for before the shutdown go first (in order, before the
            // DISCONNECT), so a clean stop does not make the broker redeliver what is done.
            while let Ok(key) = self.acks.try_recv() {
                if let Some(publish) = self.inbound.acked(&key) {
                    self.requests.push_back(Request::Ack(publish));
                }
            }
            self.send_requests(&client);
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
        let _ = poller.await;
        if matches!(end, End::Shutdown) {
            // What rumqttc wrote last (PUBACKs, the DISCONNECT) is still on its way through
            // the relay: let it reach the broker.
            relay.finish(Duration::from_secs(1)).await;
        }
        self.flush_acked().await;
        end
    }

    async fn connected(
        &mut self,
        client: &AsyncClient,
        rx: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
        relay: &Relay,
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
                if self.send_requests(client) {
                    self.publish_ready(client).await;
                }
            }
            // Past the limit of commands the agent holds, the broker waits (TCP backpressure).
            let reading = self.inbound.pending() < self.max_pending_commands;
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => return End::Shutdown,
                Some(key) = self.acks.recv() => {
                    if let Some(publish) = self.inbound.acked(&key) {
                        self.requests.push_back(Request::Ack(publish));
                    }
                }
                ev = rx.recv(), if reading => match ev {
                    None => return End::Lost {
                        error: format!("{}: event loop stopped", self.broker),
                        was_connected: connected,
                    },
                    Some(Err(e)) => return End::Lost {
                        error: match relay.error() {
                            Some(why) => self.describe(&why),
                            None => self.describe(&e.to_string()),
                        },
                        was_connected: connected,
                    },
                    Some(Ok(ev)) => self.handle(ev, relay, &mut connected).await,
                },
                _ = self.notify.notified() => more = true,
                Some(change) = self.changes.recv() => {
                    self.change_subscriptions(change, connected);
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

    async fn handle(&mut self, ev: Event, relay: &Relay, connected: &mut bool) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                *connected = true;
                self.backoff.reset();
                info!(broker = %self.broker, session_present = ack.session_present, "mqtt connected");
                self.requests.push_back(Request::Subscribe(vec![
                    self.topics.desired(),
                    self.topics.cmd_filter(),
                ]));
                if !self.extra.is_empty() {
                    let extra = self.extra.iter().cloned().collect();
                    self.requests.push_back(Request::Subscribe(extra));
                }
                for filter in std::mem::take(&mut self.stale) {
                    self.requests.push_back(Request::Unsubscribe(filter));
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
            Event::Incoming(Packet::Publish(p)) => {
                let oversized = stand_in_seq(&p.payload).and_then(|seq| relay.refused.take(seq));
                match self.inbound.decode(&p, oversized.as_ref()) {
                    // Acknowledged by the agent once durable.
                    Decoded::DeliverCommand(msg) => self.emit(SessionEvent::Inbound(msg)).await,
                    Decoded::Deliver(msg) => {
                        self.emit(SessionEvent::Inbound(msg)).await;
                        self.requests.push_back(Request::Ack(p));
                    }
                    Decoded::Duplicate => {
                        if !self.inbound.is_held(&p) {
                            self.requests.push_back(Request::Ack(p));
                        }
                    }
                    Decoded::Refused(e) => {
                        warn!(error = %e, "inbound message refused");
                        self.emit(SessionEvent::Rejected(e)).await;
                        self.requests.push_back(Request::Ack(p));
                    }
                }
            }
            _ => {}
        }
    }

    /// Hands the client the waiting requests while its channel has room; returns whether
    /// every one went (publishes go only after them).
    fn send_requests(&mut self, client: &AsyncClient) -> bool {
        while let Some(request) = self.requests.front() {
            let sent = match request {
                // QoS 0 messages need no PUBACK (try_ack sends nothing for them).
                Request::Ack(publish) => client.try_ack(publish),
                Request::Subscribe(filters) => client.try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                ),
                Request::Unsubscribe(filter) => client.try_unsubscribe(filter.clone()),
            };
            if sent.is_err() {
                // Full: the event loop takes the earlier requests first; try again then.
                return false;
            }
            if let Some(Request::Subscribe(filters)) = self.requests.pop_front() {
                self.unsent_subscribes.push_back(filters);
            }
        }
        true
    }

    /// Applies a change of the extra subscriptions; tells the broker when connected.
    fn change_subscriptions(&mut self, change: SubscriptionChange, connected: bool) {
        match change {
            SubscriptionChange::Add(filters) => {
                let new: Vec<String> = filters
                    .into_iter()
                    .filter(|f| {
                        self.stale.remove(f);
                        self.extra.insert(f.clone())
                    })
                    .collect();
                if connected && !new.is_empty() {
                    self.requests.push_back(Request::Subscribe(new));
                }
            }
            SubscriptionChange::Remove(filters) => {
                for filter in filters {
                    if !self.extra.remove(&filter) {
                        continue;
                    }
                    if connected {
                        self.requests.push_back(Request::Unsubscribe(filter));
                    } else {
                        self.stale.insert(filter);
                    }
                }
            }
        }
    }

    fn describe(&self, e: &str) -> String {
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
