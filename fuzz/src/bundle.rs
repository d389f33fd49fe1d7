//! Deployment bundles (`lichen import`): opened from a tar file or a directory with small
//! bounds ([`LIMITS`]), `bundle.json` read and checked as the importer checks it (node,
//! signature, the digests the deployment names, the deployment validated), then every artifact
//! member streamed through `Bundle::artifacts` against the expected digests and sizes.
//!
//! The first byte picks the mode: 0 the rest is a tar bundle as it is; 1 the rest drives a
//! generator of bundles, as a directory or a tar file, whose members are the expected ones,
//! misnamed ones, tampered artifacts, links (symbolic and hard), directories and FIFOs; 2 the
//! rest is a tar file unpacked into a directory (FIFOs, links and all), read as a directory
//! bundle.
//!
//! The expected artifacts are what the importer expects (each digest the deployment names,
//! with the size the signed desired state gives it) and, for generated bundles, every name a
//! regular artifact file was written under, so the streaming path is reached.
//!
//! Properties beyond "no panic":
//! - opening and reading return within [`DEADLINE`] (a member that never ends must be
//!   refused, not read);
//! - only expected names are visited, each once, with exactly the size announced, never more
//!   than its bound (the signed size, else [`LIMITS`]);
//! - an artifact read back under a name holds the bytes written under that name, and a link,
//!   FIFO or directory is never visited as an artifact;
//! - a bundle written by `bundle::write` reads back the same;
//! - a signature the trusted key did not make over this node, version and artifact sizes is
//!   refused.

use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use arbitrary::Unstructured;
use lichen_agent::hub::artifacts::referenced_digests;
use std::collections::{BTreeMap, BTreeSet};

use lichen_agent::hub::bundle::{self, Bundle, BundleIndex, Expected, FORMAT, Limits};
use lichen_agent::hub::{self, DesiredState};
use serde_json::json;

use crate::input::{self, int, one_in, pick};
use crate::keys::{self, NODE};

/// Longest a bundle read may take before the target calls it a hang.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The bounds bundles are read with here: small, so that members over them are common.
pub const LIMITS: Limits = Limits {
    index: 64 * 1024,
    artifact: 4096,
};

/// What was read from a bundle: its index and the artifacts streamed, by name.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    index: BundleIndex,
    artifacts: BTreeMap<String, Vec<u8>>,
}

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
            match read(&path, &[], &BTreeSet::new()) {
                Some(Ok(b)) => import_checks(&b),
                Some(Err(_)) => {}
                None => panic!("a tar bundle was not read within {DEADLINE:?}"),
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
            match read(&root, &fifos, &BTreeSet::new()) {
                Some(Ok(b)) => import_checks(&b),
                Some(Err(_)) => {}
                None => panic!(
                    "a directory bundle was not read within {DEADLINE:?} (FIFOs: {})",
                    fifos.len()
                ),
            }
            return;
        }
        _ => {}
    }
    let mut u = Unstructured::new(rest);
    let generated = generate(&mut u, dir.path());
    // Names the importer could expect: digests (a deployment names artifacts only by digest).
    let names: BTreeSet<String> = generated
        .unique_files
        .keys()
        .filter(|name| lichen_sync::is_digest(name))
        .cloned()
        .collect();
    match read(&generated.path, &generated.fifos, &names) {
        Some(Ok(b)) => {
            for (name, bytes) in &b.artifacts {
                // A name written once as a regular file reads back as written; any other
                // (a link, a FIFO, written twice) is never visited.
                let written = generated.unique_files.get(name).filter(|_| names.contains(name)).unwrap_or_else(|| {
                    panic!(
                        "artifacts/{name} was visited but is no regular file written once; members: {:?}",
                        generated.members
                    )
                });
                assert_eq!(bytes, written, "artifact {name} reads back changed");
            }
            import_checks(&b);
            round_trip(&b, dir.path(), &names);
        }
        Some(Err(_)) => {}
        None => panic!(
            "a bundle was not read within {DEADLINE:?} on {} (members: {:?})",
            generated.path.display(),
            generated.members
        ),
    }
}

/// Reads a bundle on a thread; `None` if it did not finish in time (the FIFOs are then
/// opened for writing so the reader, blocked on one, can end).
fn read(path: &Path, fifos: &[PathBuf], extra: &BTreeSet<String>) -> Option<anyhow::Result<Read>> {
    let (tx, rx) = mpsc::channel();
    let owned = path.to_path_buf();
    let extra = extra.clone();
    let reader = std::thread::spawn(move || {
        let _ = tx.send(read_now(&owned, &extra));
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
                    .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
                    .open(fifo);
            }
            let _ = rx.recv_timeout(DEADLINE);
            None
        }
    }
}

/// Opens a bundle, reads its index and streams the artifacts the importer would expect
/// (plus `extra` names, without a signed size), checking what the walk hands over.
fn read_now(path: &Path, extra: &BTreeSet<String>) -> anyhow::Result<Read> {
    let bundle = Bundle::open(path, LIMITS)?;
    let index = bundle.index()?;
    let mut expected: Expected = referenced_digests(&index.desired.deployment)
        .into_iter()
        .map(|d| {
            let size = index.desired.artifacts.get(&d).copied();
            (d, size)
        })
        .collect();
    for name in extra {
        expected.entry(name.clone()).or_insert(None);
    }
    let mut artifacts = BTreeMap::new();
    let visited = bundle.artifacts(&expected, |name, reader, size| {
        let Some(signed) = expected.get(name) else {
            panic!("artifact {name:?} visited although it is not expected");
        };
        assert!(
            size <= LIMITS.artifact && signed.is_none_or(|s| s == size),
            "artifact {name} of {size} bytes handed over (bound {}, signed size {signed:?})",
            LIMITS.artifact
        );
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(reader, &mut bytes)?;
        assert_eq!(
            bytes.len() as u64,
            size,
            "artifact {name}: the reader yields another size than announced"
        );
        assert!(
            artifacts.insert(name.to_owned(), bytes).is_none(),
            "artifact {name} visited twice"
        );
        Ok(())
    })?;
    let names: BTreeSet<String> = artifacts.keys().cloned().collect();
    assert_eq!(
        visited, names,
        "the digests returned are not the ones visited"
    );
    Ok(Read { index, artifacts })
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
fn import_checks(b: &Read) {
    let desired = &b.index.desired;
    let keys = [keys::trusted()];
    let verified = hub::verify(desired, NODE, &keys);
    let (signature, _) = keys::sign_desired(NODE, desired);
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
fn round_trip(b: &Read, dir: &Path, extra: &BTreeSet<String>) {
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
        let back = read_now(&out, extra).expect("reading a bundle that was written");
        assert_eq!(back, *b, "a bundle does not round-trip through {name}");
    }
}

/// A generated bundle on disk.
struct Generated {
    path: PathBuf,
    fifos: Vec<PathBuf>,
    /// Regular artifact files under their name, with their bytes: in a tar, members written
    /// once; in a directory, the regular files there.
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
        let (root, fifos) = write_dir(dir, &members);
        // What a directory holds is what landed on disk: the regular files under artifacts/
        // (a name written twice holds its last bytes; a link or FIFO is no regular file).
        unique_files.clear();
        if let Ok(entries) = std::fs::read_dir(root.join("artifacts")) {
            for entry in entries.flatten() {
                // Only a regular file is read (a FIFO would block the generator).
                let is_file = std::fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_file());
                if let Some(Ok(bytes)) = is_file.then(|| std::fs::read(entry.path())) {
                    unique_files.insert(entry.file_name().to_string_lossy().into_owned(), bytes);
                }
            }
        }
        (root, fifos)
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
            Kind::File(bytes) => {
                // A FIFO made under the same name by an earlier member: writing would open it
                // and block for ever (the harness, not the bundle code, hung); replace it.
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_fifo()) {
                    let _ = std::fs::remove_file(&path);
                }
                std::fs::write(&path, bytes)
            }
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
    // Desired v2: the sizes of the artifacts it names, mostly right ("module N" is 8 bytes).
    let mut artifacts = BTreeMap::new();
    if one_in(u, 2) {
        for digest in referenced_digests(&deployment) {
            artifacts.insert(
                digest,
                pick(u, &[8u64, 8, 8, 0, 7, 9, LIMITS.artifact + 1, u64::MAX]),
            );
        }
    }
    let mut desired = DesiredState {
        version,
        deployment,
        artifacts,
        precompiled: Vec::new(),
        system: None,
        signature: None,
        key_id: None,
    };
    let (signature, key_id) = keys::sign_desired(&node, &desired);
    desired.signature = (!one_in(u, 6)).then_some(signature);
    desired.key_id = (!one_in(u, 4)).then_some(key_id);
    if one_in(u, 8)
        && let Some((_, size)) = desired.artifacts.iter_mut().next()
    {
        // Signed, then a size changed: the signature must no longer hold.
        *size = size.wrapping_add(1);
    }
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
