//! `lichen doctor`'s look at the `[hub]` section: what it says, and whether the broker takes a
//! connection with its TLS files and credentials right now.

use std::sync::Arc;
use std::time::Duration;

use super::section_session_config;
use crate::config::HubSection;

/// `doctor`'s view of a `[hub]` section: status and detail, including whether the broker
/// accepts a connection with the section's TLS files and credentials right now.
pub fn doctor_check(hub: Option<&HubSection>) -> (&'static str, String) {
    let (status, detail) = static_check(hub);
    let Some(hub) = hub else {
        return (status, detail);
    };
    match probe(hub) {
        Ok(()) => (
            status,
            format!("{detail}; the broker accepted a test connection"),
        ),
        Err(e) => ("fail", format!("{detail}; cannot connect: {e}")),
    }
}

/// Connects once to the hub as `[hub]` says (TLS, client certificate, credentials) under a
/// client id of its own (the node's would push the running agent off the broker); returns
/// why it failed. Runs on a thread of its own: it may be called from async code.
pub fn probe(hub: &HubSection) -> std::result::Result<(), String> {
    let hub = hub.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        runtime.block_on(probe_async(&hub))
    })
    .join()
    .unwrap_or_else(|_| Err("the connection probe panicked".to_owned()))
}

async fn probe_async(hub: &HubSection) -> std::result::Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};
    let config = section_session_config(hub).map_err(|e| format!("{e:#}"))?;
    let broker = format!(
        "{}://{}:{}",
        if config.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        },
        config.host,
        config.port
    );
    let mut options = MqttOptions::new(
        format!("{}-doctor-{}", config.node, std::process::id()),
        config.host.clone(),
        config.port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        let tls = lichen_sync::rustls_config(tls).map_err(|e| e.to_string())?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    eventloop.network_options.set_connection_timeout(5);
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let mut text = format!("{broker}: {e}");
                    if text.contains("invalid peer certificate")
                        && let Some(tls) = &config.tls
                    {
                        text.push_str(&format!(
                            " (the broker's certificate is not trusted by the CA file {})",
                            tls.ca.display()
                        ));
                    }
                    return Err(text);
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("{broker}: no CONNACK within 10 s")));
    if result.is_ok() {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }
    result
}

fn static_check(hub: Option<&HubSection>) -> (&'static str, String) {
    match hub {
        None => ("ok", "no [hub] section: the node runs offline".to_owned()),
        Some(hub) if hub.insecure_dev => (
            "warn",
            format!(
                "INSECURE: hub.insecure-dev is set, deployments from {} are applied WITHOUT a valid signature",
                hub.url
            ),
        ),
        Some(hub) if hub.trusted_keys.is_empty() => (
            "warn",
            format!(
                "node {} syncs with {}, but hub.trusted-keys is empty: every hub deployment will be rejected",
                hub.node_id, hub.url
            ),
        ),
        Some(hub) => (
            "ok",
            format!(
                "node {} syncs with {}; deployments must be signed by one of {} trusted key(s)",
                hub.node_id,
                hub.url,
                hub.trusted_keys.len()
            ),
        ),
    }
}
