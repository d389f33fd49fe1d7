//! Applying a tar archive (an image layer, or the tarball of an image layout) inside a root
//! directory that nothing in the archive can leave.
//!
//! The root is a `cap_std::fs::Dir`: every path is resolved beneath it, and a symlink that
//! leads out (absolute, or with `..` past the root) is an error instead of being followed.
//! Entries are created by their last component in their parent directory handle, never
//! following a symlink at that name. Whiteouts (`.wh.NAME`, `.wh..wh..opq`) are applied the
//! same way. Nothing else is trusted either: absolute and `..` names, hard links whose target
//! leaves the root, device nodes, FIFOs and sparse entries are refused; set-uid and set-gid
//! files follow [`SetuidPolicy`]; the entry count, each file's size, the bytes written, the
//! path length and depth are bounded by [`ImageLimits`] and checked before anything is
//! written. A layer is read twice: the first pass checks every entry and applies the
//! whiteouts to what the layers below left; the second writes the layer's own entries. A
//! layer with a bad entry is therefore refused before any of it is applied.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt as _};

use super::confined::{
    Stamp, chain, describe, is_gone, make_dir, open_dir_nofollow, quote, remove_any, set_fd_meta,
    set_symlink_meta,
};
use super::limits::{ImageLimits, SetuidPolicy};

/// What kind of archive is being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// An image layer: whiteouts, owners, modes and times apply.
    Layer,
    /// The tarball of an image layout: directories and regular files only, owned by the agent.
    LayoutTarball,
}

/// Why an archive was refused: the entry (quoted for messages) when one is to blame.
#[derive(Debug)]
pub(super) struct Refused {
    /// The entry's name as written in the archive, quoted and escaped.
    pub entry: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl Refused {
    fn archive(reason: impl Into<String>) -> Self {
        Refused {
            entry: None,
            reason: reason.into(),
        }
    }
}

/// One entry, checked, with what to do about it.
enum Action {
    /// The root directory itself (`./`).
    Root,
    Dir,
    File {
        size: u64,
        mode: u32,
    },
    Symlink(PathBuf),
    HardLink(PathBuf),
    /// `.wh.NAME`: remove NAME of the layers below.
    Whiteout(OsString),
    /// `.wh..wh..opq`: empty the directory of what the layers below put there.
    Opaque,
    /// PAX and GNU bookkeeping entries that carry no file.
    Skip,
}

/// Owner, mode and time of a directory, applied once the whole image is unpacked (so a
/// read-only directory does not stop later entries, and children do not bump its time).
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    stamp: Stamp,
}

/// Applies archives inside `root`, keeping count of what they add against the limits.
pub(super) struct Unpacker<'a> {
    root: &'a Dir,
    limits: &'a ImageLimits,
    kind: Kind,
    /// Whether owners are applied (only root may give files away).
    chown: bool,
    entries: u64,
    bytes: u64,
    dirs: BTreeMap<PathBuf, DirMeta>,
}

impl<'a> Unpacker<'a> {
    /// An unpacker into `root`, which must be a private, empty scratch directory.
    pub fn new(root: &'a Dir, limits: &'a ImageLimits, kind: Kind) -> Self {
        Unpacker {
            root,
            limits,
            kind,
            chown: kind == Kind::Layer && rustix::process::geteuid().is_root(),
            entries: 0,
            bytes: 0,
            dirs: BTreeMap::new(),
        }
    }

    /// First pass over a layer: checks every entry against the rules and the bounds, then
    /// applies the layer's whiteouts to what the layers below left. Nothing is changed if an
    /// entry is refused.
    pub fn check_and_whiteout(&mut self, archive: impl Read) -> Result<(), Refused> {
        let mut archive = tar::Archive::new(archive);
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        let mut whiteouts: Vec<(PathBuf, Option<OsString>, String)> = Vec::new();
        for entry in archive.entries().map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            let (rel, action, name) = self.plan(&entry)?;
            self.count(&mut entries, &mut bytes, &action, &name)?;
            match action {
                Action::Whiteout(hidden) => whiteouts.push((rel, Some(hidden), name)),
                Action::Opaque => whiteouts.push((rel, None, name)),
                _ => {}
            }
        }
        for (dir, hidden, name) in whiteouts {
            self.whiteout(&dir, hidden.as_deref())
                .map_err(|reason| Refused {
                    entry: Some(name),
                    reason,
                })?;
        }
        Ok(())
    }

    /// Writes an archive's entries (for a layer, the second pass, after
    /// [`check_and_whiteout`](Self::check_and_whiteout)).
    pub fn apply(&mut self, archive: impl Read) -> Result<(), Refused> {
        let mut archive = tar::Archive::new(archive);
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        for entry in archive.entries().map_err(unreadable)? {
            let mut entry = entry.map_err(unreadable)?;
            let (rel, action, name) = self.plan(&entry)?;
            self.count(&mut entries, &mut bytes, &action, &name)?;
            let header = entry.header();
            let stamp = Stamp {
                uid: header.uid().unwrap_or(0),
                gid: header.gid().unwrap_or(0),
                mtime: header.mtime().unwrap_or(0),
            };
            let refuse = |reason: String| Refused {
                entry: Some(name.clone()),
                reason,
            };
            match action {
                Action::Root => self.keep_dir_meta(PathBuf::new(), &entry, stamp),
                Action::Dir => {
                    let (parent, last) = self.parent_of(&rel).map_err(refuse)?;
                    make_dir(&parent, &last).map_err(|e| refuse(describe("create it", &e)))?;
                    self.keep_dir_meta(rel, &entry, stamp);
                }
                Action::File { size, mode } => {
                    let (parent, last) = self.parent_of(&rel).map_err(refuse)?;
                    self.write_file(&parent, &last, &mut entry, size, mode, stamp)
                        .map_err(|e| refuse(describe("write it", &e)))?;
                }
                Action::Symlink(target) => {
                    let (parent, last) = self.parent_of(&rel).map_err(refuse)?;
                    remove_any(&parent, &last)
                        .and_then(|()| parent.symlink_contents(&target, &last))
                        .map_err(|e| refuse(describe("create the symlink", &e)))?;
                    if self.kind == Kind::Layer {
                        set_symlink_meta(&parent, &last, stamp, self.chown)
                            .map_err(|e| refuse(describe("set its owner and time", &e)))?;
                    }
                }
                Action::HardLink(target) => {
                    let (parent, last) = self.parent_of(&rel).map_err(refuse)?;
                    remove_any(&parent, &last)
                        .and_then(|()| self.root.hard_link(&target, &parent, &last))
                        .map_err(|e| {
                            refuse(describe(
                                &format!("link it to {:?}", target.to_string_lossy()),
                                &e,
                            ))
                        })?;
                }
                Action::Whiteout(_) | Action::Opaque | Action::Skip => {}
            }
        }
        self.entries = entries;
        self.bytes = bytes;
        Ok(())
    }

    /// Applies the owners, modes and times of the directories, once every layer is in.
    pub fn finish(self) -> Result<(), Refused> {
        for (rel, meta) in &self.dirs {
            let dir = match open_dir_nofollow(self.root, rel) {
                Ok(dir) => dir,
                // Replaced by a later layer by something that is not a directory.
                Err(e) if is_gone(&e) => continue,
                Err(e) => {
                    return Err(Refused {
                        entry: Some(quote(rel.as_os_str())),
                        reason: describe("open the directory", &e),
                    });
                }
            };
            set_fd_meta(&dir, meta.stamp, meta.mode, self.chown).map_err(|e| Refused {
                entry: Some(quote(rel.as_os_str())),
                reason: describe("set its owner, mode and time", &e),
            })?;
        }
        Ok(())
    }

    /// Checks one entry: its name, type, link target, mode and declared size.
    fn plan<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(PathBuf, Action, String), Refused> {
        let header = entry.header();
        let kind = header.entry_type();
        let raw = entry.path_bytes();
        let name = quote(OsStr::from_bytes(&raw));
        let refuse = |reason: String| Refused {
            entry: Some(name.clone()),
            reason,
        };
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok((PathBuf::new(), Action::Skip, name));
        }
        let rel = self.clean(&raw).map_err(refuse)?;
        if kind.is_dir() {
            let action = if rel.as_os_str().is_empty() {
                Action::Root
            } else {
                Action::Dir
            };
            return Ok((rel, action, name));
        }
        let Some(last) = rel.file_name() else {
            return Err(refuse("the root of the image must be a directory".into()));
        };
        if self.kind == Kind::Layer
            && let Some(hidden) = last.as_encoded_bytes().strip_prefix(b".wh.")
        {
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            if hidden == b".wh..opq" {
                return Ok((dir, Action::Opaque, name));
            }
            // `.wh..wh.plnk`, `.wh..wh.aufs`: aufs bookkeeping, not a whiteout (Docker skips it).
            if hidden.starts_with(b".wh.") {
                return Ok((dir, Action::Skip, name));
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(refuse(format!(
                    "{:?} is not a whiteout this agent understands",
                    last.to_string_lossy()
                )));
            }
            let hidden = OsStr::from_bytes(hidden).to_os_string();
            return Ok((dir, Action::Whiteout(hidden), name));
        }
        let link_only = |what: &str| {
            format!("{what}: an image layout tarball may hold only directories and regular files")
        };
        let action = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = header
                    .size()
                    .map_err(|e| refuse(format!("bad size: {e}")))?;
                let mut mode = header
                    .mode()
                    .map_err(|e| refuse(format!("bad mode: {e}")))?;
                if self.kind == Kind::LayoutTarball {
                    mode = 0o600;
                } else if mode & 0o6000 != 0 {
                    match self.limits.setuid {
                        SetuidPolicy::Refuse => {
                            return Err(refuse(format!(
                                "a set-uid or set-gid file (mode {:o}) is refused; set images.setuid = \"strip\" to import it without those bits, or \"keep\" to keep them",
                                mode & 0o7777
                            )));
                        }
                        SetuidPolicy::Strip => mode &= !0o6000,
                        SetuidPolicy::Keep => {}
                    }
                }
                Action::File { size, mode }
            }
            tar::EntryType::Symlink | tar::EntryType::Link if self.kind == Kind::LayoutTarball => {
                return Err(refuse(link_only("a link")));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| refuse("a symlink without a target".into()))?;
                if target.len() > self.limits.max_path_bytes {
                    return Err(refuse(format!(
                        "its link target is {} bytes, over the bound of {} (images.max-path)",
                        target.len(),
                        self.limits.max_path_bytes
                    )));
                }
                Action::Symlink(PathBuf::from(OsStr::from_bytes(&target)))
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("a hard link without a target".into()))?;
                let target = self
                    .clean(&target)
                    .map_err(|e| refuse(format!("its hard link target: {e}")))?;
                if target.as_os_str().is_empty() || target == rel {
                    return Err(refuse("a hard link to itself or to the root".into()));
                }
                Action::HardLink(target)
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse(
                    "a device node: images may not carry device nodes (a container gets only the devices its grants name)"
                        .into(),
                ));
            }
            tar::EntryType::Fifo => {
                return Err(refuse("a FIFO: images may not carry FIFOs".into()));
            }
            tar::EntryType::GNUSparse => {
                return Err(refuse(
                    "a sparse file: sparse entries are not supported".into(),
                ));
            }
            other => {
                return Err(refuse(format!(
                    "unsupported tar entry type {:?}",
                    other.as_byte() as char
                )));
            }
        };
        Ok((rel, action, name))
    }

    /// An entry name as a path relative to the root, within the path bounds.
    fn clean(&self, raw: &[u8]) -> Result<PathBuf, String> {
        if raw.len() > self.limits.max_path_bytes {
            return Err(format!(
                "its path is {} bytes, over the bound of {} (images.max-path)",
                raw.len(),
                self.limits.max_path_bytes
            ));
        }
        let mut out = PathBuf::new();
        let mut depth = 0usize;
        for part in Path::new(OsStr::from_bytes(raw)).components() {
            match part {
                Component::Normal(p) => {
                    out.push(p);
                    depth += 1;
                }
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err("an absolute path: entries must be relative to the root".into());
                }
                Component::ParentDir => {
                    return Err("a `..` component: entries may not climb out of the root".into());
                }
            }
        }
        if depth > self.limits.max_depth {
            return Err(format!(
                "its path has {depth} components, over the bound of {} (images.max-depth)",
                self.limits.max_depth
            ));
        }
        Ok(out)
    }

    /// Counts an entry against the entry and size bounds.
    fn count(
        &self,
        entries: &mut u64,
        bytes: &mut u64,
        action: &Action,
        name: &str,
    ) -> Result<(), Refused> {
        let refuse = |reason: String| Refused {
            entry: Some(name.to_string()),
            reason,
        };
        *entries = entries.saturating_add(1);
        if *entries > self.limits.max_entries {
            return Err(refuse(format!(
                "the image has more than {} entries (images.max-entries)",
                self.limits.max_entries
            )));
        }
        if let Action::File { size, .. } = action {
            let max_file = match self.kind {
                Kind::Layer => self.limits.max_file_bytes,
                // A layout's files are compressed layers: bounded by the image's total.
                Kind::LayoutTarball => self.limits.max_unpacked_bytes,
            };
            if *size > max_file {
                return Err(refuse(format!(
                    "{size} bytes, over the bound of {max_file} for one file ({})",
                    match self.kind {
                        Kind::Layer => "images.max-file",
                        Kind::LayoutTarball => "images.max-unpacked",
                    }
                )));
            }
            *bytes = bytes.saturating_add(*size);
            if *bytes > self.limits.max_unpacked_bytes {
                return Err(refuse(format!(
                    "the image would unpack to more than {} bytes (images.max-unpacked)",
                    self.limits.max_unpacked_bytes
                )));
            }
        }
        Ok(())
    }

    /// The directory holding `rel` (created inside the root if missing) and `rel`'s last
    /// component. Symlinks on the way are followed only while they stay inside the root.
    fn parent_of(&self, rel: &Path) -> Result<(Dir, OsString), String> {
        let last = rel
            .file_name()
            .expect("a checked entry other than the root has a last component")
            .to_os_string();
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = match parent {
            None => self.root.try_clone(),
            Some(p) => match self.root.open_dir(p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => self
                    .root
                    .create_dir_all(p)
                    .and_then(|()| self.root.open_dir(p)),
                opened => opened,
            },
        };
        let dir = dir.map_err(|e| {
            describe(
                &format!(
                    "open its directory {:?} inside the root",
                    parent.unwrap_or(Path::new(".")).to_string_lossy()
                ),
                &e,
            )
        })?;
        Ok((dir, last))
    }

    /// Applies a whiteout: `hidden` in `dir`, or all of `dir`'s content when `hidden` is `None`.
    fn whiteout(&mut self, dir_rel: &Path, hidden: Option<&OsStr>) -> Result<(), String> {
        let opened = if dir_rel.as_os_str().is_empty() {
            self.root.try_clone()
        } else {
            self.root.open_dir(dir_rel)
        };
        let dir = match opened {
            Ok(dir) => dir,
            // Nothing below to hide.
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) => {
                return Err(describe(
                    &format!("open {:?} inside the root", dir_rel.to_string_lossy()),
                    &e,
                ));
            }
        };
        match hidden {
            Some(name) => {
                remove_any(&dir, name).map_err(|e| describe("remove what it hides", &e))?;
                self.forget_dirs(&dir_rel.join(name), true);
            }
            None => {
                let children = dir
                    .entries()
                    .map_err(|e| describe("list the directory", &e))?;
                for child in children {
                    let child = child.map_err(|e| describe("list the directory", &e))?;
                    remove_any(&dir, &child.file_name())
                        .map_err(|e| describe("empty the directory", &e))?;
                }
                self.forget_dirs(dir_rel, false);
            }
        }
        Ok(())
    }

    /// Drops the deferred metadata of directories under `rel` (and of `rel` if `itself`).
    fn forget_dirs(&mut self, rel: &Path, itself: bool) {
        let gone: Vec<PathBuf> = self
            .dirs
            .range(rel.to_path_buf()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(rel))
            .filter(|p| itself || p.as_path() != rel)
            .cloned()
            .collect();
        for path in gone {
            self.dirs.remove(&path);
        }
    }

    fn keep_dir_meta<R: Read>(&mut self, rel: PathBuf, entry: &tar::Entry<'_, R>, stamp: Stamp) {
        if self.kind == Kind::Layer {
            let mode = entry.header().mode().unwrap_or(0o755);
            self.dirs.insert(rel, DirMeta { mode, stamp });
        }
    }

    /// Writes a regular file from the entry's data, then its owner, mode and time.
    fn write_file(
        &self,
        parent: &Dir,
        last: &OsStr,
        data: &mut impl Read,
        size: u64,
        mode: u32,
        stamp: Stamp,
    ) -> io::Result<()> {
        remove_any(parent, last)?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true).mode(0o600);
        let file = parent.open_with(last, &options)?.into_std();
        let written = io::copy(&mut data.take(size), &mut &file)?;
        if written != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the archive ends {written} bytes into a {size}-byte file"),
            ));
        }
        let stamp = match self.kind {
            Kind::Layer => stamp,
            // A layout's files belong to the agent; their times do not matter.
            Kind::LayoutTarball => Stamp { mtime: 0, ..stamp },
        };
        set_fd_meta(&file, stamp, mode, self.chown)
    }
}

/// A reader error of the archive itself (corrupt tar, bad gzip, truncated blob).
fn unreadable(e: io::Error) -> Refused {
    Refused::archive(format!("unreadable archive: {}", chain(&e)))
}
