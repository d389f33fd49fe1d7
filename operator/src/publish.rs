//! Publishing a deployment: `lichen hub deploy` sends the signed desired state and its
//! artifacts to a broker, `lichen hub bundle` writes the same into a bundle for `lichen import`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use lichen_sync::{Envelope, MessageId, Topics};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use lichen_agent::hub::artifacts::{LocalArtifact, Message, artifact_messages, resolve_modules};
use lichen_agent::hub::bundle::BundleIndex;
use lichen_agent::hub::{DesiredState, sign_desired};
use lichen_agent::render::{emit, push_json};

use crate::{BrokerArgs, HubBundleArgs, HubDeployArgs, options};

pub(crate) async fn deploy(args: HubDeployArgs, json: bool) -> Result<ExitCode> {
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

pub(crate) fn bundle(args: HubBundleArgs, json: bool) -> Result<ExitCode> {
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
