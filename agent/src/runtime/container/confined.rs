//! Operations on a directory handle (`cap_std::fs::Dir`) that act on one name in it and
//! never follow a symlink at that name, plus the few `*at` calls cap-std leaves out (owner and
//! times of a symlink, a directory opened with no symlink on the way), through rustix.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use cap_std::fs::Dir;
use rustix::fs::{AtFlags, Gid, Mode, OFlags, Timespec, Timestamps, Uid};

/// An error with its sources (tar and flate2 hide the cause in a source).
pub(super) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// "cannot DO: WHY", saying plainly when the reason is a path leading out of the root.
pub(super) fn describe(doing: &str, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied && e.to_string().contains("led outside") {
        format!("cannot {doing}: the path leads out of the root through a symlink or `..`")
    } else {
        format!("cannot {doing}: {}", chain(e))
    }
}

/// Whether an error says the path is not (or no longer) there as a directory.
pub(super) fn is_gone(e: &io::Error) -> bool {
    use rustix::io::Errno;
    e.kind() == io::ErrorKind::NotFound
        || [Errno::NOENT, Errno::NOTDIR, Errno::LOOP]
            .iter()
            .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}

/// A name for messages: quoted, with control and bidirectional characters escaped.
pub(super) fn quote(name: &OsStr) -> String {
    format!("{:?}", name.to_string_lossy())
}

/// Removes `name` from `dir` whatever it is, never following a symlink at it.
pub(super) fn remove_any(dir: &Dir, name: &OsStr) -> io::Result<()> {
    match dir.symlink_metadata(name) {
        Ok(meta) if meta.is_dir() => dir.remove_dir_all(name),
        Ok(_) => dir.remove_file(name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates directory `name` in `parent`, replacing a non-directory there; keeps a directory.
pub(super) fn make_dir(parent: &Dir, name: &OsStr) -> io::Result<()> {
    match parent.symlink_metadata(name) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => parent.remove_file(name)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    parent.create_dir(name)
}

/// Opens `rel` under `root` one component at a time, following no symlink at all, for
/// reading (cap-std's own handles are `O_PATH`, which cannot change a mode or owner).
pub(super) fn open_dir_nofollow(root: &Dir, rel: &Path) -> io::Result<Dir> {
    let mut dir = root.try_clone()?;
    for part in std::iter::once(std::path::Component::CurDir).chain(rel.components()) {
        let fd = rustix::fs::openat(
            &dir,
            part.as_os_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        dir = Dir::from_std_file(std::fs::File::from(fd));
    }
    Ok(dir)
}

/// Owner and modification time of an entry, from its tar header.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    /// Owner's uid.
    pub uid: u64,
    /// Owner's gid.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// Sets an open file's or directory's owner (when `chown`), then its mode (after the owner:
/// a change of owner clears set-uid and set-gid bits), then its times.
pub(super) fn set_fd_meta(
    fd: impl std::os::fd::AsFd,
    stamp: Stamp,
    mode: u32,
    chown: bool,
) -> io::Result<()> {
    if chown {
        let (uid, gid) = ids(stamp)?;
        rustix::fs::fchown(&fd, Some(uid), Some(gid))?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
    rustix::fs::futimens(&fd, &times(stamp))?;
    Ok(())
}

/// Sets the owner (when `chown`) and times of the symlink `name` in `dir`, not of its target.
pub(super) fn set_symlink_meta(
    dir: &Dir,
    name: &OsStr,
    stamp: Stamp,
    chown: bool,
) -> io::Result<()> {
    if chown {
        let (uid, gid) = ids(stamp)?;
        rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
    }
    rustix::fs::utimensat(dir, name, &times(stamp), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn ids(stamp: Stamp) -> io::Result<(Uid, Gid)> {
    let too_big = |what| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is out of range"),
        )
    };
    let uid = u32::try_from(stamp.uid).map_err(|_| too_big("the owner's uid"))?;
    let gid = u32::try_from(stamp.gid).map_err(|_| too_big("the owner's gid"))?;
    Ok((Uid::from_raw(uid), Gid::from_raw(gid)))
}

fn times(stamp: Stamp) -> Timestamps {
    let time = Timespec {
        tv_sec: i64::try_from(stamp.mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}
