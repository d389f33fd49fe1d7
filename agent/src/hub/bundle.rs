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
//!
//! A bundle is hostile input until its signature verifies, and its artifacts until their
//! digests do. [`Bundle`] reads `bundle.json` alone first (at most [`MAX_INDEX`] bytes), so the
//! caller checks the signature before any artifact is touched; then it streams each artifact
//! member, one at a time, through the caller's check. Every member is opened without following
//! symbolic links and without blocking, and only if it is a regular file: a FIFO, a device, a
//! link or a name outside the bundle (`..`, absolute) is refused naming the member. Sizes are
//! checked against their bound ([`Limits`]) before a byte is read. A tar bundle holds only
//! plain ustar/GNU headers (no extension headers, which the tar reader would read whole), with
//! `bundle.json` before the artifacts.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::DesiredState;

/// The `format` of a bundle this agent reads and writes.
pub const FORMAT: &str = "lichen-bundle-v1";
/// Largest `bundle.json` read, in bytes: the largest desired-state message the node takes from
/// the hub (1 MiB), which is what `bundle.json` carries.
pub const MAX_INDEX: u64 = 1 << 20;
/// Largest artifact member read, in bytes: the largest artifact the node fetches from the hub.
pub const MAX_ARTIFACT: u64 = lichen_sync::MAX_ARTIFACT_SIZE;
/// The index's name.
const INDEX: &str = "bundle.json";
/// The artifacts' directory.
const ARTIFACTS: &str = "artifacts";

/// The artifacts a bundle may hold: each digest the signed deployment names, with the size the
/// signed desired state gives it, if it gives one (else up to [`Limits::artifact`]).
pub type Expected = BTreeMap<String, Option<u64>>;

/// The size bounds a bundle is read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `bundle.json`, in bytes.
    pub index: u64,
    /// Largest artifact member, in bytes.
    pub artifact: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            index: MAX_INDEX,
            artifact: MAX_ARTIFACT,
        }
    }
}

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

/// An opened bundle, directory or tar file; nothing in it read yet.
pub struct Bundle {
    path: PathBuf,
    source: Source,
    limits: Limits,
}

enum Source {
    Dir(OwnedFd),
    Tar(File),
}

/// A member of a tar bundle, by its name.
#[derive(Debug, PartialEq, Eq)]
enum Member {
    /// `.` or `artifacts`, as a directory entry: carries nothing.
    Dir(&'static str),
    Index,
    Artifact(String),
}

impl Bundle {
    /// Opens a bundle directory or tar file (a symbolic link to one is followed: the operator
    /// named it). Anything else (a FIFO, a device) is refused without being opened.
    pub fn open(path: &Path, limits: Limits) -> Result<Self> {
        let what = format!("bundle {}", path.display());
        let (fd, kind) = open_checked(rustix::fs::CWD, path, true, &what)?;
        let source = match kind {
            Kind::Dir => Source::Dir(fd),
            Kind::File => Source::Tar(File::from(fd)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            source,
            limits,
        })
    }

    /// The bundle's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and parses `bundle.json`, and nothing else.
    pub fn index(&self) -> Result<BundleIndex> {
        let bytes = match &self.source {
            Source::Dir(root) => {
                let (fd, size) = open_member(root.as_fd(), INDEX, INDEX)
                    .with_context(|| format!("bundle {}", self.path.display()))?;
                self.check_size(INDEX, size, self.limits.index)?;
                read_bounded(File::from(fd), self.limits.index, INDEX)
                    .with_context(|| format!("bundle {}", self.path.display()))?
            }
            Source::Tar(file) => self.tar_index(file)?,
        };
        let index: BundleIndex = serde_json::from_slice(&bytes)
            .with_context(|| format!("bundle {}: {INDEX} is malformed", self.path.display()))?;
        if index.format != FORMAT {
            bail!(
                "bundle {} has format {:?}; this agent reads {FORMAT:?}",
                self.path.display(),
                index.format
            );
        }
        Ok(index)
    }

    /// Streams every artifact member to `visit` (its digest name, a reader of exactly its
    /// bytes, its size), one at a time. Each must be named `artifacts/<sha256>` with a digest in
    /// `expected`, at most once, and be a regular file of the size `expected` gives it (within
    /// [`Limits::artifact`] where it gives none); the first that is not stops the walk with an
    /// error naming it, before its content is read. Returns the digests visited.
    pub fn artifacts(
        &self,
        expected: &Expected,
        mut visit: impl FnMut(&str, &mut dyn Read, u64) -> Result<()>,
    ) -> Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        match &self.source {
            Source::Dir(root) => {
                let Some((dir, names)) = self.dir_artifacts(root.as_fd(), expected)? else {
                    return Ok(seen);
                };
                for name in names {
                    let member = format!("{ARTIFACTS}/{name}");
                    let (fd, size) = open_member(dir.as_fd(), &name, &member)
                        .with_context(|| format!("bundle {}", self.path.display()))?;
                    self.check_artifact_size(&member, size, expected.get(&name))?;
                    let mut reader = File::from(fd).take(size);
                    visit(&name, &mut reader, size).with_context(|| self.named(&member))?;
                    seen.insert(name);
                }
            }
            Source::Tar(file) => {
                self.walk_tar(file, |member, entry| {
                    let Member::Artifact(name) = member else {
                        return Ok(Walk::Next);
                    };
                    let label = format!("{ARTIFACTS}/{name}");
                    if !expected.contains_key(&name) {
                        bail!("{}", self.not_named(&label));
                    }
                    if !seen.insert(name.clone()) {
                        bail!("{}: member {label} appears twice", self.path.display());
                    }
                    let size = entry.size();
                    self.check_artifact_size(&label, size, expected.get(&name))?;
                    visit(&name, &mut entry.take(size), size)
                        .with_context(|| self.named(&label))?;
                    Ok(Walk::Next)
                })?;
            }
        }
        Ok(seen)
    }

    fn named(&self, member: &str) -> String {
        format!("bundle {}: member {member}", self.path.display())
    }

    fn not_named(&self, member: &str) -> String {
        format!(
            "bundle {}: member {member} is not an artifact the signed deployment names",
            self.path.display()
        )
    }

    /// An artifact member's size against the size the signed desired state gives it, or
    /// against [`Limits::artifact`].
    fn check_artifact_size(
        &self,
        member: &str,
        size: u64,
        signed: Option<&Option<u64>>,
    ) -> Result<()> {
        match signed.copied().flatten() {
            Some(signed) if size != signed => bail!(
                "bundle {}: member {member} is {size} bytes; the signed desired state says {signed}",
                self.path.display()
            ),
            _ => self.check_size(member, size, self.limits.artifact),
        }
    }

    fn check_size(&self, member: &str, size: u64, bound: u64) -> Result<()> {
        if size > bound {
            bail!(
                "bundle {}: member {member} is {size} bytes, more than the bound of {bound} bytes",
                self.path.display()
            );
        }
        Ok(())
    }

    /// The `artifacts/` directory of a bundle directory (`None` if there is none) and the
    /// digests it holds, sorted; refuses a name that is not in `expected` as soon as it is
    /// listed (so a huge directory is not listed whole).
    fn dir_artifacts(
        &self,
        root: BorrowedFd<'_>,
        expected: &Expected,
    ) -> Result<Option<(OwnedFd, Vec<String>)>> {
        let dir = match open_checked(root, ARTIFACTS, false, ARTIFACTS) {
            Ok((fd, Kind::Dir)) => fd,
            Ok((_, Kind::File)) => bail!(
                "bundle {}: {ARTIFACTS} is a regular file, not a directory",
                self.path.display()
            ),
            Err(e) if e.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::NOENT) => {
                return Ok(None);
            }
            Err(e) => return Err(e.context(format!("bundle {}", self.path.display()))),
        };
        let list = |e| {
            anyhow!(
                "bundle {}: cannot list {ARTIFACTS}: {e}",
                self.path.display()
            )
        };
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            let raw = entry.file_name().to_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            let name = String::from_utf8_lossy(raw).into_owned();
            if !expected.contains_key(&name) {
                bail!("{}", self.not_named(&format!("{ARTIFACTS}/{name:?}")));
            }
            names.push(name);
        }
        names.sort();
        Ok(Some((dir, names)))
    }

    fn tar_index(&self, file: &File) -> Result<Vec<u8>> {
        let mut index = None;
        self.walk_tar(file, |member, entry| match member {
            Member::Dir(_) => Ok(Walk::Next),
            Member::Index => {
                self.check_size(INDEX, entry.size(), self.limits.index)?;
                index = Some(read_bounded(entry, self.limits.index, INDEX)?);
                Ok(Walk::Stop)
            }
            Member::Artifact(name) => bail!(
                "bundle {}: member {ARTIFACTS}/{name} comes before {INDEX}; a tar bundle starts with {INDEX} (as `lichen hub bundle` writes it)",
                self.path.display()
            ),
        })?;
        index.with_context(|| format!("bundle {} has no {INDEX}", self.path.display()))
    }

    /// Walks a tar bundle's members from the start, raw (no extension header is read), each
    /// checked by [`classify`] before `each` sees it.
    fn walk_tar(
        &self,
        file: &File,
        mut each: impl FnMut(Member, &mut tar::Entry<'_, &File>) -> Result<Walk>,
    ) -> Result<()> {
        let damaged = |e| {
            anyhow!(
                "bundle {} is not a readable tar file: {e}",
                self.path.display()
            )
        };
        (&*file).rewind().map_err(damaged)?;
        let mut archive = tar::Archive::new(file);
        let mut dirs = BTreeSet::new();
        let mut index = false;
        for entry in archive.entries_with_seek().map_err(damaged)?.raw(true) {
            let mut entry = entry.map_err(damaged)?;
            let member =
                classify(&entry).map_err(|e| anyhow!("bundle {}: {e}", self.path.display()))?;
            match &member {
                Member::Dir(name) if !dirs.insert(*name) => {
                    bail!(
                        "bundle {}: directory {name} appears twice",
                        self.path.display()
                    )
                }
                Member::Index if std::mem::replace(&mut index, true) => {
                    bail!("bundle {}: {INDEX} appears twice", self.path.display())
                }
                _ => {}
            }
            if each(member, &mut entry)? == Walk::Stop {
                break;
            }
        }
        Ok(())
    }
}

#[derive(PartialEq, Eq)]
enum Walk {
    Next,
    Stop,
}

/// A tar member that is not one of a bundle's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum BadMember {
    /// An absolute path or one with `..`.
    #[error("member {name:?} names a path outside the bundle (absolute or with ..)")]
    Outside {
        /// The member's path.
        name: String,
    },
    /// A name a bundle does not hold.
    #[error("unexpected member {name:?} (a bundle holds {INDEX} and {ARTIFACTS}/<sha256>)")]
    Unexpected {
        /// The member's path.
        name: String,
    },
    /// A known name of the wrong type.
    #[error("member {name:?} is {what}, not {wanted}")]
    WrongType {
        /// The member's path.
        name: String,
        /// What it is, in words.
        what: String,
        /// What it should be (`a directory`, `a regular file`).
        wanted: &'static str,
    },
}

/// What a tar member is, by its header: only `.`/`artifacts` directories, `bundle.json` and
/// `artifacts/<sha256>` regular files are members of a bundle.
fn classify(entry: &tar::Entry<'_, &File>) -> Result<Member, BadMember> {
    let raw = entry.path_bytes();
    let name = String::from_utf8_lossy(&raw);
    let kind = entry.header().entry_type();
    if name.starts_with('/') || name.split('/').any(|part| part == "..") {
        return Err(BadMember::Outside {
            name: name.into_owned(),
        });
    }
    let plain = name.strip_prefix("./").unwrap_or(&name);
    let plain = plain.trim_end_matches('/');
    let member = match plain {
        "" | "." => Member::Dir("."),
        ARTIFACTS => Member::Dir(ARTIFACTS),
        INDEX => Member::Index,
        other => match other.strip_prefix("artifacts/") {
            Some(d) if lichen_sync::is_digest(d) => Member::Artifact(d.to_owned()),
            _ => {
                return Err(BadMember::Unexpected {
                    name: name.into_owned(),
                });
            }
        },
    };
    let ok = match member {
        Member::Dir(_) => kind.is_dir(),
        _ => kind.is_file(),
    };
    if !ok {
        let what = match kind.as_byte() {
            b'1' => "a hard link".to_owned(),
            b'2' => format!(
                "a symbolic link (to {:?})",
                entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default()
            ),
            b'3' => "a character device".to_owned(),
            b'4' => "a block device".to_owned(),
            b'5' => "a directory".to_owned(),
            b'6' => "a FIFO".to_owned(),
            b'x' | b'g' | b'L' | b'K' => {
                "an extension header (PAX or GNU long name): write bundles with `lichen hub bundle`, or a plain ustar/GNU tar".to_owned()
            }
            b'S' => "a sparse file".to_owned(),
            b => format!("of tar type {:?}", char::from(b)),
        };
        let wanted = if matches!(member, Member::Dir(_)) {
            "a directory"
        } else {
            "a regular file"
        };
        return Err(BadMember::WrongType {
            name: name.into_owned(),
            what,
            wanted,
        });
    }
    Ok(member)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
}

/// Opens `name` under `at` if it is a regular file or a directory, refusing anything else
/// before opening it (a FIFO would block, a device may act on open) and, unless `follow`, a
/// symbolic link. Non-blocking, and checked again after the open (it may have been swapped).
fn open_checked(
    at: BorrowedFd<'_>,
    name: impl AsRef<Path>,
    follow: bool,
    label: &str,
) -> Result<(OwnedFd, Kind)> {
    let name = name.as_ref();
    let flags = if follow {
        AtFlags::empty()
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    let before = rustix::fs::statat(at, name, flags)
        .map_err(|e| anyhow::Error::new(e).context(format!("{label}: cannot read its metadata")))?;
    let kind = kind_of(at, name, &before, label)?;
    let mut open = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    if !follow {
        open |= OFlags::NOFOLLOW;
    }
    if kind == Kind::Dir {
        open |= OFlags::DIRECTORY;
    }
    let fd = rustix::fs::openat(at, name, open, Mode::empty())
        .map_err(|e| anyhow::Error::new(e).context(format!("{label}: cannot open it")))?;
    let after =
        rustix::fs::fstat(&fd).with_context(|| format!("{label}: cannot read its metadata"))?;
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino)
        || kind_of(at, name, &after, label)? != kind
    {
        bail!("{label} was replaced while it was being opened");
    }
    Ok((fd, kind))
}

fn kind_of(at: BorrowedFd<'_>, name: &Path, stat: &rustix::fs::Stat, label: &str) -> Result<Kind> {
    let what = match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => return Ok(Kind::File),
        FileType::Directory => return Ok(Kind::Dir),
        FileType::Symlink => format!(
            "a symbolic link (to {:?})",
            rustix::fs::readlinkat(at, name, Vec::new())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        FileType::Fifo => "a FIFO".to_owned(),
        FileType::CharacterDevice => "a character device".to_owned(),
        FileType::BlockDevice => "a block device".to_owned(),
        FileType::Socket => "a socket".to_owned(),
        FileType::Unknown => "of an unknown file type".to_owned(),
    };
    bail!("{label} is {what}, not a regular file or directory")
}

/// Opens a member that must be a regular file; returns it and its size.
fn open_member(dir: BorrowedFd<'_>, name: &str, label: &str) -> Result<(OwnedFd, u64)> {
    let (fd, kind) = open_checked(dir, name, false, label)?;
    if kind != Kind::File {
        bail!("{label} is a directory, not a regular file");
    }
    let size = rustix::fs::fstat(&fd)
        .with_context(|| format!("{label}: cannot read its metadata"))?
        .st_size;
    Ok((fd, u64::try_from(size).unwrap_or(0)))
}

/// Reads at most `limit` bytes (more is an error naming `label`).
fn read_bounded(reader: impl Read, limit: u64, label: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {label}"))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > limit {
        bail!("{label} grew past the bound of {limit} bytes while it was read");
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
            header.set_size(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, bytes)
                .with_context(|| format!("writing {name} into {}", out.display()))
        };
        add(INDEX, &json)?;
        for (digest, bytes) in artifacts {
            add(&format!("{ARTIFACTS}/{digest}"), bytes)?;
        }
        builder
            .into_inner()
            .and_then(|f| f.sync_all())
            .with_context(|| format!("finishing {}", out.display()))?;
    } else {
        std::fs::create_dir(out)
            .with_context(|| format!("cannot create {} (it must not exist)", out.display()))?;
        let dir: PathBuf = out.join(ARTIFACTS);
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(out.join(INDEX), json)
            .with_context(|| format!("writing {}/{INDEX}", out.display()))?;
        for (digest, bytes) in artifacts {
            std::fs::write(dir.join(digest), bytes)
                .with_context(|| format!("writing {}/{digest}", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
