//! OCI images imported offline (`kind = "container"` with `image = ...`): an image layout
//! directory or tarball whose index, manifest, configuration and layers come from the fuzzer,
//! imported into an image store, inside the [`sandbox`](crate::sandbox) whose `/` is a scratch
//! directory holding `/outside` (files the import must not touch), `/layout` (the image) and
//! `/store` (the image store).
//!
//! The first byte picks what is raw: 0 nothing (every part generated), 1 `index.json`,
//! 2 the manifest, 3 the configuration, 4 one layer's tar bytes, 5 the whole layout as a
//! tarball (the bytes are the file `lichen` imports); the rest drives the generator: layers of files, directories, symbolic and hard links (into the root, out of it,
//! through each other), whiteouts and opaque whiteouts, FIFOs, device nodes and set-uid files;
//! descriptors with wrong digests, sizes and media types; nested indexes; blobs that are links
//! or FIFOs; the layout as a directory or a (gzip) tarball.
//!
//! Properties beyond "no panic":
//! - nothing outside the image store changes: `/outside` is byte for byte, mode for mode what
//!   it was, and no new entry appears next to it;
//! - an imported root filesystem holds no device node, no set-uid or set-gid file (unless the
//!   generated `images.setuid` policy keeps them), no file over `images.max-file` and no more
//!   than `images.max-unpacked` bytes (the bounds are drawn small, or set to zero, one, ...);
//! - no scratch directory (`.import-*`, `.layout-*`) is left in the store;
//! - the import returns within [`DEADLINE`].
//!
//! The generator of image layouts is in `oci/generate.rs`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{
    FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::Path;
use std::time::Duration;

use arbitrary::Unstructured;
use lichen_agent::runtime::container::{ImageLimits, ImageStore, SetuidPolicy};
use sha2::{Digest as _, Sha256};

use crate::input::int;
use crate::sandbox::{self, Outcome};

mod generate;

use generate::generate;

/// Longest an import may take before the target calls it a hang.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The bounds most imports here run with: the defaults with smaller sizes, so that a layer
/// that inflates is stopped after a few MiB, not 2 GiB.
fn small_limits() -> ImageLimits {
    ImageLimits {
        max_unpacked_bytes: 8 << 20,
        max_file_bytes: 4 << 20,
        ..ImageLimits::default()
    }
}

/// The `oci_image` target.
pub fn oci_image(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let raw_part = mode % 6;
    if raw_part == 5 {
        let tarball = rest.to_vec();
        let description = format!("a raw layout tarball of {} bytes", tarball.len());
        return match sandbox::run(DEADLINE, move || {
            import(&Image::tarball(tarball, small_limits()))
        }) {
            Outcome::Done(()) => {}
            Outcome::TimedOut => {
                unblock_fifos(sandbox::root());
                panic!("importing the image did not return within {DEADLINE:?}: {description}");
            }
        };
    }
    let raw = if raw_part == 0 {
        Vec::new()
    } else {
        let len = int(&mut u, 0..=rest.len());
        u.bytes(len).unwrap_or_default().to_vec()
    };
    let image = generate(&mut u, raw_part, raw);
    let description = image.describe();
    match sandbox::run(DEADLINE, move || import(&image)) {
        Outcome::Done(()) => {}
        Outcome::TimedOut => {
            unblock_fifos(sandbox::root());
            panic!("importing the image did not return within {DEADLINE:?}: {description}");
        }
    }
}

/// Opens every FIFO under `dir` for writing (without waiting), so a reader blocked on one
/// gets its end of file and the sandbox thread is free again.
fn unblock_fifos(dir: &Path) {
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
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
                .open(&path);
        }
    }
}

/// A generated image, written into the sandbox by [`import`].
#[derive(Debug, Clone, Default)]
struct Image {
    /// Blobs by hex digest: bytes, or a link target, or a FIFO.
    blobs: BTreeMap<String, Blob>,
    index: Vec<u8>,
    layout_marker: Vec<u8>,
    /// Extra entries in the layout (paths relative to it): links out of it.
    extra_links: Vec<(String, String)>,
    /// How the layout reaches the store: 0 a directory, 1 a tar file, 2 a gzip tar file.
    packing: u8,
    /// A tarball given whole (raw mode 5): written as `/layout.tar` as it is.
    tarball: Option<Vec<u8>>,
    /// Whether descriptors, blobs and the layout itself may be broken; a clean image has
    /// only its layers' entries to be hostile with, so imports get that far.
    hostile: bool,
    layers: Vec<String>,
    /// The `[images]` bounds and set-uid policy the store imports with.
    limits: ImageLimits,
}

#[derive(Debug, Clone)]
enum Blob {
    Bytes(Vec<u8>),
    Link(String),
    Fifo,
}

impl Image {
    fn tarball(bytes: Vec<u8>, limits: ImageLimits) -> Self {
        Image {
            tarball: Some(bytes),
            limits,
            ..Image::default()
        }
    }

    fn describe(&self) -> String {
        format!(
            "limits {:?}, packing {}, {} blobs, layers: {}",
            self.limits,
            self.packing,
            self.blobs.len(),
            self.layers.join(" | ")
        )
    }
}

const OUTSIDE: &[(&str, &[u8])] = &[
    ("outside/victim", b"precious"),
    ("outside/dir/file", b"also precious"),
];

/// Runs inside the sandbox: lays out `/outside`, writes the image, imports it, checks.
fn import(image: &Image) {
    reset();
    let source = write_layout(image);
    let before = snapshot(Path::new("/outside"));
    let store = ImageStore::new("/store").with_limits(image.limits.clone());
    let result = store.import(Path::new(source));
    if std::env::var_os("LICHEN_FUZZ_VERBOSE").is_some() {
        eprintln!("import of {source}: {result:?}");
    }

    let after = snapshot(Path::new("/outside"));
    if before != after {
        panic!(
            "the import changed files outside the store ({}): before {before:?}, after {after:?}; {}",
            match &result {
                Ok(_) => "and reported success".to_owned(),
                Err(e) => format!("and failed: {e}"),
            },
            image.describe()
        );
    }
    let mut top: Vec<String> = std::fs::read_dir("/")
        .expect("listing the sandbox root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    let expected = ["layout", "layout.tar", "layout.tar.gz", "outside", "store"];
    if let Some(stray) = top.iter().find(|t| !expected.contains(&t.as_str())) {
        panic!(
            "the import created /{stray} outside the store ({:?}); {}",
            result.as_ref().map(|_| ()),
            image.describe()
        );
    }
    if let Ok(entries) = std::fs::read_dir("/store") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".import-") && !name.starts_with(".layout-"),
                "scratch directory /store/{name} left after the import returned ({:?})",
                result.as_ref().map(|_| ())
            );
        }
    }
    if let Ok(imported) = &result {
        check_rootfs(&imported.rootfs, &image.limits);
    }
}

/// No device nodes in an imported root, no set-uid/set-gid files unless the policy keeps
/// them, and no file or total over the bounds.
fn check_rootfs(root: &Path, limits: &ImageLimits) {
    let mut inodes = std::collections::BTreeSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let kind = meta.file_type();
            assert!(
                !kind.is_char_device() && !kind.is_block_device(),
                "device node {} in an imported root",
                path.display()
            );
            if kind.is_file() {
                assert!(
                    meta.len() <= limits.max_file_bytes,
                    "{} of {} bytes in an imported root, over images.max-file ({})",
                    path.display(),
                    meta.len(),
                    limits.max_file_bytes
                );
                if inodes.insert(meta.ino()) {
                    total += meta.len();
                }
            }
            // A set-gid directory only passes its group on; files are what run privileged.
            if !kind.is_symlink() && !kind.is_dir() && limits.setuid != SetuidPolicy::Keep {
                assert!(
                    meta.permissions().mode() & 0o6000 == 0,
                    "set-uid/set-gid file {} (mode {:o}) in an imported root",
                    path.display(),
                    meta.permissions().mode()
                );
            }
            if kind.is_dir() {
                stack.push(path);
            }
        }
    }
    assert!(
        total <= limits.max_unpacked_bytes,
        "an imported root of {total} bytes, over images.max-unpacked ({})",
        limits.max_unpacked_bytes
    );
}

/// Empties the sandbox root and lays out `/outside`.
fn reset() {
    for entry in std::fs::read_dir("/")
        .expect("listing the sandbox root")
        .flatten()
    {
        let path = entry.path();
        let result = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        result.unwrap_or_else(|e| panic!("cannot clear {}: {e}", path.display()));
    }
    for (path, bytes) in OUTSIDE {
        let path = Path::new("/").join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("creating /outside");
        std::fs::write(&path, bytes).expect("writing /outside");
    }
}

/// Every entry under `dir` (not following links): kind, mode, owner, size, and content or
/// link target.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            out.insert(path.display().to_string(), "missing".into());
            continue;
        };
        let kind = meta.file_type();
        let detail = if kind.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            "dir".to_owned()
        } else if kind.is_symlink() {
            format!("link -> {:?}", std::fs::read_link(&path).ok())
        } else if kind.is_file() {
            let bytes = std::fs::read(&path).unwrap_or_default();
            format!("file {}", hex::encode(Sha256::digest(&bytes)))
        } else {
            format!("special {:?}", kind)
        };
        out.insert(
            path.display().to_string(),
            format!(
                "{detail} mode {:o} owner {}:{} links {}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.nlink()
            ),
        );
    }
    out
}

/// Writes the layout; returns what to import (the directory, or the tarball made of it).
fn write_layout(image: &Image) -> &'static str {
    if let Some(bytes) = &image.tarball {
        std::fs::write("/layout.tar", bytes).expect("writing");
        return "/layout.tar";
    }
    let layout = Path::new("/layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("creating the layout");
    std::fs::write(layout.join("oci-layout"), &image.layout_marker).expect("writing");
    std::fs::write(layout.join("index.json"), &image.index).expect("writing");
    for (hex, blob) in &image.blobs {
        let path = blobs.join(hex);
        let _ = match blob {
            Blob::Bytes(bytes) => std::fs::write(&path, bytes),
            Blob::Link(target) => std::os::unix::fs::symlink(target, &path),
            Blob::Fifo => rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .map_err(std::io::Error::from),
        };
    }
    for (name, target) in &image.extra_links {
        let path = layout.join(name);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::os::unix::fs::symlink(target, path);
    }
    if image.packing == 0 {
        return "/layout";
    }
    // A tarball of the layout; links go in as links. A layout tar cannot hold (a FIFO, say)
    // is imported as the directory instead.
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    if tar.append_dir_all(".", layout).is_err() {
        return "/layout";
    }
    let bytes = tar.into_inner().expect("a tar in memory");
    std::fs::remove_dir_all(layout).expect("removing the packed layout");
    if image.packing == 1 {
        std::fs::write("/layout.tar", bytes).expect("writing");
        "/layout.tar"
    } else {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).expect("gzip");
        std::fs::write("/layout.tar.gz", gz.finish().expect("gzip")).expect("writing");
        "/layout.tar.gz"
    }
}
