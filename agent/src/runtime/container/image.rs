//! Offline import of OCI images: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) or a tarball of one, unpacked into a content-addressed store.
//!
//! The index, manifest and configuration are read with `oci-spec`'s image types; every blob is
//! checked against its sha256 digest before use. Layers are unpacked in order with the `tar`
//! crate (gzip through `flate2`), honouring whiteouts: `.wh.NAME` removes `NAME` of the layers
//! below, `.wh..wh..opq` empties its directory of what the layers below put there. The result
//! lands in `<store>/<manifest digest>/rootfs` with the image's entrypoint, command and
//! environment beside it in `image.json`; a directory is renamed into place only once complete,
//! so a crash mid-import leaves nothing half-imported under a digest.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// What an imported image says to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// The image's entrypoint.
    pub entrypoint: Vec<String>,
    /// The image's default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// sha256 of the image manifest (hex).
    pub digest: String,
    /// The unpacked root filesystem.
    pub rootfs: PathBuf,
    /// What the image says to run.
    pub config: ImageConfig,
}

/// The content-addressed image store under the agent's state directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// A store in `dir` (created on first import).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ImageStore { dir: dir.into() }
    }

    /// The image stored under `digest`, if it is complete.
    pub fn get(&self, digest: &str) -> Option<ImportedImage> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let dir = self.dir.join(digest);
        let text = std::fs::read_to_string(dir.join("image.json")).ok()?;
        let config: ImageConfig = serde_json::from_str(&text).ok()?;
        Some(ImportedImage {
            digest: digest.to_string(),
            rootfs: dir.join("rootfs"),
            config,
        })
    }

    /// Imports an OCI image layout directory or tarball (plain or gzip). Blocking: call it
    /// off the async workers. An image already in the store is not unpacked again.
    pub fn import(&self, source: &Path) -> Result<ImportedImage, String> {
        let meta = std::fs::metadata(source)
            .map_err(|e| format!("cannot read image {}: {e}", source.display()))?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create the image store {}: {e}", self.dir.display()))?;
        if meta.is_dir() {
            return self.import_layout(source);
        }
        // A tarball: unpack the layout into a scratch directory of the store first.
        let scratch = tempfile::Builder::new()
            .prefix(".layout-")
            .tempdir_in(&self.dir)
            .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
        let file = File::open(source)
            .map_err(|e| format!("cannot open image {}: {e}", source.display()))?;
        let mut archive = tar::Archive::new(decompressed(file)?);
        archive.unpack(scratch.path()).map_err(|e| {
            format!(
                "{} is neither an OCI layout directory nor a readable tarball of one: {e}",
                source.display()
            )
        })?;
        self.import_layout(scratch.path())
    }

    fn import_layout(&self, layout: &Path) -> Result<ImportedImage, String> {
        let marker = std::fs::read_to_string(layout.join("oci-layout")).map_err(|_| {
            format!(
                "{} is not an OCI image layout: it has no `oci-layout` file",
                layout.display()
            )
        })?;
        let marker: serde_json::Value =
            serde_json::from_str(&marker).map_err(|e| format!("`oci-layout` is not JSON: {e}"))?;
        if marker["imageLayoutVersion"] != "1.0.0" {
            return Err(format!(
                "unsupported OCI layout version {} (expected \"1.0.0\")",
                marker["imageLayoutVersion"]
            ));
        }
        let index = ImageIndex::from_file(layout.join("index.json"))
            .map_err(|e| format!("cannot read index.json: {e}"))?;
        let manifest_desc = pick_manifest(layout, index.manifests(), 0)?;
        let manifest_bytes = read_blob(layout, &manifest_desc)?;
        let digest = hex_of(&manifest_desc)?;
        if let Some(image) = self.get(&digest) {
            return Ok(image);
        }
        let manifest = ImageManifest::from_reader(&manifest_bytes[..])
            .map_err(|e| format!("manifest {digest}: {e}"))?;
        let config_bytes = read_blob(layout, manifest.config())?;
        let configuration = ImageConfiguration::from_reader(&config_bytes[..])
            .map_err(|e| format!("image configuration: {e}"))?;
        let config = configuration
            .config()
            .as_ref()
            .map(|c| ImageConfig {
                entrypoint: c.entrypoint().clone().unwrap_or_default(),
                cmd: c.cmd().clone().unwrap_or_default(),
                env: c.env().clone().unwrap_or_default(),
            })
            .unwrap_or_default();

        let work = tempfile::Builder::new()
            .prefix(".import-")
            .tempdir_in(&self.dir)
            .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
        let rootfs = work.path().join("rootfs");
        std::fs::create_dir(&rootfs).map_err(|e| format!("cannot create the rootfs: {e}"))?;
        for (index, layer) in manifest.layers().iter().enumerate() {
            unpack_layer(layout, layer, &rootfs).map_err(|e| format!("layer {index}: {e}"))?;
        }
        let json = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
        std::fs::write(work.path().join("image.json"), json)
            .map_err(|e| format!("cannot write image.json: {e}"))?;
        let work = work.keep();
        let target = self.dir.join(&digest);
        if let Err(err) = std::fs::rename(&work, &target) {
            let _ = std::fs::remove_dir_all(&work);
            // Another import of the same image may have won the race.
            if self.get(&digest).is_none() {
                return Err(format!("cannot store image {digest}: {err}"));
            }
        }
        self.get(&digest)
            .ok_or_else(|| format!("image {digest} vanished from the store"))
    }
}

/// The image manifest for this host: the one whose platform matches, else the only one.
fn pick_manifest(layout: &Path, list: &[Descriptor], depth: usize) -> Result<Descriptor, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        other => other,
    };
    let fits = |d: &&Descriptor| {
        d.platform()
            .as_ref()
            .is_none_or(|p| p.architecture().to_string() == arch && p.os().to_string() == "linux")
    };
    let chosen = match list {
        [] => return Err("index.json lists no manifest".to_string()),
        [only] => only.clone(),
        many => many.iter().find(fits).cloned().ok_or_else(|| {
            format!(
                "index.json has {} manifests, none for linux/{arch}",
                many.len()
            )
        })?,
    };
    if chosen
        .media_type()
        .to_string()
        .ends_with("image.index.v1+json")
    {
        if depth > 2 {
            return Err("image indexes nest too deep".to_string());
        }
        let nested = read_blob(layout, &chosen)?;
        let index =
            ImageIndex::from_reader(&nested[..]).map_err(|e| format!("nested index: {e}"))?;
        return pick_manifest(layout, index.manifests(), depth + 1);
    }
    Ok(chosen)
}

fn hex_of(desc: &Descriptor) -> Result<String, String> {
    let digest = desc.digest();
    let text = digest.to_string();
    match text.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 => Ok(hex.to_ascii_lowercase()),
        _ => Err(format!(
            "unsupported digest {text}: only sha256 is accepted"
        )),
    }
}

fn blob_path(layout: &Path, desc: &Descriptor) -> Result<PathBuf, String> {
    Ok(layout.join("blobs/sha256").join(hex_of(desc)?))
}

/// Reads a small blob (index, manifest, config) and checks its digest.
fn read_blob(layout: &Path, desc: &Descriptor) -> Result<Vec<u8>, String> {
    let path = blob_path(layout, desc)?;
    let bytes =
        std::fs::read(&path).map_err(|e| format!("cannot read blob {}: {e}", path.display()))?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != hex_of(desc)? {
        return Err(format!(
            "blob {} does not match its digest (its content hashes to sha256:{got})",
            desc.digest()
        ));
    }
    Ok(bytes)
}

/// Checks a layer blob's digest by streaming it.
fn check_blob(path: &Path, desc: &Descriptor) -> Result<(), String> {
    let mut file =
        File::open(path).map_err(|e| format!("cannot read blob {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| format!("cannot read blob: {e}"))?;
    let got = hex::encode(hasher.finalize());
    if got != hex_of(desc)? {
        return Err(format!(
            "blob {} does not match its digest (its content hashes to sha256:{got})",
            desc.digest()
        ));
    }
    Ok(())
}

/// A reader of `file`, gunzipped if it starts with the gzip magic.
fn decompressed(mut file: File) -> Result<Box<dyn Read>, String> {
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(BufReader::new(file))))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

/// A layer entry's path as a clean relative path, or `None` if it tries to leave the root.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// An error with its sources, outermost first (tar's errors hide the OS error in a source).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Removes a path without following a symlink at its end.
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one layer: first its whiteouts to what the layers below left, then its files.
fn unpack_layer(layout: &Path, desc: &Descriptor, rootfs: &Path) -> Result<(), String> {
    let media = desc.media_type().to_string();
    if media.contains("zstd") {
        return Err(format!(
            "zstd-compressed layers ({media}) are not supported; use tar or tar+gzip"
        ));
    }
    let path = blob_path(layout, desc)?;
    check_blob(&path, desc)?;
    let open = || -> Result<tar::Archive<Box<dyn Read>>, String> {
        let file =
            File::open(&path).map_err(|e| format!("cannot read blob {}: {e}", path.display()))?;
        Ok(tar::Archive::new(decompressed(file)?))
    };

    // Pass 1: whiteouts, against the lower layers only.
    let mut whiteouts: HashSet<PathBuf> = HashSet::new();
    let mut archive = open()?;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| format!("unreadable entry: {e}"))?;
        let raw = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Some(rel) = clean(&raw) else {
            return Err(format!("entry {} leaves the root", raw.display()));
        };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(hidden) = name.strip_prefix(".wh.") else {
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        whiteouts.insert(rel.clone());
        if hidden == ".wh..opq" {
            let dir = rootfs.join(parent);
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    remove(&child.path()).map_err(|e| format!("opaque whiteout: {e}"))?;
                }
            }
        } else {
            remove(&rootfs.join(parent).join(hidden))
                .map_err(|e| format!("whiteout of {}: {e}", parent.join(hidden).display()))?;
        }
    }

    // Pass 2: the layer's own files.
    let mut archive = open()?;
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| format!("unreadable entry: {e}"))?;
        let raw = entry.path().map_err(|e| e.to_string())?.into_owned();
        let rel = clean(&raw).ok_or_else(|| format!("entry {} leaves the root", raw.display()))?;
        if whiteouts.contains(&rel) || rel.as_os_str().is_empty() {
            continue;
        }
        // A file replacing a directory of a lower layer (or the reverse) replaces it whole.
        let target = rootfs.join(&rel);
        if let Ok(meta) = std::fs::symlink_metadata(&target)
            && (meta.is_dir() != entry.header().entry_type().is_dir())
        {
            remove(&target).map_err(|e| format!("cannot replace {}: {e}", rel.display()))?;
        }
        entry
            .unpack_in(rootfs)
            .map_err(|e| format!("cannot unpack {}: {}", rel.display(), chain(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a blob and returns its descriptor JSON.
    fn blob(layout: &Path, media: &str, bytes: &[u8]) -> serde_json::Value {
        let hex = hex::encode(Sha256::digest(bytes));
        let dir = layout.join("blobs/sha256");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(&hex), bytes).expect("write blob");
        serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    fn layer(files: &[(&str, Option<&[u8]>)], gzip: bool) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match content {
                Some(bytes) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(bytes.len() as u64);
                    header.set_mode(0o644);
                    builder
                        .append_data(&mut header, path, *bytes)
                        .expect("append");
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder
                        .append_data(&mut header, path, std::io::empty())
                        .expect("append dir");
                }
            }
        }
        let tar = builder.into_inner().expect("tar");
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &tar).expect("gzip");
            gz.finish().expect("gzip")
        } else {
            tar
        }
    }

    fn layout(dir: &Path) -> PathBuf {
        let layout = dir.join("layout");
        std::fs::create_dir_all(&layout).expect("mkdir");
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("write");
        let lower = layer(
            &[
                ("etc", None),
                ("etc/keep", Some(b"kept")),
                ("etc/gone", Some(b"removed by a whiteout")),
                ("data", None),
                ("data/old", Some(b"hidden by an opaque whiteout")),
            ],
            true,
        );
        let upper = layer(
            &[
                ("etc/.wh.gone", Some(b"")),
                ("data/.wh..wh..opq", Some(b"")),
                ("data/new", Some(b"from the upper layer")),
            ],
            false,
        );
        let l1 = blob(
            &layout,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &lower,
        );
        let l2 = blob(&layout, "application/vnd.oci.image.layer.v1.tar", &upper);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"], "Env": ["A=1"]},
            "rootfs": {"type": "layers", "diff_ids": []}
        });
        let c = blob(
            &layout,
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).expect("json"),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": c, "layers": [l1, l2]
        });
        let m = blob(
            &layout,
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).expect("json"),
        );
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [m]});
        std::fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("write");
        layout
    }

    #[test]
    fn layers_unpack_in_order_with_whiteouts_and_the_config_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = layout(dir.path());
        let store = ImageStore::new(dir.path().join("store"));
        let image = store.import(&source).expect("imports");
        let root = &image.rootfs;
        assert_eq!(std::fs::read(root.join("etc/keep")).expect("kept"), b"kept");
        assert!(!root.join("etc/gone").exists(), "whiteout applied");
        assert!(!root.join("data/old").exists(), "opaque whiteout applied");
        assert_eq!(
            std::fs::read(root.join("data/new")).expect("new"),
            b"from the upper layer"
        );
        assert!(!root.join("etc/.wh.gone").exists());
        assert_eq!(image.config.entrypoint, vec!["/bin/sh"]);
        assert_eq!(image.config.cmd, vec!["-c", "echo hi"]);
        assert_eq!(image.config.env, vec!["A=1"]);
        // Content-addressed: the same image imports to the same digest, found by digest.
        assert_eq!(store.import(&source).expect("again").digest, image.digest);
        assert_eq!(store.get(&image.digest), Some(image));
    }

    #[test]
    fn a_tampered_blob_or_a_non_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = layout(dir.path());
        let store = ImageStore::new(dir.path().join("store"));
        // Corrupt the first layer (the largest blob is the gzip layer; pick any layer file).
        let blobs: Vec<PathBuf> = std::fs::read_dir(source.join("blobs/sha256"))
            .expect("blobs")
            .flatten()
            .map(|e| e.path())
            .collect();
        let index = std::fs::read_to_string(source.join("index.json")).expect("index");
        for path in &blobs {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !index.contains(name) {
                let mut bytes = std::fs::read(path).expect("read");
                bytes.push(b'x');
                std::fs::write(path, bytes).expect("write");
                break;
            }
        }
        let err = store.import(&source).expect_err("tampered");
        assert!(err.contains("does not match its digest"), "{err}");
        let err = store.import(dir.path()).expect_err("not a layout");
        assert!(err.contains("has no `oci-layout` file"), "{err}");
    }
}
