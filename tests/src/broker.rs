//! A real Mosquitto for the hub tests, on a free loopback port and killed by its PID, and a
//! watcher client that records what reaches the broker (the same approach as
//! `sync/tests/support/`).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

#[path = "../../sync/tests/support/certs.rs"]
mod certs;
#[path = "../../sync/tests/support/mosquitto.rs"]
mod mosquitto;
pub use certs::{make_ca, make_leaf};
pub use mosquitto::{Mosquitto, PERSISTENT};

/// One message seen by a [`Watcher`]: topic, whether it came as retained, payload.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The topic.
    pub topic: String,
    /// The retain flag as delivered.
    pub retain: bool,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Seen {
    /// The payload as JSON (`null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// A test MQTT client with a persistent session: records every message on its subscription
/// and can publish. Keeps reconnecting across broker restarts.
pub struct Watcher {
    /// The client, to publish with.
    pub client: Client,
    messages: mpsc::Receiver<Seen>,
}

impl Watcher {
    /// Connects as `id` to `port`, subscribes to `filter` at QoS 1, waits for the SUBACK.
    pub fn connect(port: u16, id: &str, filter: &str) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(options, 1000);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .expect("queue subscribe");
        let (tx, messages) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let seen = Seen {
                            topic: p.topic.clone(),
                            retain: p.retain,
                            payload: p.payload.to_vec(),
                        };
                        if tx.send(seen).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watcher subscribed within 10 s");
        Watcher { client, messages }
    }

    /// The next message within `within`, if any.
    pub fn next(&self, within: Duration) -> Option<Seen> {
        self.messages.recv_timeout(within).ok()
    }

    /// Waits up to `within` for a message that `want` accepts; panics naming `what` with the
    /// messages seen meanwhile.
    pub fn wait_for(&self, what: &str, within: Duration, want: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.messages.recv_timeout(left) {
                Ok(m) if want(&m) => return m,
                Ok(m) => seen.push(format!(
                    "{} {}",
                    m.topic,
                    String::from_utf8_lossy(&m.payload)
                )),
                Err(_) => break,
            }
        }
        let tail: Vec<_> = seen.iter().rev().take(10).collect();
        panic!("waited {within:?} for {what}; the last messages seen: {tail:#?}");
    }

    /// Publishes `payload` on `topic` at QoS 1.
    pub fn publish(&self, topic: &str, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .expect("queue publish");
    }
}
