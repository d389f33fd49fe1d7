//! `lichen hub`: the operator's side of the hub, against any MQTT broker. These verbs do not
//! talk to a local daemon: they connect to the broker themselves.
//!
//! - `lichen hub keygen OUT`: a new ed25519 publisher key pair (`OUT`: PKCS#8 v1 PEM, the form
//!   OpenSSL and Python's `cryptography` read, mode 0600; `OUT.pub`: the public key in hex, for
//!   the nodes' `hub.trusted-keys`).
//! - `lichen hub deploy --url U --node N FILE --key KEY [--version V] [--update BUNDLE]`:
//!   publishes, retained, the module files the deployment names by path (chunked, on
//!   `lichen/v1/N/artifact/...`), then the deployment with those modules named by digest,
//!   signed for node N, on `lichen/v1/N/desired`; `--update` adds a system update bundle
//!   (published the same way, named with its size and sha256 in the signed `system`).
//! - `lichen hub status --url U`: every node's retained reported state, as a table.
//! - `lichen hub watch --url U [--node N]`: telemetry, events and command results as they come.
//! - `lichen hub send --url U --node N WORKLOAD COMMAND [PAYLOAD]`: a command on `cmd/<workload>`;
//!   prints its result from `cmd-result/<workload>`.
//! - `lichen hub bundle --node N FILE --key KEY --out OUT`: the same signed desired state and
//!   artifacts as a bundle (directory or `.tar`) for `lichen import` on a node with no network.
//! - `lichen hub update-bundle ROOTFS --system-version V --target T --key KEY --out OUT`: a root
//!   slot image signed into a system update bundle for `lichen update` (see `lichen_agent::update`).
//!
//! The publishing verbs (`deploy`, `bundle`) are in `publish.rs`; `status`, `watch` and `send`
//! in `observe.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lichen_sync::{HubUrl, SessionConfig, TlsFiles};
use rumqttc::MqttOptions;

use lichen_agent::hub::generate_key;
use lichen_agent::render::{emit, push_json};

mod observe;
mod publish;

use observe::{send, status, watch};
use publish::{bundle, deploy};

/// The `hub` verbs.
#[derive(Debug, Clone, Subcommand)]
pub enum HubCommand {
    /// Write a new ed25519 publisher key pair: OUT (PKCS#8 v1 PEM) and OUT.pub (hex).
    Keygen {
        /// Where to write the private key; the public key goes to OUT.pub.
        out: PathBuf,
    },
    /// Sign a deployment and publish it (retained) as a node's desired state.
    // `--version` here is the desired-state version, not the program's.
    #[command(disable_version_flag = true)]
    Deploy(HubDeployArgs),
    /// Print every node's reported state as a table.
    Status(HubStatusArgs),
    /// Write a signed deployment and its artifacts as a bundle for `lichen import` (offline).
    #[command(disable_version_flag = true)]
    Bundle(HubBundleArgs),
    /// Sign a root slot image into a system update bundle for `lichen update` (A/B boards).
    UpdateBundle(lichen_agent::update::UpdateBundleArgs),
    /// Print nodes' telemetry, events and command results as they arrive.
    Watch(HubWatchArgs),
    /// Send a command to a workload on a node and print its result.
    Send(HubSendArgs),
}

/// Options of `lichen hub watch`.
#[derive(Debug, Clone, Args)]
pub struct HubWatchArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only this node [default: every node].
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Stop after this many messages [default: run until interrupted].
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this long [default: run until interrupted].
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

/// Options of `lichen hub send`.
#[derive(Debug, Clone, Args)]
pub struct HubSendArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The node.
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// The workload.
    pub workload: String,
    /// Command name (as `lichen send` takes it).
    pub command: String,
    /// Command payload (text, JSON by convention).
    #[arg(default_value = "")]
    pub payload: String,
    /// How long to wait for the result.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Options of `lichen hub bundle`.
#[derive(Debug, Clone, Args)]
pub struct HubBundleArgs {
    /// The node the bundle is for.
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// The deployment file (TOML); modules named by path go into the bundle.
    pub file: PathBuf,
    /// Publisher private key (PKCS#8, PEM or DER), from `lichen hub keygen`.
    #[arg(long, value_name = "KEYFILE")]
    pub key: PathBuf,
    /// Desired-state version; must be above the node's applied one [default: now, in seconds
    /// since the Unix epoch].
    #[arg(long, value_name = "V")]
    pub version: Option<u64>,
    /// Where to write the bundle: a tar file if the name ends in .tar, else a new directory.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Compiling for the node.
    #[command(flatten)]
    pub precompile: Box<lichen_agent::hub::precompile::PrecompileArgs>,
}

/// How to reach the broker.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT (port 1883 / 8883 if left out).
    #[arg(long, value_name = "URL", env = "LICHEN_HUB_URL")]
    pub url: String,
    /// CA certificate(s) of the broker (PEM), for mqtts://.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM), for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// MQTT user name.
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "LICHEN_HUB_PASSWORD", requires = "username")]
    pub password: Option<String>,
}

/// Options of `lichen hub deploy`.
#[derive(Debug, Clone, Args)]
pub struct HubDeployArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The node to deploy to.
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// The deployment file (TOML). Modules named by path (relative to the file) are published
    /// as artifacts and named by digest in what is signed; modules named `sha256:...` must
    /// already be on the node or published before.
    pub file: PathBuf,
    /// Publisher private key (PKCS#8, PEM or DER), from `lichen hub keygen`.
    #[arg(long, value_name = "KEYFILE")]
    pub key: PathBuf,
    /// Desired-state version; must be above the node's applied one [default: now, in seconds
    /// since the Unix epoch].
    #[arg(long, value_name = "V")]
    pub version: Option<u64>,
    /// Size of the artifact chunks (1KiB to 512KiB).
    #[arg(long, value_name = "SIZE", default_value = "64KiB")]
    pub chunk_size: String,
    /// A system update bundle (from `lichen hub update-bundle`) for A/B boards: named in the
    /// signed desired state (`system`) and published as an artifact; the node writes it to
    /// its inactive slot and reboots into it before it applies the deployment.
    #[arg(long, value_name = "BUNDLE")]
    pub update: Option<PathBuf>,
    /// Compiling for the node.
    #[command(flatten)]
    pub precompile: Box<lichen_agent::hub::precompile::PrecompileArgs>,
}

/// Options of `lichen hub status`.
#[derive(Debug, Clone, Args)]
pub struct HubStatusArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// How long to collect reported states after subscribing.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

/// Runs a `hub` verb; prints JSON if `json`.
pub async fn run(command: HubCommand, json: bool) -> Result<ExitCode> {
    match command {
        HubCommand::Keygen { out } => keygen(&out, json),
        HubCommand::Deploy(args) => deploy(args, json).await,
        HubCommand::Status(args) => status(args, json).await,
        HubCommand::Bundle(args) => bundle(args, json),
        HubCommand::UpdateBundle(args) => lichen_agent::update::make_bundle(args, json),
        HubCommand::Watch(args) => watch(args, json).await,
        HubCommand::Send(args) => send(args, json).await,
    }
}

fn keygen(out: &Path, json: bool) -> Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    let (pem, public) = generate_key()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "cannot create key file {} (it must not exist)",
                out.display()
            )
        })?;
    file.write_all(pem.as_bytes())
        .with_context(|| format!("cannot write key file {}", out.display()))?;
    let mut pub_path = out.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    std::fs::write(&pub_path, format!("{public}\n"))
        .with_context(|| format!("cannot write public key file {}", pub_path.display()))?;
    let id =
        lichen_agent::hub::key_id(&hex::decode(&public).context("generated public key is hex")?);
    let mut text = Vec::new();
    if json {
        push_json(
            &mut text,
            &serde_json::json!({"private": out, "public": pub_path, "public-key": public, "key-id": id}),
        );
    } else {
        let _ = writeln!(
            text,
            "private key {} (keep it secret)\npublic key  {} (key id {id})\nadd to each node's config:\n  [hub]\n  trusted-keys = [\"{public}\"]",
            out.display(),
            pub_path.display()
        );
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Client options for the operator's connection: a fresh clean session with a unique id, built
/// by `lichen_sync` as every Lichen MQTT client's are.
pub(crate) fn options(broker: &BrokerArgs, role: &str) -> Result<MqttOptions> {
    let url = HubUrl::parse(&broker.url)?;
    let id = format!(
        "lichen-{role}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let mut config = SessionConfig::new(id.clone(), url.host, url.port);
    config.keep_alive = Duration::from_secs(10);
    config.max_packet_bytes = 1 << 20;
    if url.tls {
        let ca = broker
            .ca_file
            .clone()
            .context("an mqtts:// url needs --ca-file")?;
        config.tls = Some(TlsFiles {
            ca,
            client: broker.client_cert.clone().zip(broker.client_key.clone()),
        });
    } else if broker.client_cert.is_some() {
        bail!("--client-cert needs an mqtts:// url");
    }
    if let Some(user) = &broker.username {
        config.credentials = Some((user.clone(), broker.password.clone().unwrap_or_default()));
    }
    Ok(config.client_options(&id)?)
}
