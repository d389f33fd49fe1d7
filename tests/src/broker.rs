//! A real Mosquitto for the hub tests, on a free loopback port and killed by its PID, and a
//! watcher client that records what reaches the broker (the same approach as
//! `sync/tests/support/`).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// A `mosquitto` child process, killed by its PID when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    /// The loopback port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn mosquitto_binary() -> PathBuf {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|b| b.is_file())
        .expect("mosquitto is not installed: scripts/install-deps installs the Debian package")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Mosquitto {
    /// An anonymous plain-TCP broker that keeps sessions and retained messages across a
    /// restart (persistence on, saved on SIGTERM), like a production hub.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let user = if is_root() { "user root\n" } else { "" };
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n\
             persistence true\npersistence_location {dir}/\nautosave_interval 1\n\
             log_dest file {dir}/mosquitto.log\n{user}",
            dir = dir.path().display(),
        );
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
            conf,
        };
        m.launch();
        m
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port with the same config and persistence.
    pub fn start_again(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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
