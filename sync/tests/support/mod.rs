//! Test helpers: a real Mosquitto on a free loopback port, certificates made with openssl, and a
//! watcher client that records what reaches the broker.

#![allow(dead_code)]

use std::time::Duration;

use lichen_sync::{SessionEvent, SyncHandle};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

mod certs;
#[path = "mosquitto.rs"]
mod mosquitto;
pub use certs::{make_ca, make_leaf};
pub use mosquitto::{Mosquitto, PERSISTENT};

/// A test MQTT client: forwards every message it receives on its subscriptions.
pub struct Watcher {
    pub client: AsyncClient,
    pub messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Connects as `id` (persistent session), subscribes to `filter` at QoS 1 and waits for the
    /// SUBACK. Keeps reconnecting after errors.
    pub async fn connect(port: u16, id: &str, filter: &str) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (tx, messages) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("watcher subscribed within 10 s")
            .expect("watcher task alive");
        Watcher {
            client,
            messages,
            task,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits up to `within` for an event matching `want`, returning it; other events are kept in
/// `seen` for later assertions.
pub async fn wait_event(
    events: &mut mpsc::Receiver<SessionEvent>,
    seen: &mut Vec<String>,
    within: Duration,
    want: impl Fn(&SessionEvent) -> bool,
) -> SessionEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("no matching session event within {within:?}; saw {seen:#?}")
            })
            .expect("session event channel open");
        if want(&ev) {
            return ev;
        }
        seen.push(format!("{ev:?}"));
    }
}

/// Stops the session and waits for its task.
pub async fn stop(handle: SyncHandle, task: tokio::task::JoinHandle<()>) {
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("session stops within 5 s")
        .expect("session task does not panic");
}
