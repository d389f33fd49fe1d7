//! Deployment bundles (`lichen import`): read from a tar file or a directory, then checked as
//! the hub link checks an import (node, signature, every artifact's digest, the digests the
//! deployment names) and the deployment validated.
//!
//! The first byte picks the mode: 0 the rest is a tar bundle as it is; 1 the rest drives a
//! generator of bundles, as a directory or a tar file, whose members are the expected ones,
//! misnamed ones, tampered artifacts, links (symbolic and hard), directories and FIFOs; 2 the
//! rest is a tar file unpacked into a directory (FIFOs, links and all), read as a directory
//! bundle.
//!
//! Properties beyond "no panic":
//! - reading returns within [`DEADLINE`] (a member that never ends must be refused, not read);
//! - a bundle written by `bundle::write` reads back the same;
//! - an artifact read back under a name holds the bytes written under that name;
//! - a signature the trusted key did not make over this node and version is refused.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use arbitrary::Unstructured;
use lichen_agent::hub::artifacts::referenced_digests;
use lichen_agent::hub::bundle::{self, Bundle, BundleIndex, FORMAT};
use lichen_agent::hub::{self, DesiredState};
use serde_json::json;

use crate::input::{self, int, one_in, pick};
use crate::keys::{self, NODE};

/// Longest a bundle read may take before the target calls it a hang.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The `bundle` target.
pub fn bundle(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    match mode % 3 {
        0 => {
            let path = dir.path().join("bundle.tar");
            std::fs::write(&path, rest).expect("writing the bundle");
            if let Some(Ok(b)) = read(&path, &[]) {
                import_checks(&b);
            }
            return;
        }
        2 => {
            let root = dir.path().join("bundle");
            std::fs::create_dir(&root).expect("creating the bundle directory");
            let mut archive = tar::Archive::new(rest);
            // What tar cannot unpack (or refuses: names out of the directory) is left out; the
            // tar crate makes no FIFOs, so they are made here.
            if let Ok(entries) = archive.entries() {
                for mut entry in entries.flatten() {
                    if entry.header().entry_type().is_fifo() {
                        make_fifo(&root, &entry.path().unwrap_or_default());
                    } else {
                        let _ = entry.unpack_in(&root);
                    }
                }
            }
            let fifos = fifos_in(&root);
            match read(&root, &fifos) {
                Some(Ok(b)) => import_checks(&b),
                Some(Err(_)) => {}
                None => panic!(
                    "bundle::read did not return within {DEADLINE:?} on a directory bundle (FIFOs: {})",
                    fifos.len()
                ),
            }
            return;
        }
        _ => {}
    }
    let mut u = Unstructured::new(rest);
    let generated = generate(&mut u, dir.path());
    match read(&generated.path, &generated.fifos) {
        Some(Ok(b)) => {
            for (name, bytes) in &b.artifacts {
                if let Some(written) = generated.unique_files.get(name) {
                    assert_eq!(bytes, written, "artifact {name} reads back changed");
                }
            }
            import_checks(&b);
            round_trip(&b, dir.path());
        }
        Some(Err(_)) => {}
        None => panic!(
            "bundle::read did not return within {DEADLINE:?} on {} (members: {:?})",
            generated.path.display(),
            generated.members
        ),
    }
}

/// Reads a bundle on a thread; `None` if it did not finish in time (the FIFOs are then
/// opened for writing so the reader, blocked on one, can end).
fn read(path: &Path, fifos: &[PathBuf]) -> Option<anyhow::Result<Bundle>> {
    let (tx, rx) = mpsc::channel();
    let owned = path.to_path_buf();
    let reader = std::thread::spawn(move || {
        let _ = tx.send(bundle::read(&owned));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(result) => {
            let _ = reader.join();
            Some(result)
        }
        Err(_) => {
            for fifo in fifos {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                    .open(fifo);
            }
            let _ = rx.recv_timeout(DEADLINE);
            None
        }
    }
}

/// Makes a FIFO at `name` under `root`, if `name` stays under it.
fn make_fifo(root: &Path, name: &Path) {
    use std::path::Component;
    if name.as_os_str().is_empty() || !name.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return;
    }
    let path = root.join(name);
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    );
}

/// The FIFOs under `dir` (not following links).
fn fifos_in(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.file_type().is_fifo() {
            out.push(path);
        }
    }
    out
}

/// What the hub link checks before applying an imported bundle.
fn import_checks(b: &Bundle) {
    let desired = &b.index.desired;
    let keys = [keys::trusted()];
    let verified = hub::verify(desired, NODE, &keys);
    let (signature, _) = keys::sign(NODE, desired.version, &desired.deployment);
    let genuine = desired
        .signature
        .as_deref()
        .is_some_and(|s| hub::base64_decode(s).ok() == hub::base64_decode(&signature).ok());
    if verified.is_ok() {
        assert!(
            genuine,
            "a bundle signature the trusted key did not make was accepted"
        );
    }
    for digest in referenced_digests(&desired.deployment) {
        assert!(
            desired.deployment.to_ascii_lowercase().contains(&digest),
            "referenced digest {digest} is not in the deployment"
        );
    }
    if verified.is_ok() && b.index.node == NODE {
        crate::deployment::check(
            &format!("bundle version {}", desired.version),
            &desired.deployment,
        );
    }
}

/// Writes `b` again as a tar file and as a directory, and reads both back.
fn round_trip(b: &Bundle, dir: &Path) {
    let names_ok = b.artifacts.keys().all(|name| {
        !name.is_empty()
            && !name.contains('/')
            && name != "."
            && name != ".."
            && name.len() < 200
            && !name.contains('\0')
    });
    if !names_ok {
        return;
    }
    let artifacts: Vec<(String, &[u8])> = b
        .artifacts
        .iter()
        .map(|(name, bytes)| (name.clone(), bytes.as_slice()))
        .collect();
    for name in ["again.tar", "again"] {
        let out = dir.join(name);
        bundle::write(&out, &b.index, &artifacts).expect("writing a bundle that was read");
        let back = bundle::read(&out).expect("reading a bundle that was written");
        assert_eq!(back, *b, "a bundle does not round-trip through {name}");
    }
}

/// A generated bundle on disk.
struct Generated {
    path: PathBuf,
    fifos: Vec<PathBuf>,
    /// Regular artifact files written once under their name, with their bytes.
    unique_files: std::collections::BTreeMap<String, Vec<u8>>,
    members: Vec<String>,
}

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
    Fifo,
}

fn generate(u: &mut Unstructured<'_>, dir: &Path) -> Generated {
    // A file outside the bundle, which links may point at.
    std::fs::write(dir.join("outside.bin"), b"outside").expect("writing");
    let mut members: Vec<(String, Kind)> = Vec::new();
    if !one_in(u, 10) {
        members.push(("bundle.json".into(), Kind::File(index_json(u))));
    }
    for _ in 0..int(u, 0..=4) {
        let bytes: Vec<u8> = if one_in(u, 4) {
            u.arbitrary().unwrap_or_default()
        } else {
            format!("module {}", int(u, 0..=9)).into_bytes()
        };
        let name = match int(u, 0..=5) {
            0..=2 => lichen_sync::sha256_hex(&bytes),
            3 => lichen_sync::sha256_hex(b"another"),
            4 => input::name(u),
            _ => pick(u, &["", ".", "..", "a/b", "../x", "./y"]).to_owned(),
        };
        members.push((format!("artifacts/{name}"), Kind::File(bytes)));
    }
    for _ in 0..int(u, 0..=3) {
        let name = pick(
            u,
            &[
                "bundle.json",
                "./bundle.json",
                "artifacts",
                "artifacts/",
                "artifacts/x",
                "extra.txt",
                "../escape",
                "/abs",
                "artifacts/sub/deeper",
            ],
        )
        .to_owned();
        let kind = match int(u, 0..=4) {
            0 => Kind::File(u.arbitrary().unwrap_or_default()),
            1 => Kind::Dir,
            2 => Kind::Symlink(
                pick(
                    u,
                    &[
                        "bundle.json",
                        "../outside.bin",
                        "/nonexistent",
                        ".",
                        "artifacts",
                    ],
                )
                .to_owned(),
            ),
            3 => Kind::Hardlink(pick(u, &["bundle.json", "outside.bin", "../x"]).to_owned()),
            _ => Kind::Fifo,
        };
        members.push((name, kind));
    }
    let listed: Vec<String> = members
        .iter()
        .map(|(n, k)| format!("{n} ({})", kind_name(k)))
        .collect();
    let mut unique_files = std::collections::BTreeMap::new();
    for (name, kind) in &members {
        if let (Some(short), Kind::File(bytes)) = (name.strip_prefix("artifacts/"), kind)
            && members.iter().filter(|(n, _)| n == name).count() == 1
        {
            unique_files.insert(short.to_owned(), bytes.clone());
        }
    }
    let (path, fifos) = if one_in(u, 2) {
        (write_tar(dir, &members), Vec::new())
    } else {
        write_dir(dir, &members)
    };
    Generated {
        path,
        fifos,
        unique_files,
        members: listed,
    }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::File(_) => "file",
        Kind::Dir => "dir",
        Kind::Symlink(_) => "symlink",
        Kind::Hardlink(_) => "hardlink",
        Kind::Fifo => "fifo",
    }
}

fn write_tar(dir: &Path, members: &[(String, Kind)]) -> PathBuf {
    let path = dir.join("bundle.tar");
    let file = std::fs::File::create(&path).expect("creating the tar file");
    let mut builder = tar::Builder::new(file);
    for (name, kind) in members {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        let (entry_type, link, data): (tar::EntryType, Option<&str>, &[u8]) = match kind {
            Kind::File(bytes) => (tar::EntryType::Regular, None, bytes),
            Kind::Dir => (tar::EntryType::Directory, None, &[]),
            Kind::Symlink(target) => (tar::EntryType::Symlink, Some(target), &[]),
            Kind::Hardlink(target) => (tar::EntryType::Link, Some(target), &[]),
            Kind::Fifo => (tar::EntryType::Fifo, None, &[]),
        };
        header.set_entry_type(entry_type);
        header.set_size(data.len() as u64);
        // Names the builder refuses (`..`, absolute) go in raw, as a hostile tool would write.
        if header.set_path(name).is_err() {
            let bytes = name.as_bytes();
            let n = bytes.len().min(99);
            header.as_old_mut().name[..n].copy_from_slice(&bytes[..n]);
        }
        if let Some(target) = link
            && header.set_link_name(target).is_err()
        {
            continue;
        }
        header.set_cksum();
        builder
            .append(&header, data)
            .expect("appending to a tar file");
    }
    builder.finish().expect("finishing the tar file");
    path
}

fn write_dir(dir: &Path, members: &[(String, Kind)]) -> (PathBuf, Vec<PathBuf>) {
    let root = dir.join("bundle");
    std::fs::create_dir(&root).expect("creating the bundle directory");
    let mut fifos = Vec::new();
    for (name, kind) in members {
        // Only members that land inside the bundle directory are created.
        if name.starts_with('/') || name.split('/').any(|part| part == "..") {
            continue;
        }
        let path = root.join(name.trim_end_matches('/'));
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = match kind {
            Kind::File(bytes) => std::fs::write(&path, bytes),
            Kind::Dir => std::fs::create_dir_all(&path),
            Kind::Symlink(target) => {
                let target = if target == "../outside.bin" {
                    dir.join("outside.bin").display().to_string()
                } else {
                    target.clone()
                };
                std::os::unix::fs::symlink(target, &path)
            }
            Kind::Hardlink(target) => {
                let source = if target == "outside.bin" {
                    dir.join("outside.bin")
                } else {
                    root.join(target)
                };
                std::fs::hard_link(source, &path)
            }
            Kind::Fifo => rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .map(|()| fifos.push(path.clone()))
            .map_err(std::io::Error::from),
        };
    }
    (root, fifos)
}

/// `bundle.json`: the right format and node with a signed desired state, or one thing off.
fn index_json(u: &mut Unstructured<'_>) -> Vec<u8> {
    if one_in(u, 8) {
        return u.arbitrary().unwrap_or_default();
    }
    let deployment = if one_in(u, 3) {
        format!(
            "[[workloads]]\nname = \"w\"\nmodule = \"sha256:{}\"\n",
            lichen_sync::sha256_hex(format!("module {}", int(u, 0..=9)).as_bytes())
        )
    } else {
        crate::deployment::document(u).to_toml()
    };
    let version = pick(u, &[1u64, 2, 0, u64::MAX]);
    let node = if one_in(u, 6) {
        input::name(u)
    } else {
        NODE.to_owned()
    };
    let (signature, key_id) = keys::sign(&node, version, &deployment);
    let desired = DesiredState {
        version,
        deployment,
        signature: (!one_in(u, 6)).then_some(signature),
        key_id: (!one_in(u, 4)).then_some(key_id),
    };
    let mut index = serde_json::to_value(BundleIndex {
        format: if one_in(u, 8) {
            input::name(u)
        } else {
            FORMAT.to_owned()
        },
        node,
        desired,
    })
    .expect("an index is JSON");
    if one_in(u, 10) {
        index["extra"] = json!(1);
    }
    serde_json::to_vec(&index).expect("JSON")
}
