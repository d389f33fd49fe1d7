//! Offline import of OCI images: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) or a tarball of one, unpacked into a content-addressed store.
//!
//! Nothing in an image is trusted. The layout is read through [`blob`](super::blob): regular
//! files only, never blocking, with size bounds, every blob checked against its descriptor's
//! size and sha256. Layers are applied by [`layer`](super::layer) inside a directory handle
//! that no path can leave, with whiteouts, within the [`ImageLimits`]. Everything happens in
//! a private scratch directory of the store (`.import-*`, and `.layout-*` for a tarball's
//! layout); only a complete, checked image is renamed to `<store>/<manifest digest>/` (its
//! `rootfs/` and `image.json`), so a refused or interrupted import changes nothing in the
//! store, and [`ImageStore::remove_scratch`] clears what a killed agent left. Images no
//! deployment uses are removed by [`ImageStore::remove_unused`].

use std::collections::BTreeSet;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use super::blob::{BlobError, Layout, hex_of, open_source};
use super::layer::{Kind, Refused, Unpacker};
use super::limits::ImageLimits;

/// Most layers one image may have (Docker's own limit is 127).
pub const MAX_LAYERS: usize = 128;
/// How deep image indexes may nest (an index naming an index naming a manifest).
const MAX_INDEX_DEPTH: usize = 2;
/// Prefix of the store's scratch directories: anything starting with a dot is scratch.
const SCRATCH_PREFIX: &str = ".";

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

/// Why an image was not imported, naming the file, blob, layer or entry to blame.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image given (a directory or a tarball) cannot be used.
    #[error("image {path:?}: {reason}")]
    Source {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        reason: BlobError,
    },
    /// The layout's structure is wrong (`oci-layout`, `index.json`, manifests).
    #[error("image layout: {0}")]
    Layout(String),
    /// The layout has no usable `oci-layout` file.
    #[error("image layout: not an OCI image layout: no usable `oci-layout` file ({0})")]
    NoMarker(#[source] BlobError),
    /// `oci-layout` is not JSON.
    #[error("image layout: `oci-layout` is not JSON: {0}")]
    MarkerJson(#[source] serde_json::Error),
    /// `index.json` cannot be read.
    #[error("image layout: cannot read index.json: {0}")]
    IndexRead(#[source] BlobError),
    /// `index.json` is not an image index.
    #[error("image layout: index.json: {0}")]
    IndexJson(#[source] oci_spec::OciSpecError),
    /// The index names a manifest by a digest this store does not take.
    #[error("image layout: {0}")]
    ManifestDigest(#[source] BlobError),
    /// A blob is missing, of the wrong type or size, or does not match its digest.
    #[error("blob {digest}: {reason}")]
    Blob {
        /// The blob's digest (`sha256:...`).
        digest: String,
        /// What is wrong with it.
        #[source]
        reason: BlobError,
    },
    /// A layer, or one entry of it, was refused.
    #[error("layer {digest}{}: {reason}", entry.as_ref().map(|e| format!(" entry {e}")).unwrap_or_default())]
    Layer {
        /// The layer's digest (`sha256:...`).
        digest: String,
        /// The entry's name, quoted, when one entry is to blame.
        entry: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// An entry of an image layout tarball was refused.
    #[error("image tarball {path:?}{}: {reason}", entry.as_ref().map(|e| format!(" entry {e}")).unwrap_or_default())]
    Tarball {
        /// The tarball.
        path: PathBuf,
        /// The entry's name, quoted, when one entry is to blame.
        entry: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The store itself could not be written.
    #[error("image store {path:?}: {source}")]
    Store {
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The content-addressed image store under the agent's state directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    limits: ImageLimits,
}

impl ImageStore {
    /// A store in `dir` (created on first import) with the default [`ImageLimits`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ImageStore {
            dir: dir.into(),
            limits: ImageLimits::default(),
        }
    }

    /// The same store with other bounds.
    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image stored under `digest` (hex), if it is complete.
    pub fn get(&self, digest: &str) -> Option<ImportedImage> {
        if !is_digest(digest) {
            return None;
        }
        let dir = self.dir.join(digest);
        let top = Dir::open_ambient_dir(&dir, cap_std::ambient_authority()).ok()?;
        let (file, _) = super::blob::open_regular(&top, Path::new("image.json")).ok()?;
        let config: ImageConfig =
            serde_json::from_reader(file.take(super::blob::MAX_JSON_BYTES)).ok()?;
        Some(ImportedImage {
            digest: digest.to_string(),
            rootfs: dir.join("rootfs"),
            config,
        })
    }

    /// Digests (hex) of the complete images in the store.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut out = Vec::new();
        for name in self.names()? {
            if is_digest(&name) && self.get(&name).is_some() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes every image whose digest (hex, or `sha256:` and hex) is not in `in_use`, and
    /// returns the digests removed. Run it where no import is under way whose image is not yet
    /// recorded as in use (after a deployment is committed, for example). An image is first
    /// renamed to a scratch name, so it is never found half-removed; a removal cut short is
    /// finished by [`remove_scratch`](Self::remove_scratch).
    pub fn remove_unused(&self, in_use: &BTreeSet<String>) -> Result<Vec<String>, ImageError> {
        let keep: BTreeSet<&str> = in_use
            .iter()
            .map(|d| d.strip_prefix("sha256:").unwrap_or(d))
            .collect();
        let mut removed = Vec::new();
        for name in self.names()? {
            if !is_digest(&name) || keep.contains(name.as_str()) {
                continue;
            }
            let from = self.dir.join(&name);
            let to = self.dir.join(format!("{SCRATCH_PREFIX}gc-{name}"));
            std::fs::rename(&from, &to).map_err(|source| self.store_err(&from, source))?;
            std::fs::remove_dir_all(&to).map_err(|source| self.store_err(&to, source))?;
            removed.push(name);
        }
        removed.sort();
        Ok(removed)
    }

    /// Removes the scratch directories an import or a removal left behind when the agent was
    /// killed (every entry of the store whose name starts with a dot). Call it at start, before
    /// any import.
    pub fn remove_scratch(&self) -> Result<Vec<PathBuf>, ImageError> {
        let mut removed = Vec::new();
        for name in self.names()? {
            if !name.starts_with(SCRATCH_PREFIX) {
                continue;
            }
            let path = self.dir.join(&name);
            // `remove_dir_all` never follows a symlink found inside.
            let result = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) => Err(e),
            };
            result.map_err(|source| self.store_err(&path, source))?;
            removed.push(path);
        }
        Ok(removed)
    }

    /// Imports an OCI image layout directory or tarball (plain or gzip). Blocking: call it
    /// off the async workers. An image already in the store is not unpacked again.
    pub fn import(&self, source: &Path) -> Result<ImportedImage, ImageError> {
        let refuse = |reason: BlobError| ImageError::Source {
            path: source.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(source).map_err(|e| refuse(BlobError::Read(e)))?;
        self.create()?;
        if meta.is_dir() {
            let layout = Layout::open(source).map_err(|e| refuse(BlobError::OpenSourceDir(e)))?;
            return self.import_layout(&layout);
        }
        // A tarball: unpack the layout into a scratch directory of the store first.
        let file = open_source(source).map_err(refuse)?;
        let scratch = self.scratch("layout-")?;
        let root = Dir::open_ambient_dir(scratch.path(), cap_std::ambient_authority())
            .map_err(|source| self.store_err(scratch.path(), source))?;
        let tarball_err = |refused: Refused| ImageError::Tarball {
            path: source.to_path_buf(),
            entry: refused.entry,
            reason: refused.reason,
        };
        let mut unpacker = Unpacker::new(&root, &self.limits, Kind::LayoutTarball);
        unpacker
            .apply(decompressed(file).map_err(|reason| {
                tarball_err(Refused {
                    entry: None,
                    reason,
                })
            })?)
            .map_err(tarball_err)?;
        let layout = Layout::open(scratch.path())
            .map_err(|source| self.store_err(scratch.path(), source))?;
        self.import_layout(&layout)
    }

    fn import_layout(&self, layout: &Layout) -> Result<ImportedImage, ImageError> {
        let marker = layout
            .read_top("oci-layout")
            .map_err(ImageError::NoMarker)?;
        let marker: serde_json::Value =
            serde_json::from_slice(&marker).map_err(ImageError::MarkerJson)?;
        if marker["imageLayoutVersion"] != "1.0.0" {
            return Err(ImageError::Layout(format!(
                "unsupported OCI layout version {} (expected \"1.0.0\")",
                marker["imageLayoutVersion"]
            )));
        }
        let index = layout
            .read_top("index.json")
            .map_err(ImageError::IndexRead)?;
        let index = ImageIndex::from_reader(&index[..]).map_err(ImageError::IndexJson)?;
        let manifest_desc = pick_manifest(layout, index.manifests(), 0)?;
        let digest = hex_of(&manifest_desc).map_err(ImageError::ManifestDigest)?;
        if let Some(image) = self.get(&digest) {
            return Ok(image);
        }
        let manifest_bytes = read_blob(layout, &manifest_desc)?;
        let manifest =
            ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| ImageError::Blob {
                digest: manifest_desc.digest().to_string(),
                reason: BlobError::NotManifest(e),
            })?;
        let config_bytes = read_blob(layout, manifest.config())?;
        let configuration =
            ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| ImageError::Blob {
                digest: manifest.config().digest().to_string(),
                reason: BlobError::NotConfiguration(e),
            })?;
        let config = configuration
            .config()
            .as_ref()
            .map(|c| ImageConfig {
                entrypoint: c.entrypoint().clone().unwrap_or_default(),
                cmd: c.cmd().clone().unwrap_or_default(),
                env: c.env().clone().unwrap_or_default(),
            })
            .unwrap_or_default();
        if manifest.layers().len() > MAX_LAYERS {
            return Err(ImageError::Layout(format!(
                "manifest sha256:{digest} has {} layers, over the bound of {MAX_LAYERS}",
                manifest.layers().len()
            )));
        }

        let work = self.scratch("import-")?;
        let rootfs = work.path().join("rootfs");
        std::fs::create_dir(&rootfs).map_err(|source| self.store_err(&rootfs, source))?;
        let root = Dir::open_ambient_dir(&rootfs, cap_std::ambient_authority())
            .map_err(|source| self.store_err(&rootfs, source))?;
        let mut unpacker = Unpacker::new(&root, &self.limits, Kind::Layer);
        for layer in manifest.layers() {
            self.apply_layer(layout, layer, &mut unpacker)?;
        }
        unpacker.finish().map_err(|refused| {
            ImageError::Layout(format!(
                "directory {}: {}",
                refused.entry.unwrap_or_default(),
                refused.reason
            ))
        })?;
        let json = serde_json::to_vec_pretty(&config).expect("an image config serialises");
        let config_path = work.path().join("image.json");
        std::fs::write(&config_path, json)
            .map_err(|source| self.store_err(&config_path, source))?;

        let work = work.keep();
        let target = self.dir.join(&digest);
        if let Err(err) = std::fs::rename(&work, &target) {
            let _ = std::fs::remove_dir_all(&work);
            // Another import of the same image may have won the race.
            if self.get(&digest).is_none() {
                return Err(self.store_err(&target, err));
            }
        }
        self.get(&digest).ok_or_else(|| {
            self.store_err(
                &target,
                std::io::Error::other("the image vanished from the store"),
            )
        })
    }

    /// Checks a layer blob and applies it: whiteouts first (after every entry is checked),
    /// then its entries.
    fn apply_layer(
        &self,
        layout: &Layout,
        desc: &Descriptor,
        unpacker: &mut Unpacker<'_>,
    ) -> Result<(), ImageError> {
        let digest = desc.digest().to_string();
        let media = desc.media_type().to_string();
        let refuse = |refused: Refused| ImageError::Layer {
            digest: digest.clone(),
            entry: refused.entry,
            reason: refused.reason,
        };
        if media.contains("zstd") {
            return Err(refuse(Refused {
                entry: None,
                reason: format!(
                    "zstd-compressed layers ({media}) are not supported; use tar or tar+gzip"
                ),
            }));
        }
        // A compressed layer is at most as large as the bytes it may unpack to, give or take
        // the tar and gzip framing.
        let max_blob = self.limits.max_unpacked_bytes.saturating_add(1 << 20);
        let mut file = layout
            .open_layer(desc, max_blob)
            .map_err(|reason| ImageError::Blob {
                digest: digest.clone(),
                reason,
            })?;
        let archive_err = |reason: String| {
            refuse(Refused {
                entry: None,
                reason,
            })
        };
        let reader = decompressed(file.try_clone().map_err(|e| archive_err(e.to_string()))?)
            .map_err(archive_err)?;
        unpacker.check_and_whiteout(reader).map_err(refuse)?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| archive_err(e.to_string()))?;
        unpacker
            .apply(decompressed(file).map_err(archive_err)?)
            .map_err(refuse)
    }

    fn create(&self) -> Result<(), ImageError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| self.store_err(&self.dir, source))
    }

    /// A private scratch directory (0700) in the store.
    fn scratch(&self, kind: &str) -> Result<tempfile::TempDir, ImageError> {
        tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{kind}"))
            .tempdir_in(&self.dir)
            .map_err(|source| self.store_err(&self.dir, source))
    }

    /// Names of the store's entries (none if the store does not exist yet).
    fn names(&self) -> Result<Vec<String>, ImageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(self.store_err(&self.dir, source)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| self.store_err(&self.dir, source))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn store_err(&self, path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Store {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn read_blob(layout: &Layout, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    layout.read_blob(desc).map_err(|reason| ImageError::Blob {
        digest: desc.digest().to_string(),
        reason,
    })
}

/// The image manifest for this host: the one whose platform matches, else the only one.
fn pick_manifest(
    layout: &Layout,
    list: &[Descriptor],
    depth: usize,
) -> Result<Descriptor, ImageError> {
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
        [] => return Err(ImageError::Layout("the index lists no manifest".into())),
        [only] => only.clone(),
        many => many.iter().find(fits).cloned().ok_or_else(|| {
            ImageError::Layout(format!(
                "the index has {} manifests, none for linux/{arch}",
                many.len()
            ))
        })?,
    };
    if chosen
        .media_type()
        .to_string()
        .ends_with("image.index.v1+json")
    {
        if depth >= MAX_INDEX_DEPTH {
            return Err(ImageError::Layout(format!(
                "image indexes nest deeper than {MAX_INDEX_DEPTH}"
            )));
        }
        let nested = read_blob(layout, &chosen)?;
        let index = ImageIndex::from_reader(&nested[..]).map_err(|e| ImageError::Blob {
            digest: chosen.digest().to_string(),
            reason: BlobError::NotIndex(e),
        })?;
        return pick_manifest(layout, index.manifests(), depth + 1);
    }
    Ok(chosen)
}

/// A reader of `file`, gunzipped if it starts with the gzip magic; zstd is named and refused.
fn decompressed(mut file: std::fs::File) -> Result<Box<dyn Read>, String> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match file.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("cannot read it: {e}")),
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(
            file,
        ))))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Err("it is zstd-compressed, which is not supported; use tar or tar+gzip".into())
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

#[cfg(test)]
mod tests;
