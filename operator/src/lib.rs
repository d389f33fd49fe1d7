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

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use lichen_sync::{Envelope, HubUrl, MessageId, SessionConfig, TlsFiles, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use lichen_agent::hub::artifacts::{LocalArtifact, Message, artifact_messages, resolve_modules};
use lichen_agent::hub::bundle::BundleIndex;
use lichen_agent::hub::{DesiredState, generate_key, sign_desired};
use lichen_agent::render::{self, Table, emit, push_json};

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
fn options(broker: &BrokerArgs, role: &str) -> Result<MqttOptions> {
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

async fn deploy(args: HubDeployArgs, json: bool) -> Result<ExitCode> {
    let topics = Topics::new(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read deployment file {}", args.file.display()))?;
    let chunk_size = lichen_agent::config::parse_size(&args.chunk_size)
        .ok()
        .and_then(|s| u32::try_from(s).ok())
        .filter(|s| (lichen_sync::MIN_CHUNK_SIZE..=lichen_sync::MAX_CHUNK_SIZE).contains(s))
        .with_context(|| {
            format!(
                "--chunk-size {:?} is not a size from 1KiB to 512KiB",
                args.chunk_size
            )
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let system = args
        .update
        .as_deref()
        .map(lichen_agent::hub::update::describe_bundle)
        .transpose()?;
    let (desired, mut artifacts) = signed_desired(
        &args.node,
        &args.file,
        &text,
        &args.key,
        args.version,
        system.as_ref().map(|(s, _)| s.clone()),
        &args.precompile,
    )?;
    if let (Some((update, bytes)), Some(path)) = (system, &args.update) {
        artifacts.push(LocalArtifact {
            digest: update.sha256,
            path: path.clone(),
            bytes,
        });
    }
    let version = desired.version;
    let key_id = desired.key_id.clone().unwrap_or_default();
    let envelope = Envelope {
        id: MessageId::new("operator", version),
        ts: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
        payload: serde_json::to_value(&desired).context("encoding the desired state")?,
    };
    // Artifacts first: a node that sees the desired state can fetch them at once.
    let ts = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    let mut messages = Vec::new();
    for artifact in &artifacts {
        messages.extend(artifact_messages(&topics, &artifact.bytes, chunk_size, ts));
    }
    messages.push((topics.desired(), true, envelope.to_bytes()));
    publish_all(&args.broker, "deploy", messages)
        .await
        .with_context(|| format!("publishing the desired state of node {}", args.node))?;
    let mut out = Vec::new();
    if json {
        let published: Vec<_> = artifacts
            .iter()
            .map(|a| serde_json::json!({"digest": a.digest, "file": a.path, "size": a.bytes.len()}))
            .collect();
        push_json(
            &mut out,
            &serde_json::json!({"node": args.node, "version": version, "key-id": key_id, "topic": topics.desired(), "artifacts": published}),
        );
    } else {
        for a in &artifacts {
            let _ = writeln!(
                out,
                "published artifact sha256:{} ({}, {} bytes) for node {}",
                a.digest,
                a.path.display(),
                a.bytes.len(),
                args.node
            );
        }
        let _ = writeln!(
            out,
            "published desired state version {version} for node {} (signed by key {key_id}, retained on {})",
            args.node,
            topics.desired()
        );
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// The desired state of `file` (text `text`) for `node`: modules named by path are read and
/// named by digest, then the text is signed with the key in `key_file`.
fn signed_desired(
    node: &str,
    file: &Path,
    text: &str,
    key_file: &Path,
    version: Option<u64>,
    system: Option<lichen_agent::hub::update::SystemUpdate>,
    precompile: &lichen_agent::hub::precompile::PrecompileArgs,
) -> Result<(DesiredState, Vec<LocalArtifact>)> {
    let base_dir = std::fs::canonicalize(file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let (text, mut artifacts) = resolve_modules(text, &base_dir)
        .with_context(|| format!("resolving the modules of {}", file.display()))?;
    let (compiled, precompiled) =
        lichen_agent::hub::precompile::precompile(&artifacts, &precompile.engines()?)?;
    artifacts.extend(compiled);
    let key = std::fs::read(key_file)
        .with_context(|| format!("cannot read key file {}", key_file.display()))?;
    let version = version.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    });
    // The sizes are signed with the text: a node fetches exactly these artifacts, this big.
    let mut desired = DesiredState {
        version,
        deployment: text,
        artifacts: artifacts
            .iter()
            .map(|a| (a.digest.clone(), a.bytes.len() as u64))
            .collect(),
        precompiled,
        system,
        signature: None,
        key_id: None,
    };
    let (signature, key_id) = sign_desired(&key, node, &desired)
        .with_context(|| format!("signing with key file {}", key_file.display()))?;
    desired.signature = Some(signature);
    desired.key_id = Some(key_id);
    Ok((desired, artifacts))
}

fn bundle(args: HubBundleArgs, json: bool) -> Result<ExitCode> {
    Topics::new(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read deployment file {}", args.file.display()))?;
    let (desired, artifacts) = signed_desired(
        &args.node,
        &args.file,
        &text,
        &args.key,
        args.version,
        None,
        &args.precompile,
    )?;
    let index = BundleIndex {
        format: lichen_agent::hub::bundle::FORMAT.to_owned(),
        node: args.node.clone(),
        desired,
    };
    let files: Vec<(String, &[u8])> = artifacts
        .iter()
        .map(|a| (a.digest.clone(), a.bytes.as_slice()))
        .collect();
    lichen_agent::hub::bundle::write(&args.out, &index, &files)?;
    let mut out = Vec::new();
    if json {
        push_json(
            &mut out,
            &serde_json::json!({"bundle": args.out, "node": args.node, "version": index.desired.version,
                "key-id": index.desired.key_id, "artifacts": artifacts.iter().map(|a| &a.digest).collect::<Vec<_>>()}),
        );
    } else {
        let _ = writeln!(
            out,
            "wrote bundle {} for node {}: desired state version {} signed by key {}, {} artifact(s)\napply it on the node with: lichen import {}",
            args.out.display(),
            args.node,
            index.desired.version,
            index.desired.key_id.as_deref().unwrap_or("-"),
            artifacts.len(),
            args.out.display()
        );
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Publishes `messages` at QoS 1 in order and waits for every PUBACK.
async fn publish_all(broker: &BrokerArgs, role: &str, messages: Vec<Message>) -> Result<()> {
    let url = broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options(broker, role)?, 64);
    let total = messages.len();
    let publisher = tokio::spawn(async move {
        for (topic, retain, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let acked = tokio::time::timeout(Duration::from_secs(60), async {
        let mut acked = 0;
        while acked < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(anyhow!("{url}: {e}")),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow!("{url}: not every PUBACK came within 60 s"));
    if let Err(e) | Ok(Err(e)) = acked {
        publisher.abort();
        return Err(e);
    }
    let client = publisher
        .await
        .context("publisher task")?
        .context("queueing a publish")?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    Ok(())
}

async fn status(args: HubStatusArgs, json: bool) -> Result<ExitCode> {
    let url = args.broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options(&args.broker, "status")?, 10);
    let filter = format!("{}/+/reported", lichen_sync::topics::PREFIX);
    client
        .subscribe(&filter, QoS::AtLeastOnce)
        .await
        .context("queueing the subscription")?;
    let mut nodes: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut subscribed = false;
    let deadline = tokio::time::Instant::now() + args.wait + Duration::from_secs(10);
    let mut collect_until = None;
    loop {
        let until = collect_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, eventloop.poll()).await {
            Err(_) if subscribed => break,
            Err(_) => bail!("{url}: not subscribed within 10 s"),
            Ok(Err(e)) => bail!("{url}: {e}"),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subscribed = true;
                collect_until = Some(tokio::time::Instant::now() + args.wait);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let node = p.topic.split('/').nth(2).unwrap_or_default().to_owned();
                let value = match Envelope::from_bytes(&p.payload) {
                    Ok(env) => env.payload,
                    Err(e) => {
                        serde_json::json!({"error": format!("malformed reported state: {e}")})
                    }
                };
                nodes.insert(node, value);
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &nodes);
    } else {
        write_status(&mut out, &nodes);
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn write_status(out: &mut Vec<u8>, nodes: &BTreeMap<String, serde_json::Value>) {
    if nodes.is_empty() {
        out.extend_from_slice(b"no node has reported state on this broker\n");
        return;
    }
    let mut table = Table::new(&[
        "NODE",
        "APPLIED",
        "CONNECTED",
        "WORKLOADS",
        "OUTBOX",
        "DROPPED",
        "INSECURE",
        "LAST-REJECTION",
    ]);
    for (node, r) in nodes {
        let workloads = r["workloads"].as_array().map_or_else(
            || "-".to_owned(),
            |w| {
                let running = w.iter().filter(|w| w["state"] == "running").count();
                format!("{running}/{} running", w.len())
            },
        );
        let dropped: u64 = r["counters"]["dropped-telemetry"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
        table.row(vec![
            node.clone(),
            r["applied-version"]
                .as_u64()
                .map_or_else(|| "-".into(), |v| v.to_string()),
            r["connection"]["connected"]
                .as_bool()
                .map_or_else(|| "-".into(), |c| if c { "yes" } else { "no" }.into()),
            workloads,
            r["counters"]["outbox-rows"]
                .as_u64()
                .map_or_else(|| "-".into(), |v| v.to_string()),
            dropped.to_string(),
            if r["insecure-dev"] == true {
                "YES"
            } else {
                "no"
            }
            .into(),
            render::cell(
                r["last-rejection"]["reason"]
                    .as_str()
                    .or(r["error"].as_str())
                    .unwrap_or(""),
                80,
            ),
        ]);
    }
    let _ = table.write(out);
}

/// One message `hub watch` prints.
#[derive(Debug, serde::Serialize)]
struct Watched {
    topic: String,
    node: String,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    id: Option<String>,
    ts: Option<u64>,
    payload: serde_json::Value,
}

/// What a watched topic is, or `None` for topics `hub watch` does not print.
fn watched(topic: &str, payload: &[u8]) -> Option<Watched> {
    let node = topic
        .strip_prefix(lichen_sync::topics::PREFIX)?
        .strip_prefix('/')?
        .split('/')
        .next()?;
    let topics = Topics::new(node).ok()?;
    let (kind, workload, stream) = match topics.parse(topic)? {
        lichen_sync::TopicKind::Telemetry { workload, stream } => {
            ("telemetry", Some(workload), Some(stream))
        }
        lichen_sync::TopicKind::Events => ("event", None, None),
        lichen_sync::TopicKind::CmdResult { workload } => ("cmd-result", Some(workload), None),
        _ => return None,
    };
    let (id, ts, payload) = match Envelope::from_bytes(payload) {
        Ok(env) => (Some(env.id.to_string()), Some(env.ts), env.payload),
        Err(e) => (
            None,
            None,
            serde_json::json!({"malformed": e.to_string(), "bytes": String::from_utf8_lossy(payload)}),
        ),
    };
    Some(Watched {
        topic: topic.to_owned(),
        node: node.to_owned(),
        kind,
        workload,
        stream,
        id,
        ts,
        payload,
    })
}

fn write_watched(out: &mut Vec<u8>, w: &Watched) {
    let time = w.ts.map_or_else(|| "-".to_owned(), render::time_ms);
    let what = match (&w.workload, &w.stream) {
        (Some(wl), Some(s)) => format!("{wl}/{s}"),
        (Some(wl), None) => wl.clone(),
        _ => "-".to_owned(),
    };
    let _ = writeln!(
        out,
        "{time} {} {:<10} {what} {} {}",
        w.node,
        w.kind,
        w.id.as_deref().unwrap_or("-"),
        w.payload
    );
}

async fn watch(args: HubWatchArgs, json: bool) -> Result<ExitCode> {
    let node = match &args.node {
        Some(n) => {
            Topics::new(n).map_err(|e| anyhow!("--node: {e}"))?;
            n.as_str()
        }
        None => "+",
    };
    let base = format!("{}/{node}", lichen_sync::topics::PREFIX);
    let filters = [
        format!("{base}/telemetry/#"),
        format!("{base}/events"),
        format!("{base}/cmd-result/+"),
    ];
    let url = args.broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options(&args.broker, "watch")?, 10);
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut printed = 0u64;
    loop {
        if args.count.is_some_and(|c| printed >= c) {
            break;
        }
        let ev = match until {
            Some(t) => match tokio::time::timeout_at(t, eventloop.poll()).await {
                Ok(ev) => ev,
                Err(_) => break,
            },
            None => eventloop.poll().await,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A clean session: subscribe on every connection.
                for f in &filters {
                    client
                        .subscribe(f.clone(), QoS::AtLeastOnce)
                        .await
                        .context("queueing the subscription")?;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(w) = watched(&p.topic, &p.payload) {
                    let mut out = Vec::new();
                    if json {
                        serde_json::to_writer(&mut out, &w).context("encoding a message")?;
                        out.push(b'\n');
                    } else {
                        write_watched(&mut out, &w);
                    }
                    emit(&out)?;
                    printed += 1;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("{url}: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(ExitCode::SUCCESS)
}

async fn send(args: HubSendArgs, json: bool) -> Result<ExitCode> {
    let topics = Topics::new(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    let cmd_topic = topics
        .cmd(&args.workload)
        .map_err(|e| anyhow!("workload: {e}"))?;
    let result_topic = topics
        .cmd_result(&args.workload)
        .map_err(|e| anyhow!("workload: {e}"))?;
    let options = options(&args.broker, "send")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    let id = MessageId::new(options.client_id(), ts);
    let envelope = Envelope {
        id: id.clone(),
        ts,
        payload: serde_json::json!({"command": args.command, "payload": args.payload}),
    };
    let url = args.broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    // Subscribe to the results first, publish once the broker confirmed it.
    client
        .subscribe(&result_topic, QoS::AtLeastOnce)
        .await
        .context("queueing the subscription")?;
    let id_text = id.to_string();
    let found = tokio::time::timeout(args.timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client
                        .publish(&cmd_topic, QoS::AtLeastOnce, false, envelope.to_bytes())
                        .await
                        .context("queueing the command")?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == result_topic => {
                    if let Ok(env) = Envelope::from_bytes(&p.payload)
                        && env.payload["cmd"] == id_text.as_str()
                    {
                        return Ok(env.payload);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow!("{url}: {e}")),
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow!(
            "no result for command {id_text} from workload {} on node {} within {:?} (is the node connected?)",
            args.workload,
            args.node,
            args.timeout
        )
    })??;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &found);
    } else if found["ok"] == true {
        match found["reply"].as_str() {
            Some(reply) => {
                let _ = writeln!(out, "{reply}");
            }
            None => {
                let _ = writeln!(out, "command {id_text} delivered; no reply");
            }
        }
    }
    emit(&out)?;
    if found["ok"] == true {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow!(
            "workload {} on node {} refused command {id_text}: {}",
            args.workload,
            args.node,
            found["error"].as_str().unwrap_or("no reason given")
        ))
    }
}
