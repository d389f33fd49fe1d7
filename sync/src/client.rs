//! Clients of the broker other than the node's session: the operator's tool (`lichen hub`) and
//! the doctor's connection probe. Their rumqttc options come from
//! [`SessionConfig::client_options`], next to the session's own, so every MQTT connection Lichen
//! makes is configured in [`crate::config`].

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet};
use thiserror::Error;

use crate::config::{ConfigError, SessionConfig};

/// Why the probe could not connect.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// The configuration cannot work (TLS files, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker refused or the connection failed.
    #[error("{broker}: {reason}")]
    Connect {
        /// `mqtt[s]://host:port`.
        broker: String,
        /// rumqttc's error, with a hint about the CA file when the certificate is not trusted.
        reason: String,
    },
    /// No CONNACK in time.
    #[error("{broker}: no CONNACK within {waited:?}")]
    Timeout {
        /// `mqtt[s]://host:port`.
        broker: String,
        /// How long it waited.
        waited: Duration,
    },
}

/// Connects once to the broker of `config` as `client_id` (TLS and credentials as `config`
/// says), waits up to `deadline` for its CONNACK, then disconnects.
pub async fn probe(
    config: &SessionConfig,
    client_id: &str,
    deadline: Duration,
) -> Result<(), ProbeError> {
    let broker = config.broker();
    let options = config.client_options(client_id)?;
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    eventloop
        .network_options
        .set_connection_timeout(config.connect_timeout.as_secs().max(1));
    let result = tokio::time::timeout(deadline, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let mut reason = e.to_string();
                    if reason.contains("invalid peer certificate")
                        && let Some(tls) = &config.tls
                    {
                        reason.push_str(&format!(
                            " (the broker's certificate is not trusted by the CA file {})",
                            tls.ca.display()
                        ));
                    }
                    return Err(ProbeError::Connect {
                        broker: broker.clone(),
                        reason,
                    });
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(ProbeError::Timeout {
            broker: broker.clone(),
            waited: deadline,
        })
    });
    if result.is_ok() {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }
    result
}
