//! Task events to containerd, in the order they happened.
//!
//! containerd 1.6/1.7 give a shim the address of their ttrpc socket in `TTRPC_ADDRESS`; a shim
//! forwards each event there as an `Envelope` (namespace, topic, the event as an `Any` whose
//! type URL is the message's full protobuf name, as containerd's `typeurl` expects) through
//! `containerd.services.events.ttrpc.v1.Events/Forward`. One task drains one queue, so events
//! reach containerd in the order the task service queued them (create, start, exit, delete),
//! which the shim API requires. A failed forward is retried [`FORWARD_ATTEMPTS`] times on a
//! fresh connection, then dropped with an error in the agent's log.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageField, MessageFull};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc::context;
use tokio::sync::{mpsc, oneshot};

/// Events waiting to be forwarded before `publish` waits for room.
pub const QUEUE_CAPACITY: usize = 1024;
/// Tries per event (the first included).
pub const FORWARD_ATTEMPTS: u32 = 3;
/// Deadline of one forward call.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a task's events go: containerd's ttrpc socket and the task's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTarget {
    /// containerd's ttrpc address (`TTRPC_ADDRESS`), `unix://` prefix optional.
    pub ttrpc_address: String,
    /// The containerd namespace.
    pub namespace: String,
}

enum Queued {
    Event(EventTarget, Envelope),
    Flush(oneshot::Sender<()>),
}

/// Queues events and forwards them in order from one background task.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Queued>,
}

impl Publisher {
    /// Starts the forwarding task. Must be called inside a tokio runtime.
    pub fn spawn() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(forward_loop(rx));
        Self { tx }
    }

    /// Queues `event` on `topic` for `target`.
    pub async fn publish<M: MessageFull>(&self, target: &EventTarget, topic: &str, event: &M) {
        let value = match event.write_to_bytes() {
            Ok(value) => value,
            Err(e) => {
                tracing::error!(topic, error = %e, "cannot encode a task event");
                return;
            }
        };
        let envelope = Envelope {
            timestamp: MessageField::some(timestamp(SystemTime::now())),
            namespace: target.namespace.clone(),
            topic: topic.to_string(),
            event: MessageField::some(Any {
                type_url: M::descriptor().full_name().to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        };
        if self
            .tx
            .send(Queued::Event(target.clone(), envelope))
            .await
            .is_err()
        {
            tracing::error!(topic, "the event publisher has stopped; event dropped");
        }
    }

    /// Resolves once every event queued before it has been forwarded (or dropped).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Queued::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// A ttrpc call deadline of `timeout` in nanoseconds, saturating at `i64::MAX` (292 years).
pub fn timeout_nanos(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX)
}

/// A protobuf timestamp.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        // Below 1e9, so inside i32.
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

async fn forward_loop(mut rx: mpsc::Receiver<Queued>) {
    let mut clients: HashMap<String, EventsClient> = HashMap::new();
    while let Some(item) = rx.recv().await {
        let (target, envelope) = match item {
            Queued::Event(target, envelope) => (target, envelope),
            Queued::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let request = ForwardRequest {
            envelope: MessageField::some(envelope),
            ..Default::default()
        };
        let mut last_error = String::new();
        let mut sent = false;
        for attempt in 0..FORWARD_ATTEMPTS {
            if attempt > 0 {
                // Back off a little before reconnecting: containerd may be restarting.
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            let client = match clients.get(&target.ttrpc_address) {
                Some(client) => client.clone(),
                None => match connect(&target.ttrpc_address).await {
                    Ok(client) => {
                        clients.insert(target.ttrpc_address.clone(), client.clone());
                        client
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        continue;
                    }
                },
            };
            let ctx = context::with_timeout(timeout_nanos(FORWARD_TIMEOUT));
            match client.forward(ctx, &request).await {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    last_error = e.to_string();
                    clients.remove(&target.ttrpc_address);
                }
            }
        }
        if !sent {
            tracing::error!(
                address = %target.ttrpc_address,
                topic = %request.envelope.topic,
                error = %last_error,
                "cannot forward a task event to containerd; dropped"
            );
        }
    }
}

/// containerd's events service did not answer at an address.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to containerd at {address}: {source}")]
struct ConnectError {
    /// The ttrpc address tried.
    address: String,
    /// Why.
    #[source]
    source: ttrpc::Error,
}

async fn connect(address: &str) -> Result<EventsClient, ConnectError> {
    let address = if address.contains("://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    };
    let client = Client::connect(&address)
        .await
        .map_err(|source| ConnectError {
            address: address.clone(),
            source,
        })?;
    Ok(EventsClient::new(client))
}
