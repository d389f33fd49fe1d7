//! Artifacts over MQTT: how an artifact is cut into chunks, what its manifest says, and which
//! chunks a node still lacks. Plain data and decisions; the agent stores the chunks.
//!
//! The operator publishes, retained, for node `N` and an artifact whose sha256 is `D`:
//! - `lichen/v1/N/artifact/D`: the [`Manifest`] in the usual envelope: size, chunk size, and the
//!   sha256 of every chunk;
//! - `lichen/v1/N/artifact/D/<i>`: chunk `i`, raw bytes (no envelope: the topic names it, its
//!   digest in the manifest checks it).
//!
//! A node that needs `D` subscribes to the manifest, then to the chunks it does not have yet
//! (only those: chunks already stored, from before a reconnect or a restart, are not asked for
//! again). Each chunk is checked against the manifest as it arrives ([`Manifest::check_chunk`])
//! and the whole artifact against `D` before it is used ([`Manifest::check_whole`]): a tampered
//! manifest can at worst make the transfer fail, never make the node run other bytes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::topics::is_digest;

/// Chunk size `lichen hub deploy` uses unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Smallest accepted chunk size.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest accepted chunk size (under the session's 1 MiB packet limit).
pub const MAX_CHUNK_SIZE: u32 = 512 * 1024;
/// Largest artifact accepted over MQTT.
pub const MAX_ARTIFACT_SIZE: u64 = 1 << 30;

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What a node needs to fetch and check an artifact (the payload of `artifact/<sha256>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// sha256 of the whole artifact, 64 lowercase hex digits.
    pub digest: String,
    /// Size of the whole artifact in bytes.
    pub size: u64,
    /// Size of every chunk but the last, in bytes.
    pub chunk_size: u32,
    /// sha256 of each chunk, in order.
    pub chunks: Vec<String>,
}

/// A manifest, chunk or artifact that does not check out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArtifactError {
    /// The manifest contradicts itself or its topic.
    #[error("manifest of artifact sha256:{digest} is invalid: {reason}")]
    BadManifest {
        /// The artifact.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// A chunk index past the last chunk.
    #[error("artifact sha256:{digest} has {chunks} chunks; there is no chunk {index}")]
    NoSuchChunk {
        /// The artifact.
        digest: String,
        /// The index received.
        index: u32,
        /// How many chunks the manifest lists.
        chunks: usize,
    },
    /// A chunk whose size or digest is not what the manifest says.
    #[error(
        "chunk {index} of artifact sha256:{digest} was tampered with or corrupted: {found}, the manifest says {expected}"
    )]
    BadChunk {
        /// The artifact.
        digest: String,
        /// The chunk.
        index: u32,
        /// What the chunk is (`sha256:...` or a size).
        found: String,
        /// What the manifest says.
        expected: String,
    },
    /// The assembled artifact does not have the digest it is named by.
    #[error(
        "artifact sha256:{digest} was tampered with or corrupted: its content has sha256 {found}"
    )]
    BadArtifact {
        /// The digest the artifact was asked for by.
        digest: String,
        /// The digest of what arrived.
        found: String,
    },
}

impl Manifest {
    /// Cuts `bytes` into chunks of `chunk_size` bytes; returns the manifest and the chunks.
    pub fn split(bytes: &[u8], chunk_size: u32) -> (Manifest, Vec<&[u8]>) {
        let chunk_size = chunk_size.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
        let chunks: Vec<&[u8]> = bytes.chunks(chunk_size as usize).collect();
        let manifest = Manifest {
            digest: sha256_hex(bytes),
            size: bytes.len() as u64,
            chunk_size,
            chunks: chunks.iter().map(|c| sha256_hex(c)).collect(),
        };
        (manifest, chunks)
    }

    /// Checks that the manifest is consistent and is the one of `digest` (its topic's).
    pub fn validate(&self, digest: &str) -> Result<(), ArtifactError> {
        let bad = |reason: String| ArtifactError::BadManifest {
            digest: digest.to_owned(),
            reason,
        };
        if self.digest != digest {
            return Err(bad(format!("it names artifact sha256:{}", self.digest)));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(bad(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.size > MAX_ARTIFACT_SIZE {
            return Err(bad(format!(
                "size {} is more than {MAX_ARTIFACT_SIZE}",
                self.size
            )));
        }
        let expected = self.size.div_ceil(u64::from(self.chunk_size));
        if self.chunks.len() as u64 != expected {
            return Err(bad(format!(
                "{} bytes in chunks of {} make {expected} chunks, not {}",
                self.size,
                self.chunk_size,
                self.chunks.len()
            )));
        }
        if let Some(c) = self.chunks.iter().find(|c| !is_digest(c)) {
            return Err(bad(format!(
                "chunk digest {c:?} is not 64 lowercase hex digits"
            )));
        }
        Ok(())
    }

    /// The size chunk `index` must have.
    pub fn chunk_len(&self, index: u32) -> u64 {
        let start = u64::from(index) * u64::from(self.chunk_size);
        self.size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }

    /// Checks one chunk against the manifest.
    pub fn check_chunk(&self, index: u32, bytes: &[u8]) -> Result<(), ArtifactError> {
        let Some(expected) = self.chunks.get(index as usize) else {
            return Err(ArtifactError::NoSuchChunk {
                digest: self.digest.clone(),
                index,
                chunks: self.chunks.len(),
            });
        };
        let want_len = self.chunk_len(index);
        if bytes.len() as u64 != want_len {
            return Err(ArtifactError::BadChunk {
                digest: self.digest.clone(),
                index,
                found: format!("{} bytes", bytes.len()),
                expected: format!("{want_len} bytes"),
            });
        }
        let found = sha256_hex(bytes);
        if &found != expected {
            return Err(ArtifactError::BadChunk {
                digest: self.digest.clone(),
                index,
                found: format!("sha256:{found}"),
                expected: format!("sha256:{expected}"),
            });
        }
        Ok(())
    }

    /// Checks the assembled artifact against the digest it was asked for by.
    pub fn check_whole(&self, bytes: &[u8]) -> Result<(), ArtifactError> {
        let found = sha256_hex(bytes);
        if found != self.digest {
            return Err(ArtifactError::BadArtifact {
                digest: self.digest.clone(),
                found,
            });
        }
        Ok(())
    }
}

/// Which chunks of one artifact a node has, and which it must still ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembly {
    manifest: Manifest,
    present: BTreeSet<u32>,
}

impl Assembly {
    /// An assembly of `manifest` that already holds the chunks `present` (read back from disk
    /// after a restart; indices past the last chunk are ignored).
    pub fn new(manifest: Manifest, present: impl IntoIterator<Item = u32>) -> Self {
        let n = manifest.chunks.len();
        let present = present.into_iter().filter(|i| (*i as usize) < n).collect();
        Assembly { manifest, present }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether chunk `index` is already held.
    pub fn has(&self, index: u32) -> bool {
        self.present.contains(&index)
    }

    /// Records that chunk `index` (checked) is stored; returns whether it was new.
    pub fn stored(&mut self, index: u32) -> bool {
        (index as usize) < self.manifest.chunks.len() && self.present.insert(index)
    }

    /// The chunks still missing, in order.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.manifest.chunks.len())
            .filter_map(|i| u32::try_from(i).ok())
            .filter(|i| !self.present.contains(i))
            .collect()
    }

    /// How many chunks are held.
    pub fn held(&self) -> usize {
        self.present.len()
    }

    /// Whether every chunk is held.
    pub fn complete(&self) -> bool {
        self.present.len() == self.manifest.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| u8::try_from(i * 7 % 251).expect("below 251"))
            .collect()
    }

    #[test]
    fn split_chunks_cover_the_artifact_and_check_out() {
        let bytes = data(5000);
        let (m, chunks) = Manifest::split(&bytes, 2048);
        assert_eq!(m.chunks.len(), 3);
        assert_eq!(chunks.concat(), bytes);
        m.validate(&sha256_hex(&bytes)).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            m.check_chunk(u32::try_from(i).unwrap(), c).unwrap();
        }
        assert_eq!(m.chunk_len(2), 5000 - 4096);
        m.check_whole(&bytes).unwrap();
        // An empty artifact has no chunks.
        let (empty, none) = Manifest::split(&[], 2048);
        assert!(none.is_empty());
        empty.validate(&sha256_hex(&[])).unwrap();
    }

    #[test]
    fn tampered_chunks_and_artifacts_are_named() {
        let bytes = data(4096);
        let (m, chunks) = Manifest::split(&bytes, 1024);
        let mut evil = chunks[2].to_vec();
        evil[0] ^= 1;
        let err = m.check_chunk(2, &evil).unwrap_err().to_string();
        assert!(err.starts_with("chunk 2 of artifact sha256:"), "{err}");
        assert!(err.contains("tampered"), "{err}");
        let err = m.check_chunk(1, &evil[..10]).unwrap_err().to_string();
        assert!(
            err.contains("10 bytes, the manifest says 1024 bytes"),
            "{err}"
        );
        assert!(matches!(
            m.check_chunk(4, chunks[0]),
            Err(ArtifactError::NoSuchChunk { .. })
        ));
        let mut whole = bytes.clone();
        whole[4000] ^= 1;
        assert!(matches!(
            m.check_whole(&whole),
            Err(ArtifactError::BadArtifact { .. })
        ));
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let bytes = data(3000);
        let (m, _) = Manifest::split(&bytes, 1024);
        let d = m.digest.clone();
        assert!(m.validate(&"0".repeat(64)).is_err());
        let mut short = m.clone();
        short.chunks.pop();
        assert!(
            short
                .validate(&d)
                .unwrap_err()
                .to_string()
                .contains("make 3 chunks")
        );
        let mut tiny = m.clone();
        tiny.chunk_size = 10;
        assert!(tiny.validate(&d).is_err());
        let mut bad = m;
        bad.chunks[0] = "xyz".into();
        assert!(bad.validate(&d).is_err());
    }

    #[test]
    fn assembly_asks_only_for_missing_chunks() {
        let (m, _) = Manifest::split(&data(5000), 1024);
        let mut a = Assembly::new(m, [0, 2, 99]);
        assert_eq!(a.held(), 2);
        assert_eq!(a.missing(), vec![1, 3, 4]);
        assert!(a.stored(1));
        assert!(!a.stored(1), "a chunk stored twice counts once");
        assert!(!a.stored(9));
        a.stored(3);
        assert!(!a.complete());
        a.stored(4);
        assert!(a.complete());
        assert!(a.missing().is_empty());
    }
}
