//! How to reach the hub: [`SessionConfig`], its TLS files, the rustls configuration made from
//! them, and the rumqttc options of every MQTT client Lichen makes (the node's session, the
//! operator's tool, the doctor's probe): built here and nowhere else.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use thiserror::Error;

use crate::topics::NameError;

/// Default largest packet from or to the broker: 1 MiB (artifact chunks are at most 512 KiB).
pub const DEFAULT_MAX_PACKET_BYTES: usize = 1 << 20;
/// Default largest command: 64 KiB.
pub const DEFAULT_MAX_COMMAND_BYTES: usize = 64 << 10;

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
    /// Largest MQTT packet accepted or sent, in bytes (its remaining length). A bigger message
    /// from the broker is read and dropped without being held in memory, then refused and
    /// acknowledged (see [`crate::guard`]); the connection stays up.
    pub max_packet_bytes: usize,
    /// Largest command payload (the envelope's bytes) handed to the agent; a bigger one is
    /// refused with an error result ([`crate::Inbound::RefusedCommand`]).
    pub max_command_bytes: usize,
    /// Most commands handed to the agent and not yet acknowledged by it. At this many the
    /// session stops reading from the broker until the agent catches up (TCP backpressure);
    /// with a broker that limits its in-flight messages (Mosquitto: 20) it is never reached.
    pub max_pending_commands: usize,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Inbound command ids remembered for de-duplication.
    pub dedup_capacity: usize,
    /// How often the outbox is read even without [`crate::SyncHandle::outbox_changed`].
    pub outbox_poll: Duration,
    /// Where the session makes the private directory (0700) of the Unix socket between rumqttc
    /// and its connection (see [`crate::guard`]); the system's temporary directory when `None`.
    /// The agent puts it in its state directory.
    pub socket_dir: Option<PathBuf>,
}

impl SessionConfig {
    /// Plain TCP to `host:port` as `node`, with the defaults: keep-alive 30 s, connect timeout
    /// 10 s, 100 in flight, packets up to 1 MiB, commands up to 64 KiB and 256 of them pending,
    /// back-off 1 s to 5 min, 4096 command ids.
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
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            max_command_bytes: DEFAULT_MAX_COMMAND_BYTES,
            max_pending_commands: 256,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            dedup_capacity: 4096,
            outbox_poll: Duration::from_secs(1),
            socket_dir: None,
        }
    }

    /// `mqtt://host:port` or `mqtts://host:port`.
    pub fn broker(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// Options of a client that reaches `host:port` itself (TCP, or TLS from [`Self::tls`]),
    /// with a clean session, as `client_id`: the operator's tool and the doctor's probe. The
    /// node's session uses [`Self::base_options`] with its guarded local socket instead.
    pub fn client_options(&self, client_id: &str) -> Result<MqttOptions, ConfigError> {
        let mut options = self.base_options(
            client_id,
            self.host.clone(),
            self.port,
            self.max_packet_bytes,
        );
        options.set_clean_session(true);
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(rustls_config(tls)?),
            )));
        }
        Ok(options)
    }

    /// What every client shares: keep-alive, packet size limits (`incoming` in, the configured
    /// maximum out) and credentials.
    pub(crate) fn base_options(
        &self,
        client_id: &str,
        host: String,
        port: u16,
        incoming: usize,
    ) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(incoming, self.max_packet_bytes);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        options
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
    /// No command could ever be handed over.
    #[error("max_pending_commands must be at least 1")]
    MaxPending,
    /// The private directory of the session's local socket cannot be made.
    #[error("cannot make the session's socket directory: {0}")]
    SocketDir(#[source] std::io::Error),
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
