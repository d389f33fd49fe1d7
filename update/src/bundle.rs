//! Update bundles: a root slot image with a signed manifest, in one tar file.
//!
//! ```text
//! manifest.json   {"format": "lichen-update-v1", "version": "2", "target": "x86_64",
//!                  "image": {"size": 31457280, "sha256": "<hex>", "fs": "squashfs"}}
//! manifest.sig    {"key-id": "<16 hex>", "signature": "<base64 ed25519 signature>"}
//! rootfs.img      the image, `size` bytes
//! ```
//!
//! in that order. The signature covers `lichen-update-v1\n` followed by the exact bytes of
//! `manifest.json`; the manifest names the image by size and sha256, so one signature covers
//! everything. [`open_verified`] checks, before anything is written: the members and their
//! order, the signature (through a [`Verifier`]: the node's trusted keys), the manifest's
//! fields, the target, that the file really holds `size` bytes of image, and the image's
//! sha256 (read once in full). Only then may a slot be written ([`crate::writer`]), and the
//! slot writer hashes again as it writes and once more reading back.
//!
//! The signing and verifying code is not here: the agent passes its own (the same ed25519
//! keys and formats as its deployments) through [`Signer`] and [`Verifier`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::slot::{is_sha256_hex, valid_name};

/// `format` of the manifests this crate reads and writes.
pub const FORMAT: &str = "lichen-update-v1";
/// Domain separation of the signed bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"lichen-update-v1\n";
/// Largest `manifest.json`.
pub const MAX_MANIFEST: u64 = 64 * 1024;
/// Largest `manifest.sig`.
pub const MAX_SIGNATURE: u64 = 4 * 1024;
/// Largest root image a bundle may carry (a slot is also checked for room).
pub const MAX_IMAGE: u64 = 16 << 30;
/// The file system a slot image must be.
pub const IMAGE_FS: &str = "squashfs";
/// Member names, in order.
pub const MEMBERS: [&str; 3] = ["manifest.json", "manifest.sig", "rootfs.img"];

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The system version the image holds.
    pub version: String,
    /// The target it is for (`update.target` of the nodes that take it).
    pub target: String,
    /// The image.
    pub image: ImageInfo,
}

/// The image a manifest names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, 64 lowercase hex digits.
    pub sha256: String,
    /// Its file system ([`IMAGE_FS`]).
    pub fs: String,
}

/// `manifest.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSignature {
    /// Id of the signing key (as deployments name keys).
    #[serde(rename = "key-id", default)]
    pub key_id: Option<String>,
    /// The signature, base64.
    pub signature: String,
}

/// Why a [`Verifier`] refuses a signature or a [`Signer`] cannot sign: the implementation's
/// own error type (the node's trusted keys live in the agent, not here).
pub type SignatureError = Box<dyn std::error::Error + Send + Sync>;

/// Checks a bundle's signature: the node's trusted keys.
pub trait Verifier {
    /// Checks `signature` over `message`; returns the id of the trusted key that made it, or
    /// why it is not acceptable.
    fn verify(&self, message: &[u8], signature: &BundleSignature)
    -> Result<String, SignatureError>;
}

/// Signs a bundle's manifest: the operator's publisher key.
pub trait Signer {
    /// Signs `message`.
    fn sign(&self, message: &[u8]) -> Result<BundleSignature, SignatureError>;
}

/// The bytes a signature covers.
pub fn signed_message(manifest_json: &[u8]) -> Vec<u8> {
    let mut message = SIGNATURE_CONTEXT.to_vec();
    message.extend_from_slice(manifest_json);
    message
}

/// What is wrong with a bundle. Each says which part and why; none has changed anything.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file cannot be read.
    #[error("cannot read bundle {path}: {source}")]
    Io {
        /// The bundle.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A FIFO, a device or a directory.
    #[error("bundle {path} is not a readable tar file: it is not a regular file")]
    NotRegularFile {
        /// The bundle.
        path: PathBuf,
    },
    /// Not a tar file, or a damaged one.
    #[error("bundle {path} is not a readable tar file: {source}")]
    NotTar {
        /// The bundle.
        path: PathBuf,
        /// What the tar reader says.
        source: std::io::Error,
    },
    /// A member's header is damaged.
    #[error("bundle {path} is not a readable tar file: member {index}: {source}")]
    NotTarMember {
        /// The bundle.
        path: PathBuf,
        /// 1-based position.
        index: usize,
        /// What the tar reader says.
        source: std::io::Error,
    },
    /// The members are not the three expected, in order.
    #[error("bundle {path}: member {index} is {found}, expected {expected}")]
    Members {
        /// The bundle.
        path: PathBuf,
        /// 1-based position.
        index: usize,
        /// What was found (or "the end of the file").
        found: String,
        /// What was expected.
        expected: &'static str,
    },
    /// No signature.
    #[error(
        "bundle {path} is unsigned (it has no manifest.sig): this node takes only bundles signed by a trusted key"
    )]
    Unsigned {
        /// The bundle.
        path: PathBuf,
    },
    /// `manifest.sig` is not a signature record.
    #[error("bundle {path}: manifest.sig is not a signature record: {source}")]
    SignatureRecord {
        /// The bundle.
        path: PathBuf,
        /// What the JSON reader says.
        source: serde_json::Error,
    },
    /// The signature does not verify.
    #[error("bundle {path}: {reason}")]
    BadSignature {
        /// The bundle.
        path: PathBuf,
        /// Why (from the verifier).
        #[source]
        reason: SignatureError,
    },
    /// A member is larger than its bound.
    #[error("bundle {path}: {member} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The bundle.
        path: PathBuf,
        /// The member.
        member: &'static str,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// The manifest is not a JSON document of the manifest's shape.
    #[error("bundle {path}: manifest field (document): {source}")]
    Document {
        /// The bundle.
        path: PathBuf,
        /// What the JSON reader says.
        source: serde_json::Error,
    },
    /// A manifest field is missing or invalid.
    #[error("bundle {path}: manifest field {field}: {reason}")]
    Field {
        /// The bundle.
        path: PathBuf,
        /// The field (`version`, `image.sha256`, ...).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Built for another target.
    #[error("bundle {path} is for target {bundle:?}; this node is {node:?} (update.target)")]
    WrongTarget {
        /// The bundle.
        path: PathBuf,
        /// The bundle's target.
        bundle: String,
        /// The node's.
        node: String,
    },
    /// The file ends before the image does.
    #[error(
        "bundle {path} is truncated: rootfs.img should hold {expected} bytes, the file has {available}"
    )]
    Truncated {
        /// The bundle.
        path: PathBuf,
        /// Bytes the manifest names.
        expected: u64,
        /// Bytes there.
        available: u64,
    },
    /// The image is not what the manifest signed.
    #[error(
        "bundle {path}: rootfs.img has sha256 {found}, the signed manifest says {expected} (damaged or tampered)"
    )]
    ImageHash {
        /// The bundle.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        found: String,
    },
    /// Signing failed (making a bundle).
    #[error("cannot sign the bundle: {0}")]
    Sign(#[source] SignatureError),
}

/// A bundle whose manifest, signature, target and image have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    /// The bundle file.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The trusted key that signed it.
    pub signer: String,
    /// Where the image's bytes start in the file.
    image_offset: u64,
}

impl VerifiedBundle {
    /// A reader of exactly the image's bytes (the slot writer hashes them again).
    pub fn image(&self) -> Result<impl Read + use<>, BundleError> {
        let io = |source| BundleError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.image_offset)).map_err(io)?;
        Ok(file.take(self.manifest.image.size))
    }
}

/// Reads and checks a bundle for a node of `target` (see the module docs). Reads at most
/// the bounded manifest and signature into memory; the image is streamed.
pub fn open_verified(
    path: &Path,
    target: &str,
    verifier: &dyn Verifier,
) -> Result<VerifiedBundle, BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(BundleError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    let file_len = meta.len();
    let not_tar = |source| BundleError::NotTar {
        path: path.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(file);
    let mut entries = archive.entries().map_err(not_tar)?;
    let mut next = |index: usize| -> Result<Option<tar::Entry<'_, File>>, BundleError> {
        match entries.next() {
            None => Ok(None),
            Some(Err(source)) => Err(BundleError::NotTarMember {
                path: path.to_path_buf(),
                index,
                source,
            }),
            Some(Ok(entry)) => Ok(Some(entry)),
        }
    };
    let name_of = |entry: &tar::Entry<'_, File>| -> String {
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "a member with an unreadable name".into());
        name.trim_start_matches("./").chars().take(100).collect()
    };
    let members_error =
        |index: usize, found: String, expected: &'static str| BundleError::Members {
            path: path.to_path_buf(),
            index,
            found,
            expected,
        };

    // 1. manifest.json, bounded.
    let Some(mut entry) = next(1)? else {
        return Err(members_error(1, "the end of the file".into(), MEMBERS[0]));
    };
    let name = name_of(&entry);
    if name != MEMBERS[0] || !entry.header().entry_type().is_file() {
        return Err(members_error(1, format!("{name:?}"), MEMBERS[0]));
    }
    let manifest_bytes = read_member(&mut entry, path, "manifest.json", MAX_MANIFEST)?;

    // 2. manifest.sig, bounded; its absence is an unsigned bundle.
    let Some(mut entry) = next(2)? else {
        return Err(BundleError::Unsigned {
            path: path.to_path_buf(),
        });
    };
    let name = name_of(&entry);
    if name == MEMBERS[2] {
        return Err(BundleError::Unsigned {
            path: path.to_path_buf(),
        });
    }
    if name != MEMBERS[1] || !entry.header().entry_type().is_file() {
        return Err(members_error(2, format!("{name:?}"), MEMBERS[1]));
    }
    let sig_bytes = read_member(&mut entry, path, "manifest.sig", MAX_SIGNATURE)?;
    let signature: BundleSignature =
        serde_json::from_slice(&sig_bytes).map_err(|source| BundleError::SignatureRecord {
            path: path.to_path_buf(),
            source,
        })?;
    let signer = verifier
        .verify(&signed_message(&manifest_bytes), &signature)
        .map_err(|reason| BundleError::BadSignature {
            path: path.to_path_buf(),
            reason,
        })?;

    // The manifest is signed: now its fields.
    let manifest = parse_manifest(path, &manifest_bytes)?;
    if manifest.target != target {
        return Err(BundleError::WrongTarget {
            path: path.to_path_buf(),
            bundle: manifest.target,
            node: target.to_string(),
        });
    }

    // 3. rootfs.img: the size the manifest names, all of it in the file.
    let Some(entry) = next(3)? else {
        return Err(members_error(3, "the end of the file".into(), MEMBERS[2]));
    };
    let name = name_of(&entry);
    if name != MEMBERS[2] || !entry.header().entry_type().is_file() {
        return Err(members_error(3, format!("{name:?}"), MEMBERS[2]));
    }
    let declared = entry.header().size().map_err(not_tar)?;
    if declared != manifest.image.size {
        return Err(BundleError::Field {
            path: path.to_path_buf(),
            field: "image.size",
            reason: format!(
                "the manifest says {} bytes, the rootfs.img member holds {declared}",
                manifest.image.size
            ),
        });
    }
    let image_offset = entry.raw_file_position();
    let available = file_len.saturating_sub(image_offset);
    if available < manifest.image.size {
        return Err(BundleError::Truncated {
            path: path.to_path_buf(),
            expected: manifest.image.size,
            available,
        });
    }
    drop(entry);
    if let Some(extra) = next(4)? {
        return Err(members_error(
            4,
            format!("{:?}", name_of(&extra)),
            "the end of the file",
        ));
    }

    let bundle = VerifiedBundle {
        path: path.to_path_buf(),
        manifest,
        signer,
        image_offset,
    };
    // The image in full, before anything is written.
    let mut hasher = Sha256::new();
    let mut image = bundle.image()?;
    let copied = std::io::copy(&mut image, &mut HashWriter(&mut hasher)).map_err(io)?;
    if copied != bundle.manifest.image.size {
        return Err(BundleError::Truncated {
            path: path.to_path_buf(),
            expected: bundle.manifest.image.size,
            available: copied,
        });
    }
    let found = hex::encode(hasher.finalize());
    if found != bundle.manifest.image.sha256 {
        return Err(BundleError::ImageHash {
            path: path.to_path_buf(),
            expected: bundle.manifest.image.sha256.clone(),
            found,
        });
    }
    Ok(bundle)
}

fn read_member(
    entry: &mut tar::Entry<'_, File>,
    path: &Path,
    member: &'static str,
    max: u64,
) -> Result<Vec<u8>, BundleError> {
    let size = entry.header().size().unwrap_or(u64::MAX);
    if size > max {
        return Err(BundleError::TooLarge {
            path: path.to_path_buf(),
            member,
            size,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .take(max)
        .read_to_end(&mut bytes)
        .map_err(|source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if (bytes.len() as u64) < size {
        return Err(BundleError::Truncated {
            path: path.to_path_buf(),
            expected: size,
            available: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Parses and checks a manifest's fields.
pub fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, BundleError> {
    let field = |field, reason: String| BundleError::Field {
        path: path.to_path_buf(),
        field,
        reason,
    };
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|source| BundleError::Document {
            path: path.to_path_buf(),
            source,
        })?;
    if manifest.format != FORMAT {
        return Err(field(
            "format",
            format!("{:?}; this node reads {FORMAT:?}", manifest.format),
        ));
    }
    if !valid_name(&manifest.version) {
        return Err(field(
            "version",
            format!(
                "{:?} is not 1-64 letters, digits and . _ + -",
                manifest.version
            ),
        ));
    }
    if !valid_name(&manifest.target) {
        return Err(field(
            "target",
            format!(
                "{:?} is not 1-64 letters, digits and . _ + -",
                manifest.target
            ),
        ));
    }
    if manifest.image.size == 0 || manifest.image.size > MAX_IMAGE {
        return Err(field(
            "image.size",
            format!(
                "{} bytes; an image is 1 byte to {MAX_IMAGE}",
                manifest.image.size
            ),
        ));
    }
    if !is_sha256_hex(&manifest.image.sha256) {
        return Err(field(
            "image.sha256",
            "not 64 lowercase hex digits".to_string(),
        ));
    }
    if manifest.image.fs != IMAGE_FS {
        return Err(field(
            "image.fs",
            format!("{:?}; a slot holds {IMAGE_FS:?}", manifest.image.fs),
        ));
    }
    Ok(manifest)
}

/// Feeds written bytes to a hasher.
pub(crate) struct HashWriter<'a>(pub(crate) &'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

mod write;

pub use write::write_bundle;

#[cfg(test)]
pub(crate) mod tests;
