//! `lichen doctor`'s look at the `[hub]` section: what it says, and whether the broker takes a
//! connection with its TLS files and credentials right now.

use std::time::Duration;

use super::section_session_config;
use crate::api::types::DoctorCheck;
use crate::config::HubSection;

/// The `hub` check of an agent config for `lichen doctor`: offline, signed-only, or loudly
/// insecure, and whether the broker takes a connection. It lives with the hub (not in
/// `doctor`, which probes the host and knows nothing of the hub link).
pub fn hub_check(hub: Option<&HubSection>) -> DoctorCheck {
    let (status, detail) = doctor_check(hub);
    DoctorCheck {
        name: "hub".into(),
        status: status.into(),
        detail,
    }
}

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
pub fn probe(hub: &HubSection) -> std::result::Result<(), ProbeError> {
    let hub = hub.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ProbeError::Runtime)?;
        runtime.block_on(probe_async(&hub))
    })
    .join()
    .unwrap_or(Err(ProbeError::Panicked))
}

/// Why the hub's connection probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe's own runtime cannot start.
    #[error("cannot start a runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The probe's thread panicked.
    #[error("the connection probe panicked")]
    Panicked,
    /// `[hub]` does not make session options (its chain, as `{:#}` prints it).
    #[error("{0:#}")]
    Config(anyhow::Error),
    /// The broker did not take the connection.
    #[error(transparent)]
    Connect(#[from] lichen_sync::ProbeError),
}

async fn probe_async(hub: &HubSection) -> std::result::Result<(), ProbeError> {
    let mut config = section_session_config(hub).map_err(ProbeError::Config)?;
    config.keep_alive = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(5);
    let client_id = format!("{}-doctor-{}", config.node, std::process::id());
    Ok(lichen_sync::probe(&config, &client_id, Duration::from_secs(10)).await?)
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
