//! Hub messages, taken as the hub link takes them: the topic parsed against the node's scheme,
//! the envelope, then per kind what the link does with it.
//!
//! - `desired`: the desired state read from the envelope, its signature checked against the
//!   trusted key, the digests it names found, and the deployment validated;
//! - `cmd/<workload>`: the envelope's id de-duplicated as the session does;
//! - `artifact/<digest>`: the manifest validated, reset into a chunk store on disk, loaded back;
//! - `artifact/<digest>/<index>`: the chunk checked, stored, the artifact assembled and checked
//!   whole.
//!
//! The first byte picks the kind (0 desired, 1 command, 2 manifest, 3 chunk, 4 any topic and
//! payload) and, with its bit 3, whether the rest is the payload as it is or drives a generator
//! (generated desired states carry valid signatures; generated manifests and chunks come from
//! real artifact bytes, then are tampered with).
//!
//! Properties beyond "no panic":
//! - an envelope, a message id and a topic that parse print back to what parses the same;
//! - a desired state prints back to the same state and fingerprint;
//! - a signature made by the trusted key over the signed bytes (node, version, the artifact
//!   sizes of desired v2, deployment) verifies, and the same signature with any of them changed
//!   (an artifact's size raised, one more artifact listed, a v1 signature over a v2 message)
//!   does not;
//! - the digests a deployment names are 64 lowercase hex digits it does name;
//! - a manifest that validates has chunk sizes that add up to its size;
//! - a chunk or artifact that is not the original's bytes is refused; the original's is
//!   accepted, stored, loaded back and assembled to the original;
//! - nothing is written outside the chunk store's directory.

use std::collections::BTreeSet;

use arbitrary::Unstructured;
use lichen_agent::hub::artifacts::{ChunkStore, referenced_digests};
use lichen_agent::hub::{self, DesiredState};
use lichen_sync::{
    Assembly, Envelope, InboundDedup, Manifest, MessageId, TopicKind, Topics, sha256_hex,
};
use serde_json::{Value, json};

use crate::input::{self, int, one_in, pick};
use crate::keys::{self, NODE};

/// The `hub_message` target.
pub fn hub_message(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let structured = mode & 8 != 0;
    let topics = Topics::new(NODE).expect("a valid node id");
    let mut u = Unstructured::new(rest);
    match mode % 8 {
        0 => {
            let payload = if structured {
                desired_envelope(&mut u)
            } else {
                rest.to_vec()
            };
            desired(&topics, &payload);
        }
        1 => {
            let (workload, payload) = if structured {
                (input::name(&mut u), command_envelope(&mut u))
            } else {
                ("w".to_owned(), rest.to_vec())
            };
            command(&topics, &workload, &payload);
        }
        2 if !structured => raw_manifest(rest),
        3 if !structured => raw_chunk(rest),
        2 | 3 => artifact(&topics, &mut u, mode % 8 == 2),
        _ => {
            let topic_len = int::<usize>(&mut u, 0..=80);
            let topic_bytes = u.bytes(topic_len).unwrap_or_default();
            let topic = input::text(topic_bytes).into_owned();
            let payload = u.take_rest();
            any_topic(&topics, &topic, payload);
        }
    }
}

/// Parses an envelope and checks that it prints back to the same envelope.
fn envelope(payload: &[u8]) -> Option<Envelope> {
    let envelope = Envelope::from_bytes(payload).ok()?;
    let again = Envelope::from_bytes(&envelope.to_bytes())
        .unwrap_or_else(|e| panic!("an envelope does not parse back from its bytes: {e}"));
    assert_eq!(again, envelope, "an envelope does not round-trip");
    let id: MessageId = envelope
        .id
        .to_string()
        .parse()
        .unwrap_or_else(|e| panic!("a message id does not parse back: {e}"));
    assert_eq!(id, envelope.id, "a message id does not round-trip");
    Some(envelope)
}

fn desired(topics: &Topics, payload: &[u8]) {
    assert_eq!(topics.parse(&topics.desired()), Some(TopicKind::Desired));
    let Some(envelope) = envelope(payload) else {
        return;
    };
    let Ok(desired) = serde_json::from_value::<DesiredState>(envelope.payload) else {
        return;
    };
    // What the node reads is what it fingerprints: the same message parses to the same state.
    let again: DesiredState = serde_json::to_value(&desired)
        .and_then(serde_json::from_value)
        .expect("a desired state parses back from its JSON");
    assert_eq!(again, desired, "a desired state does not round-trip");
    assert_eq!(hub::fingerprint(&again), hub::fingerprint(&desired));
    let keys = [keys::trusted()];
    let verified = hub::verify(&desired, NODE, &keys);
    let (signature, key_id) = keys::sign_desired(NODE, &desired);
    let genuine = desired.signature.as_deref().map(decoded) == Some(decoded(&signature))
        && desired.key_id.as_ref().is_none_or(|id| *id == key_id);
    if genuine {
        assert!(
            verified.is_ok(),
            "a genuine signature was refused: {verified:?}"
        );
        // The same signature must not verify for another node, version or artifact list.
        let mut other = desired.clone();
        other.version = other.version.wrapping_add(1);
        assert!(
            hub::verify(&other, NODE, &keys).is_err(),
            "replayed version"
        );
        assert!(
            hub::verify(&desired, "node-2", &keys).is_err(),
            "replayed node"
        );
        let mut grown = desired.clone();
        match grown.artifacts.iter_mut().next() {
            Some((_, size)) => *size = size.wrapping_add(1),
            None => {
                grown.artifacts.insert(sha256_hex(b"smuggled"), 1);
            }
        }
        assert!(
            hub::verify(&grown, NODE, &keys).is_err(),
            "a signature held after an artifact size changed or an artifact was added: {grown:?}"
        );
    } else if verified.is_ok() {
        panic!("a signature the trusted key did not make was accepted: {desired:?}");
    }
    for digest in referenced_digests(&desired.deployment) {
        assert!(
            lichen_sync::is_digest(&digest),
            "referenced digest {digest:?} is not 64 lowercase hex digits"
        );
        assert!(
            desired.deployment.to_ascii_lowercase().contains(&digest),
            "referenced digest {digest} is not in the deployment"
        );
    }
    let name = format!("hub desired version {}", desired.version);
    crate::deployment::check(&name, &desired.deployment);
}

/// Signature bytes (the text may be padded or not, wrapped or not).
fn decoded(text: &str) -> Vec<u8> {
    hub::base64_decode(text).unwrap_or_default()
}

fn command(topics: &Topics, workload: &str, payload: &[u8]) {
    let Ok(topic) = topics.cmd(workload) else {
        return;
    };
    let Some(TopicKind::Cmd { workload: parsed }) = topics.parse(&topic) else {
        panic!("the node's own command topic {topic:?} does not parse back");
    };
    assert_eq!(parsed, workload);
    let Some(envelope) = envelope(payload) else {
        return;
    };
    let mut dedup = InboundDedup::new(4);
    assert!(dedup.is_new(&envelope.id), "a first id is new");
    assert!(!dedup.is_new(&envelope.id), "a repeated id is not new");
}

fn any_topic(topics: &Topics, topic: &str, payload: &[u8]) {
    let kind = topics.parse(topic);
    if let Some(kind) = &kind {
        let rebuilt = match kind {
            TopicKind::Desired => topics.desired(),
            TopicKind::Reported => topics.reported(),
            TopicKind::Events => topics.events(),
            TopicKind::Telemetry { workload, stream } => topics
                .telemetry(workload, stream)
                .expect("a parsed telemetry topic has valid names"),
            TopicKind::Cmd { workload } => topics.cmd(workload).expect("valid name"),
            TopicKind::CmdResult { workload } => topics.cmd_result(workload).expect("valid name"),
            TopicKind::ArtifactManifest { digest } => topics.artifact_manifest(digest),
            TopicKind::ArtifactChunk { digest, index } => topics.artifact_chunk(digest, *index),
        };
        assert_eq!(
            topics.parse(&rebuilt).as_ref(),
            Some(kind),
            "topic {topic:?} parsed as {kind:?}, which prints as {rebuilt:?}"
        );
    }
    if let Ok(id) = input::text(payload).parse::<MessageId>() {
        assert_eq!(id.to_string().parse::<MessageId>().ok(), Some(id));
    }
    if let Some(envelope) = envelope(payload) {
        let _ = serde_json::from_value::<DesiredState>(envelope.payload.clone());
        let _ = serde_json::from_value::<Manifest>(envelope.payload);
    }
}

/// A manifest envelope as it is, validated against the digest it names (as if it came on that
/// artifact's topic), stored and loaded back.
fn raw_manifest(payload: &[u8]) {
    let Some(envelope) = envelope(payload) else {
        return;
    };
    let Ok(manifest) = serde_json::from_value::<Manifest>(envelope.payload) else {
        return;
    };
    if !lichen_sync::is_digest(&manifest.digest) || manifest.validate(&manifest.digest).is_err() {
        return;
    }
    let sizes: u64 = (0u32..)
        .zip(&manifest.chunks)
        .map(|(i, _)| manifest.chunk_len(i))
        .sum();
    assert_eq!(
        sizes, manifest.size,
        "chunk sizes do not add up: {manifest:?}"
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = ChunkStore::new(dir.path().join("partial"));
    store
        .reset(&manifest)
        .expect("a chunk store in a temporary directory");
    let loaded = store
        .load(&manifest.digest)
        .expect("loading what was just stored");
    assert_eq!(
        loaded.map(|(m, _)| m),
        Some(manifest),
        "the stored manifest reads back changed"
    );
}

/// Chunk bytes as they are (after a first byte that picks the index) against the honest
/// manifest of a 3000-byte artifact in chunks of 1024: accepted exactly when they are the
/// original chunk.
fn raw_chunk(data: &[u8]) {
    let original: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let (manifest, chunks) = Manifest::split(&original, 1024);
    let Some((index, bytes)) = data.split_first() else {
        return;
    };
    let index = u32::from(*index % 4);
    let honest = chunks.get(index as usize).is_some_and(|c| *c == bytes);
    let checked = manifest.check_chunk(index, bytes);
    assert_eq!(checked.is_ok(), honest, "chunk {index}: {checked:?}");
}

/// Generated manifests (honest or tampered with) and chunks (honest or tampered with, at
/// indexes in and out of range) of a generated artifact, through a chunk store to the whole.
fn artifact(topics: &Topics, u: &mut Unstructured<'_>, manifest_only: bool) {
    // The original artifact and its honest manifest.
    let len = pick(u, &[0usize, 1, 1023, 1024, 1025, 3000, 5000, 70_000]);
    let seed = int::<u8>(u, 0..=255);
    let original: Vec<u8> = (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
        .collect();
    let chunk_size = pick(u, &[0u32, 1, 1023, 1024, 2048, 4096, 512 * 1024, u32::MAX]);
    let (honest, _) = Manifest::split(&original, chunk_size);
    let digest = honest.digest.clone();
    assert_eq!(
        topics.parse(&topics.artifact_manifest(&digest)),
        Some(TopicKind::ArtifactManifest {
            digest: digest.clone()
        })
    );

    let manifest_payload = serde_json::to_vec(&json!({
        "id": "hub:1",
        "ts": 1,
        "payload": tampered_manifest(u, &honest),
    }))
    .expect("JSON");
    let Some(envelope) = envelope(&manifest_payload) else {
        return;
    };
    let Ok(manifest) = serde_json::from_value::<Manifest>(envelope.payload) else {
        return;
    };
    if manifest.validate(&digest).is_err() {
        return;
    }
    let sizes: u64 = (0u32..)
        .zip(&manifest.chunks)
        .map(|(i, _)| manifest.chunk_len(i))
        .sum();
    assert_eq!(
        sizes, manifest.size,
        "chunk sizes do not add up: {manifest:?}"
    );
    assert!(
        manifest.chunks.is_empty() || manifest.chunk_len(last_index(&manifest.chunks)) > 0,
        "a last chunk of no bytes: {manifest:?}"
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = ChunkStore::new(dir.path().join("partial"));
    store
        .reset(&manifest)
        .expect("a chunk store in a temporary directory");
    let (loaded, present) = store
        .load(&digest)
        .expect("loading what was just stored")
        .expect("a stored manifest is found");
    assert_eq!(loaded, manifest, "the stored manifest reads back changed");
    assert!(present.is_empty(), "a reset store holds chunks");

    // Chunks: the honest ones, some tampered with, at indexes in and out of range.
    let mut stored = BTreeSet::new();
    let rounds = if manifest_only {
        0
    } else {
        int::<u32>(u, 0..=12)
    };
    let chunk = |i: u32| -> Vec<u8> {
        let size = usize::try_from(honest.chunk_size).unwrap_or(usize::MAX);
        let start = usize::try_from(i)
            .unwrap_or(usize::MAX)
            .saturating_mul(size)
            .min(original.len());
        let end = start.saturating_add(size).min(original.len());
        original[start..end].to_vec()
    };
    let in_range = |i: u32| (i as usize) < honest.chunks.len();
    let indexes: Vec<u32> = (0u32..).zip(&honest.chunks).map(|(i, _)| i).collect();
    let chunks = u32::try_from(indexes.len()).unwrap_or(u32::MAX);
    for step in 0..rounds.saturating_add(chunks) {
        let (index, bytes) = if step < rounds {
            let index = if one_in(u, 4) {
                pick(u, &[u32::MAX, chunks, 1 << 20])
            } else if indexes.is_empty() {
                0
            } else {
                pick(u, &indexes)
            };
            let mut bytes = if in_range(index) {
                chunk(index)
            } else {
                Vec::new()
            };
            match int(u, 0..=4) {
                0 => {}
                1 if !bytes.is_empty() => {
                    let at = int(u, 0..=bytes.len() - 1);
                    bytes[at] ^= 1 << int(u, 0..=7);
                }
                2 => bytes.push(int::<u8>(u, 0..=255)),
                3 => {
                    bytes.pop();
                }
                _ => bytes = u.arbitrary().unwrap_or_default(),
            }
            (index, bytes)
        } else {
            let index = step - rounds;
            (index, chunk(index))
        };
        let honest_bytes = in_range(index) && bytes == chunk(index);
        let checked = manifest.check_chunk(index, &bytes);
        if manifest == honest {
            assert_eq!(
                checked.is_ok(),
                honest_bytes,
                "chunk {index} of {} bytes: {checked:?}",
                bytes.len()
            );
        } else if !honest_bytes {
            assert!(
                checked.is_err()
                    || manifest.chunks.get(index as usize) == Some(&sha256_hex(&bytes)),
                "chunk {index} accepted against a manifest that does not list its digest"
            );
        }
        if checked.is_ok() && !stored.contains(&index) {
            store.put(&digest, index, &bytes).expect("storing a chunk");
            stored.insert(index);
        }
    }
    let (_, present) = store
        .load(&digest)
        .expect("loading")
        .expect("the manifest is still there");
    assert_eq!(
        present, stored,
        "the chunks found are not the chunks stored"
    );
    let assembly = Assembly::new(manifest.clone(), present);
    if assembly.complete() {
        let whole = store.assemble(&manifest).expect("assembling stored chunks");
        let verdict = manifest.check_whole(&whole);
        assert_eq!(
            verdict.is_ok(),
            whole == original,
            "the assembled artifact's check is wrong: {verdict:?}"
        );
    }
    store.remove(&digest);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listing the temporary directory")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.iter().all(|name| name == "partial"),
        "written outside the chunk store: {left:?}"
    );
}

/// The honest manifest with one thing changed, or as it is.
fn tampered_manifest(u: &mut Unstructured<'_>, honest: &Manifest) -> Value {
    let mut m = serde_json::to_value(honest).expect("a manifest is JSON");
    match int(u, 0..=8) {
        0 => m["size"] = json!(pick(u, input::EDGE_NUMBERS)),
        1 => m["chunk-size"] = json!(pick(u, input::EDGE_NUMBERS)),
        2 => {
            if let Some(chunks) = m["chunks"].as_array_mut() {
                chunks.push(json!(sha256_hex(b"x")));
            }
        }
        3 => {
            if let Some(chunks) = m["chunks"].as_array_mut() {
                chunks.pop();
            }
        }
        4 => {
            if let Some(first) = m["chunks"].get_mut(0) {
                *first = json!(input::digest_ref(u).trim_start_matches("sha256:"));
            }
        }
        5 => m["digest"] = json!(sha256_hex(b"other")),
        6 => m["extra"] = json!(1),
        7 => {
            m = input::any_value(u, 0)
                .to_json()
                .parse()
                .unwrap_or(Value::Null)
        }
        _ => {}
    }
    m
}

/// A desired-state envelope: a generated deployment, with or without the sizes of the
/// artifacts it names (desired v2), signed by the trusted key or not, or signed and then
/// changed.
fn desired_envelope(u: &mut Unstructured<'_>) -> Vec<u8> {
    let deployment = crate::deployment::document(u).to_toml();
    let version = match int(u, 0..=2) {
        0 => int(u, 1..=5),
        1 => pick(u, input::EDGE_NUMBERS).unsigned_abs(),
        _ => u.arbitrary().unwrap_or(1),
    };
    let mut artifacts = std::collections::BTreeMap::new();
    if !one_in(u, 3) {
        for digest in referenced_digests(&deployment) {
            if !one_in(u, 6) {
                artifacts.insert(
                    digest,
                    pick(u, &[0u64, 1, 4096, 1 << 30, (1 << 30) + 1, u64::MAX]),
                );
            }
        }
        if one_in(u, 5) {
            let key = if one_in(u, 2) {
                sha256_hex(input::name(u).as_bytes())
            } else {
                input::name(u)
            };
            artifacts.insert(key, int(u, 0..=u64::MAX));
        }
    }
    let mut desired = DesiredState {
        version,
        deployment,
        artifacts,
        precompiled: Vec::new(),
        system: None,
        signature: None,
        key_id: None,
    };
    let (signature, key_id) = keys::sign_desired(NODE, &desired);
    let (replayed, _) = keys::sign(NODE, version.wrapping_add(1), &desired.deployment);
    // Signed over the v1 bytes (no sizes) although it lists sizes: a downgrade.
    let (downgraded, _) = keys::sign(NODE, version, &desired.deployment);
    match int(u, 0..=7) {
        0 | 1 => {
            desired.signature = Some(signature);
            desired.key_id = Some(key_id);
        }
        2 => desired.signature = Some(signature.trim_end_matches('=').to_owned()),
        // Signed for another version: a replay.
        3 => desired.signature = Some(replayed),
        4 => {
            desired.signature = Some(input::name(u));
            desired.key_id = Some(input::name(u));
        }
        5 => desired.signature = Some(downgraded),
        6 => {
            // Signed, then an artifact's size raised or one more artifact listed.
            desired.signature = Some(signature);
            match desired.artifacts.iter_mut().next() {
                Some((_, size)) => *size = size.saturating_add(1 << 20),
                None => {
                    desired.artifacts.insert(sha256_hex(b"smuggled"), 1 << 29);
                }
            }
        }
        _ => {}
    }
    let mut payload = serde_json::to_value(&desired).expect("a desired state is JSON");
    if one_in(u, 10) {
        payload["extra"] = json!(true);
    }
    if one_in(u, 12) {
        payload["artifacts"] = input::any_value(u, 0)
            .to_json()
            .parse()
            .unwrap_or(Value::Null);
    }
    let id = if one_in(u, 8) {
        input::name(u)
    } else {
        format!("hub:{}", int(u, 0..=u64::MAX))
    };
    serde_json::to_vec(&json!({"id": id, "ts": int(u, 0..=u64::MAX), "payload": payload}))
        .expect("JSON")
}

/// A command envelope: `{"command": NAME, "payload": ...}` in its many shapes.
fn command_envelope(u: &mut Unstructured<'_>) -> Vec<u8> {
    let payload = match int(u, 0..=3) {
        0 => json!({"command": input::name(u), "payload": input::name(u)}),
        1 => json!({"command": input::name(u), "payload": {"x": input::number(u)}}),
        2 => json!({"command": input::number(u)}),
        _ => input::any_value(u, 0)
            .to_json()
            .parse()
            .unwrap_or(Value::Null),
    };
    let id = if one_in(u, 6) {
        input::name(u)
    } else {
        format!("{}:{}", input::name(u), int(u, 0..=u64::MAX))
    };
    serde_json::to_vec(&json!({"id": id, "ts": 1, "payload": payload})).expect("JSON")
}

/// The index of the last of `chunks` (0 when there are none), as the wire's u32.
fn last_index(chunks: &[String]) -> u32 {
    u32::try_from(chunks.len().saturating_sub(1)).unwrap_or(u32::MAX)
}
