//! Artifacts for hub deployments: the node's store of chunks received so far, and the
//! operator's side (finding the module files a deployment names, cutting them into chunks).
//!
//! Chunks are kept under `<state>/artifacts/partial/<sha256>/`: `manifest.json` and one file per
//! chunk (`<index>.chunk`), each written to a temporary name, synced and renamed, so a chunk file
//! that exists is whole. After a restart the node reads them back, checks each against the
//! manifest, and asks the hub only for the ones still missing. Once every chunk is there the
//! artifact is assembled, checked against its digest, added to the artifact store, and its
//! chunk directory removed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lichen_sync::{Envelope, Manifest, MessageId, Topics, is_digest};

use crate::util::write_atomically;

/// The node's store of partially received artifacts.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
}

impl ChunkStore {
    /// The chunk store under `dir` (created when the first chunk comes).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn artifact_dir(&self, digest: &str) -> Result<PathBuf> {
        if !is_digest(digest) {
            bail!("{digest:?} is not a sha256 digest");
        }
        Ok(self.dir.join(digest))
    }

    /// The manifest stored for `digest` and the chunks stored that check out against it.
    pub fn load(&self, digest: &str) -> Result<Option<(Manifest, BTreeSet<u32>)>> {
        let dir = self.artifact_dir(digest)?;
        let text = match fs::read(dir.join("manifest.json")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let Ok(manifest) = serde_json::from_slice::<Manifest>(&text) else {
            return Ok(None);
        };
        if manifest.validate(digest).is_err() {
            return Ok(None);
        }
        // A valid manifest has at most MAX_ARTIFACT_SIZE / MIN_CHUNK_SIZE chunks.
        let Ok(chunks) = u32::try_from(manifest.chunks.len()) else {
            return Ok(None);
        };
        let mut present = BTreeSet::new();
        for index in 0..chunks {
            if let Ok(bytes) = fs::read(dir.join(format!("{index}.chunk")))
                && manifest.check_chunk(index, &bytes).is_ok()
            {
                present.insert(index);
            }
        }
        Ok(Some((manifest, present)))
    }

    /// Starts over for `manifest`'s artifact: drops what was stored, keeps the manifest.
    pub fn reset(&self, manifest: &Manifest) -> Result<()> {
        let dir = self.artifact_dir(&manifest.digest)?;
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_vec(manifest).context("encoding a manifest")?;
        write_atomically(&dir.join("manifest.json"), &json)
    }

    /// Stores one chunk (already checked against the manifest).
    pub fn put(&self, digest: &str, index: u32, bytes: &[u8]) -> Result<()> {
        let dir = self.artifact_dir(digest)?;
        write_atomically(&dir.join(format!("{index}.chunk")), bytes)
    }

    /// Where chunk `index` of `digest` is stored (it may not be there yet).
    pub fn chunk_path(&self, digest: &str, index: u32) -> Result<PathBuf> {
        Ok(self.artifact_dir(digest)?.join(format!("{index}.chunk")))
    }

    /// The whole artifact, from its stored chunks.
    pub fn assemble(&self, manifest: &Manifest) -> Result<Vec<u8>> {
        let dir = self.artifact_dir(&manifest.digest)?;
        let mut out = Vec::with_capacity(usize::try_from(manifest.size).unwrap_or(0));
        for index in 0..manifest.chunks.len() {
            let path = dir.join(format!("{index}.chunk"));
            out.extend(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
        }
        Ok(out)
    }

    /// Forgets an artifact's chunks.
    pub fn remove(&self, digest: &str) {
        if let Ok(dir) = self.artifact_dir(digest) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// The sha256 digests of the modules a deployment text names as `sha256:<digest>`, in order,
/// without repeats. Unparsable text gives none (validation reports it later).
pub fn referenced_digests(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (_, module) in module_values(text) {
        if let Some(d) = module.strip_prefix("sha256:") {
            let d = d.to_ascii_lowercase();
            if is_digest(&d) && !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// Every workload's `module` value with the byte span of the value in `text`.
fn module_values(text: &str) -> Vec<(std::ops::Range<usize>, String)> {
    use toml::de::{DeTable, DeValue};
    let Ok(doc) = DeTable::parse(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in doc.get_ref() {
        if key.get_ref() != "workloads" {
            continue;
        }
        let DeValue::Array(items) = value.get_ref() else {
            continue;
        };
        for item in items {
            let DeValue::Table(table) = item.get_ref() else {
                continue;
            };
            for (k, v) in table {
                if k.get_ref() == "module"
                    && let DeValue::String(s) = v.get_ref()
                {
                    out.push((v.span(), s.to_string()));
                }
            }
        }
    }
    out.sort_by_key(|(span, _)| span.start);
    out
}

/// An artifact the operator publishes with a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalArtifact {
    /// Its sha256, 64 lowercase hex digits.
    pub digest: String,
    /// The file it came from.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Replaces every `module = "<path>"` of a deployment text by `module = "sha256:<digest>"` of
/// the file (relative paths from `base_dir`) and returns the new text with the files read.
/// Modules already named by digest stay as they are and are not returned.
pub fn resolve_modules(text: &str, base_dir: &Path) -> Result<(String, Vec<LocalArtifact>)> {
    let mut out = text.to_owned();
    let mut artifacts: Vec<LocalArtifact> = Vec::new();
    // From the end, so earlier spans stay valid.
    for (span, module) in module_values(text).into_iter().rev() {
        if module.starts_with("sha256:") {
            continue;
        }
        let path = base_dir.join(&module);
        let bytes = fs::read(&path)
            .with_context(|| format!("cannot read module file {}", path.display()))?;
        let digest = lichen_sync::sha256_hex(&bytes);
        out.replace_range(span, &format!("\"sha256:{digest}\""));
        if !artifacts.iter().any(|a| a.digest == digest) {
            artifacts.push(LocalArtifact {
                digest,
                path,
                bytes,
            });
        }
    }
    artifacts.reverse();
    Ok((out, artifacts))
}

/// One MQTT message for the hub: topic, retained, payload.
pub type Message = (String, bool, Vec<u8>);

/// The retained messages that carry `bytes` to node `topics`: its manifest, then its chunks.
pub fn artifact_messages(topics: &Topics, bytes: &[u8], chunk_size: u32, ts: u64) -> Vec<Message> {
    let (manifest, chunks) = Manifest::split(bytes, chunk_size);
    let envelope = Envelope {
        id: MessageId::new("operator", ts),
        ts,
        payload: serde_json::to_value(&manifest).expect("a manifest always serialises"),
    };
    let mut out = vec![(
        topics.artifact_manifest(&manifest.digest),
        true,
        envelope.to_bytes(),
    )];
    // Chunk indices are u32 on the wire; `bytes` is in memory, so it has far fewer than
    // u32::MAX chunks of at least MIN_CHUNK_SIZE bytes.
    for (i, chunk) in (0u32..).zip(chunks) {
        out.push((
            topics.artifact_chunk(&manifest.digest, i),
            true,
            chunk.to_vec(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_become_digests_and_digests_stay() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wasm"), b"aaa").unwrap();
        let d = "ab".repeat(32);
        let text = format!(
            "# x\n[[workloads]]\nname = \"a\"\nmodule = \"a.wasm\" # here\n\n[[workloads]]\nname = \"b\"\nmodule = \"sha256:{d}\"\n[[workloads]]\nname = \"c\"\nmodule = 'a.wasm'\n"
        );
        let (out, artifacts) = resolve_modules(&text, dir.path()).unwrap();
        let a = lichen_sync::sha256_hex(b"aaa");
        assert_eq!(
            out,
            format!(
                "# x\n[[workloads]]\nname = \"a\"\nmodule = \"sha256:{a}\" # here\n\n[[workloads]]\nname = \"b\"\nmodule = \"sha256:{d}\"\n[[workloads]]\nname = \"c\"\nmodule = \"sha256:{a}\"\n"
            )
        );
        assert_eq!(artifacts.len(), 1);
        assert_eq!(artifacts[0].digest, a);
        assert_eq!(referenced_digests(&out), vec![a, d]);
        let err = format!(
            "{:#}",
            resolve_modules(
                "[[workloads]]\nname = \"x\"\nmodule = \"nope.wasm\"\n",
                dir.path()
            )
            .unwrap_err()
        );
        assert!(err.contains("nope.wasm"), "{err}");
    }

    #[test]
    fn chunks_are_stored_whole_and_read_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::new(dir.path().join("partial"));
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let (m, chunks) = Manifest::split(&bytes, 2048);
        assert!(store.load(&m.digest).unwrap().is_none());
        store.reset(&m).unwrap();
        store.put(&m.digest, 0, chunks[0]).unwrap();
        store.put(&m.digest, 2, chunks[2]).unwrap();
        // A chunk file damaged on disk does not count.
        std::fs::write(
            dir.path().join("partial").join(&m.digest).join("1.chunk"),
            b"x",
        )
        .unwrap();
        let (back, present) = store.load(&m.digest).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(present.into_iter().collect::<Vec<_>>(), vec![0, 2]);
        store.put(&m.digest, 1, chunks[1]).unwrap();
        assert_eq!(store.assemble(&m).unwrap(), bytes);
        store.remove(&m.digest);
        assert!(store.load(&m.digest).unwrap().is_none());
    }

    #[test]
    fn artifact_messages_are_a_manifest_then_chunks() {
        let topics = Topics::new("n1").unwrap();
        let bytes = vec![7u8; 3000];
        let msgs = artifact_messages(&topics, &bytes, 1024, 5);
        let d = lichen_sync::sha256_hex(&bytes);
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0].0, format!("lichen/v1/n1/artifact/{d}"));
        assert_eq!(msgs[3].0, format!("lichen/v1/n1/artifact/{d}/2"));
        assert!(msgs.iter().all(|m| m.1));
        let env = Envelope::from_bytes(&msgs[0].2).unwrap();
        let m: Manifest = serde_json::from_value(env.payload).unwrap();
        m.validate(&d).unwrap();
        assert_eq!(msgs[1..].iter().map(|m| m.2.len()).sum::<usize>(), 3000);
    }
}
