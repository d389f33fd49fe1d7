//! Deployment bundles for field technicians: a signed desired state and its artifacts on a USB
//! stick, applied with `lichen import BUNDLE` with no network, verified exactly as a desired
//! state from the hub.
//!
//! A bundle is a directory, or a tar file (`.tar`) of the same files:
//!
//! ```text
//! bundle.json          {"format": "lichen-bundle-v1", "node": "pi-7", "desired": { desired state }}
//! artifacts/<sha256>   the bytes of each artifact the deployment names by digest
//! ```
//!
//! `desired` is exactly the payload of a `desired` message (version, deployment, signature,
//! key-id). `lichen hub bundle` writes one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::DesiredState;

/// The `format` of a bundle this agent reads and writes.
pub const FORMAT: &str = "lichen-bundle-v1";
/// Largest bundle member read, in bytes.
const MAX_MEMBER: u64 = lichen_sync::MAX_ARTIFACT_SIZE;

/// `bundle.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleIndex {
    /// [`FORMAT`].
    pub format: String,
    /// The node the desired state is signed for.
    pub node: String,
    /// The signed desired state.
    pub desired: DesiredState,
}

/// A bundle read from disk, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// `bundle.json`.
    pub index: BundleIndex,
    /// The artifact files by the name they carry (to be checked against their content).
    pub artifacts: BTreeMap<String, Vec<u8>>,
}

/// Reads a bundle directory or tar file.
pub fn read(path: &Path) -> Result<Bundle> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read bundle {}", path.display()))?;
    let mut index = None;
    let mut artifacts = BTreeMap::new();
    let mut take = |name: &str, bytes: Vec<u8>| -> Result<()> {
        let name = name.trim_start_matches("./");
        if name == "bundle.json" {
            index = Some(bytes);
        } else if let Some(a) = name.strip_prefix("artifacts/") {
            if !a.is_empty() {
                artifacts.insert(a.to_owned(), bytes);
            }
        } else {
            bail!("unexpected file {name:?} (a bundle holds bundle.json and artifacts/<sha256>)");
        }
        Ok(())
    };
    if meta.is_dir() {
        take("bundle.json", read_limited(&path.join("bundle.json"))?)?;
        let dir = path.join("artifacts");
        if dir.is_dir() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
            {
                let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                take(&format!("artifacts/{name}"), read_limited(&entry.path())?)?;
            }
        }
    } else {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open bundle {}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        for entry in archive
            .entries()
            .with_context(|| format!("bundle {} is not a tar file", path.display()))?
        {
            let mut entry = entry
                .with_context(|| format!("bundle {} is a damaged tar file", path.display()))?;
            if entry.header().entry_type().is_dir() {
                continue;
            }
            let name = entry
                .path()
                .with_context(|| format!("bundle {}: a member has a bad name", path.display()))?
                .to_string_lossy()
                .into_owned();
            if entry.size() > MAX_MEMBER {
                bail!("bundle member {name} is larger than {MAX_MEMBER} bytes");
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading bundle member {name}"))?;
            take(&name, bytes).with_context(|| format!("bundle {}", path.display()))?;
        }
    }
    let index = index.with_context(|| format!("bundle {} has no bundle.json", path.display()))?;
    let index: BundleIndex = serde_json::from_slice(&index)
        .with_context(|| format!("bundle {}: bundle.json is malformed", path.display()))?;
    if index.format != FORMAT {
        bail!(
            "bundle {} has format {:?}; this agent reads {FORMAT:?}",
            path.display(),
            index.format
        );
    }
    Ok(Bundle { index, artifacts })
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_MEMBER + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_MEMBER {
        bail!("{} is larger than {MAX_MEMBER} bytes", path.display());
    }
    Ok(bytes)
}

/// Writes a bundle to `out`: a tar file if its name ends in `.tar`, else a new directory.
pub fn write(out: &Path, index: &BundleIndex, artifacts: &[(String, &[u8])]) -> Result<()> {
    let json = serde_json::to_vec_pretty(index).context("encoding bundle.json")?;
    if out.extension().is_some_and(|e| e == "tar") {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)
            .with_context(|| format!("cannot create {} (it must not exist)", out.display()))?;
        let mut builder = tar::Builder::new(file);
        let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, bytes)
                .with_context(|| format!("writing {name} into {}", out.display()))
        };
        add("bundle.json", &json)?;
        for (digest, bytes) in artifacts {
            add(&format!("artifacts/{digest}"), bytes)?;
        }
        builder
            .into_inner()
            .and_then(|f| f.sync_all())
            .with_context(|| format!("finishing {}", out.display()))?;
    } else {
        std::fs::create_dir(out)
            .with_context(|| format!("cannot create {} (it must not exist)", out.display()))?;
        let dir: PathBuf = out.join("artifacts");
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(out.join("bundle.json"), json)
            .with_context(|| format!("writing {}/bundle.json", out.display()))?;
        for (digest, bytes) in artifacts {
            std::fs::write(dir.join(digest), bytes)
                .with_context(|| format!("writing {}/{digest}", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> BundleIndex {
        BundleIndex {
            format: FORMAT.into(),
            node: "n1".into(),
            desired: DesiredState {
                version: 3,
                deployment: "[[workloads]]\n".into(),
                artifacts: Default::default(),
                signature: Some("c2ln".into()),
                key_id: Some("00".into()),
            },
        }
    }

    #[test]
    fn bundles_round_trip_as_directory_and_tar() {
        let dir = tempfile::tempdir().unwrap();
        let arts = [("ab".repeat(32), &b"module bytes"[..])];
        for name in ["b", "b.tar"] {
            let out = dir.path().join(name);
            write(&out, &index(), &arts).unwrap();
            let back = read(&out).unwrap();
            assert_eq!(back.index, index(), "{name}");
            assert_eq!(back.artifacts.len(), 1);
            assert_eq!(back.artifacts[&"ab".repeat(32)], b"module bytes");
            assert!(write(&out, &index(), &arts).is_err(), "no overwrite");
        }
    }

    #[test]
    fn bad_bundles_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", read(&dir.path().join("none")).unwrap_err());
        assert!(err.contains("cannot read bundle"), "{err}");
        std::fs::write(dir.path().join("x.tar"), b"not a tar file at all").unwrap();
        assert!(read(&dir.path().join("x.tar")).is_err());
        let b = dir.path().join("b");
        std::fs::create_dir(&b).unwrap();
        std::fs::write(
            b.join("bundle.json"),
            br#"{"format": "other", "node": "n", "desired": {"version": 1, "deployment": ""}}"#,
        )
        .unwrap();
        let err = format!("{:#}", read(&b).unwrap_err());
        assert!(err.contains("format \"other\""), "{err}");
    }
}
