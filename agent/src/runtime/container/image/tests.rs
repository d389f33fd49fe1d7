//! The image store: layouts and tarballs import with whiteouts, links, owners and modes; and
//! every malicious layer or layout is refused with the layer (or blob) and the entry named,
//! nothing outside the scratch root touched (a real "host" directory beside the store is
//! compared before and after), and the store unchanged.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use super::*;
use crate::runtime::container::{ImageLimits, SetuidPolicy};
use sha2::{Digest as _, Sha256};

// ---- building layers and layouts ----

/// One tar entry; names are written raw, so absolute and `..` names can be built.
enum E<'a> {
    File(&'a str, &'a [u8]),
    Mode(&'a str, &'a [u8], u32),
    Owned(&'a str, &'a [u8], u64, u64),
    Dir(&'a str),
    DirMode(&'a str, u32),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str),
    Fifo(&'a str),
    /// A regular file of `n` zero bytes (a name of any length, through GNU long names).
    Zeros(&'a str, u64),
}

fn header(kind: tar::EntryType, name: &str, link: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_000_000);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    h
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (h, data): (tar::Header, &[u8]) = match *e {
            E::File(n, d) => (header(T::Regular, n, "", d.len() as u64, 0o644), d),
            E::Mode(n, d, m) => (header(T::Regular, n, "", d.len() as u64, m), d),
            E::Owned(n, d, uid, gid) => {
                let mut h = header(T::Regular, n, "", d.len() as u64, 0o640);
                h.set_uid(uid);
                h.set_gid(gid);
                h.set_cksum();
                (h, d)
            }
            E::Dir(n) => (header(T::Directory, n, "", 0, 0o755), b""),
            E::DirMode(n, m) => (header(T::Directory, n, "", 0, m), b""),
            E::Sym(n, t) => (header(T::Symlink, n, t, 0, 0o777), b""),
            E::Hard(n, t) => (header(T::Link, n, t, 0, 0o644), b""),
            E::Char(n) => {
                let mut h = header(T::Char, n, "", 0, 0o666);
                h.set_device_major(1).expect("major");
                h.set_device_minor(3).expect("minor");
                h.set_cksum();
                (h, b"")
            }
            E::Fifo(n) => (header(T::Fifo, n, "", 0, 0o644), b""),
            E::Zeros(n, size) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(T::Regular);
                h.set_size(size);
                h.set_mode(0o644);
                b.append_data(&mut h, n, std::io::repeat(0).take(size))
                    .expect("append");
                continue;
            }
        };
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).expect("gzip");
    gz.finish().expect("gzip")
}

/// Writes a blob and returns its descriptor JSON.
fn blob(layout: &Path, media: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = hex::encode(Sha256::digest(bytes));
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(&hex), bytes).expect("write blob");
    serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// An image layout at `layout` with these layers (gzip-compressed when they start with the
/// gzip magic); returns the layers' digests.
fn write_layout(layout: &Path, layers: &[Vec<u8>]) -> Vec<String> {
    std::fs::create_dir_all(layout).expect("mkdir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write");
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let media = if l.starts_with(&[0x1f, 0x8b]) {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            blob(layout, media, l)
        })
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"], "Env": ["A=1"]},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let c = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).expect("json"),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": descs
    });
    let m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [m]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("write");
    descs
        .iter()
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// The hex digests of the manifest and config of a layout written by [`write_layout`].
fn manifest_and_config(layout: &Path) -> (String, String) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let m = index["manifests"][0]["digest"].as_str().expect("digest")[7..].to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&m)).expect("m"))
            .expect("json");
    let c = manifest["config"]["digest"].as_str().expect("digest")[7..].to_string();
    (m, c)
}

// ---- the "host" and the store, compared before and after ----

/// What a directory tree holds: per path its type, mode, link count and content or target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            let what = if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if meta.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&path).expect("readlink"))
            } else {
                format!("{:?}", std::fs::read(&path).expect("read"))
            };
            let rel = path.strip_prefix(dir).expect("below").to_path_buf();
            out.insert(
                rel,
                format!("{what} mode {:o} links {}", meta.mode(), meta.nlink()),
            );
        }
    }
    out
}

/// A store beside a "host" directory a layer must never reach.
struct Fixture {
    dir: tempfile::TempDir,
    host: PathBuf,
    store: ImageStore,
    images: usize,
}

impl Fixture {
    fn new() -> Self {
        Self::with(ImageLimits::default())
    }

    fn with(limits: ImageLimits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("host");
        std::fs::create_dir_all(host.join("sub/inner")).expect("mkdir");
        std::fs::write(host.join("victim"), "host data").expect("write");
        std::fs::write(host.join("sub/x"), "host sub data").expect("write");
        let store = ImageStore::new(dir.path().join("store")).with_limits(limits);
        Fixture {
            dir,
            host,
            store,
            images: 0,
        }
    }

    fn host(&self) -> &str {
        self.host.to_str().expect("utf-8 temp path")
    }

    /// A fresh layout of these layers; returns its path and the layers' digests.
    fn layout(&mut self, layers: &[Vec<u8>]) -> (PathBuf, Vec<String>) {
        self.images += 1;
        let path = self.dir.path().join(format!("layout-{}", self.images));
        let digests = write_layout(&path, layers);
        (path, digests)
    }

    fn store_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.store.dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Imports `source`, expecting a refusal that leaves the host and the store as they were.
    fn refused_source(&self, source: &Path) -> String {
        let (host, store) = (snapshot(&self.host), self.store_names());
        let err = self
            .store
            .import(source)
            .expect_err("the image is refused")
            .to_string();
        assert_eq!(snapshot(&self.host), host, "the host changed: {err}");
        assert_eq!(self.store_names(), store, "the store changed: {err}");
        err
    }

    /// Imports a layout of `layers`, expecting a refusal naming the layer at `blame` and an
    /// entry; returns the message.
    fn refused(&mut self, layers: &[Vec<u8>], blame: usize, entry: &str) -> String {
        let (layout, digests) = self.layout(layers);
        let err = self.refused_source(&layout);
        let named = format!("layer {} entry {entry:?}", digests[blame]);
        assert!(err.starts_with(&named), "{err}\nshould start with {named}");
        err
    }
}

// ---- what imports ----

#[test]
fn layers_unpack_in_order_with_whiteouts_and_the_config_is_kept() {
    let mut f = Fixture::new();
    let lower = gzip(&tar_of(&[
        E::Dir("etc"),
        E::File("etc/keep", b"kept"),
        E::File("etc/gone", b"removed by a whiteout"),
        E::Dir("data"),
        E::File("data/old", b"hidden by an opaque whiteout"),
    ]));
    let upper = tar_of(&[
        E::File("data/new", b"from the upper layer"),
        E::File("etc/.wh.gone", b""),
        // After a file of the same layer: an opaque whiteout hides only the layers below.
        E::File("data/.wh..wh..opq", b""),
    ]);
    let (source, _) = f.layout(&[lower, upper]);
    let image = f.store.import(&source).expect("imports");
    let root = &image.rootfs;
    assert_eq!(std::fs::read(root.join("etc/keep")).expect("kept"), b"kept");
    assert!(!root.join("etc/gone").exists(), "whiteout applied");
    assert!(!root.join("data/old").exists(), "opaque whiteout applied");
    assert_eq!(
        std::fs::read(root.join("data/new")).expect("new"),
        b"from the upper layer"
    );
    assert!(!root.join("etc/.wh.gone").exists());
    assert!(!root.join("data/.wh..wh..opq").exists());
    assert_eq!(image.config.entrypoint, vec!["/bin/sh"]);
    assert_eq!(image.config.cmd, vec!["-c", "echo hi"]);
    assert_eq!(image.config.env, vec!["A=1"]);
    // Content-addressed: the same image imports to the same digest, found by digest.
    assert_eq!(f.store.import(&source).expect("again").digest, image.digest);
    assert_eq!(f.store.get(&image.digest), Some(image.clone()));
    assert_eq!(f.store.list().expect("list"), vec![image.digest]);
}

#[test]
fn links_owners_modes_times_and_type_changes_inside_the_root_apply() {
    let mut f = Fixture::new();
    let lower = tar_of(&[
        E::DirMode("./", 0o750),
        E::DirMode("usr", 0o755),
        E::DirMode("usr/lib", 0o755),
        E::Sym("lib", "usr/lib"),
        E::Sym("abs", "/usr/lib"),
        E::File("usr/lib/libc.so", b"libc"),
        E::Hard("usr/lib/libc.so.6", "usr/lib/libc.so"),
        E::Owned("owned", b"x", 1234, 5678),
        E::Dir("becomes-file"),
        E::File("becomes-file/child", b"c"),
        E::File("becomes-dir", b"f"),
        // A read-only directory a later layer still writes into.
        E::DirMode("ro", 0o555),
        E::DirMode("shared", 0o2775),
    ]);
    let upper = tar_of(&[
        // Through an in-root symlink: lands in usr/lib.
        E::File("lib/libm.so", b"libm"),
        E::File("becomes-file", b"now a file"),
        E::Dir("becomes-dir"),
        E::File("ro/late", b"late"),
        E::Mode("tool", b"#!", 0o750),
    ]);
    let (source, _) = f.layout(&[lower, upper]);
    let image = f.store.import(&source).expect("imports");
    let root = &image.rootfs;
    assert_eq!(
        std::fs::read(root.join("usr/lib/libm.so")).expect("libm"),
        b"libm"
    );
    let a = std::fs::metadata(root.join("usr/lib/libc.so")).expect("libc");
    let b = std::fs::metadata(root.join("usr/lib/libc.so.6")).expect("link");
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "a hard link inside the root"
    );
    assert_eq!(
        std::fs::read_link(root.join("abs")).expect("symlink"),
        Path::new("/usr/lib"),
        "an absolute symlink is kept as written (it resolves inside the container)"
    );
    assert_eq!(
        std::fs::read(root.join("becomes-file")).expect("file"),
        b"now a file"
    );
    assert!(root.join("becomes-dir").is_dir());
    assert_eq!(std::fs::read(root.join("ro/late")).expect("late"), b"late");
    let mode = |p: &str| std::fs::symlink_metadata(root.join(p)).expect(p).mode() & 0o7777;
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(mode("."), 0o750, "the root's own entry applies to the root");
    assert_eq!(mode("shared"), 0o2775, "set-gid directories are kept");
    assert_eq!(mode("tool"), 0o750);
    assert_eq!(mode("owned"), 0o640);
    let mtime = std::fs::metadata(root.join("ro")).expect("ro").mtime();
    assert_eq!(
        mtime, 1_000_000,
        "a directory keeps its time after children are added"
    );
    if rustix::process::geteuid().is_root() {
        let owned = std::fs::metadata(root.join("owned")).expect("owned");
        assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    }
}

#[test]
fn a_layout_tarball_imports_and_one_with_a_link_is_refused() {
    let mut f = Fixture::new();
    let (layout, _) = f.layout(&[tar_of(&[E::File("hello", b"hi")])]);
    let tarball = f.dir.path().join("image.tar.gz");
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &layout).expect("tar the layout");
    std::fs::write(&tarball, gzip(&b.into_inner().expect("tar"))).expect("write");
    let image = f.store.import(&tarball).expect("imports");
    assert_eq!(
        std::fs::read(image.rootfs.join("hello")).expect("hello"),
        b"hi"
    );

    // A layout tarball whose blob is a symlink to a host file.
    let (m, _) = manifest_and_config(&layout);
    let tarball = f.dir.path().join("evil.tar");
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for name in ["oci-layout", "index.json"] {
        b.append_path_with_name(layout.join(name), name)
            .expect("append");
    }
    let mut h = header(
        tar::EntryType::Symlink,
        &format!("blobs/sha256/{m}"),
        &format!("{}/victim", f.host()),
        0,
        0o777,
    );
    h.set_cksum();
    b.append(&h, std::io::empty()).expect("append");
    std::fs::write(&tarball, b.into_inner().expect("tar")).expect("write");
    let err = f.refused_source(&tarball);
    assert!(
        err.contains(&format!("entry \"blobs/sha256/{m}\": a link: an image layout tarball may hold only directories and regular files")),
        "{err}"
    );
}

// ---- malicious layers: one case each ----

#[test]
fn a_whiteout_through_a_symlink_to_the_host_is_refused_and_the_host_file_survives() {
    let mut f = Fixture::new();
    let host = f.host().to_string();
    let err = f.refused(
        &[
            tar_of(&[E::Sym("etc", &host)]),
            tar_of(&[E::File("etc/.wh.victim", b"")]),
        ],
        1,
        "etc/.wh.victim",
    );
    assert!(err.contains("leads out of the root"), "{err}");
    assert!(f.host.join("victim").is_file());
}

#[test]
fn an_opaque_whiteout_through_a_symlink_is_refused_and_the_host_dir_keeps_its_content() {
    let mut f = Fixture::new();
    let host = f.host().to_string();
    let err = f.refused(
        &[
            tar_of(&[E::Sym("etc", &host)]),
            gzip(&tar_of(&[E::File("etc/.wh..wh..opq", b"")])),
        ],
        1,
        "etc/.wh..wh..opq",
    );
    assert!(err.contains("leads out of the root"), "{err}");
    // Through `..` too.
    f.refused(
        &[
            tar_of(&[E::Sym("up", "../../../../../../../../..")]),
            tar_of(&[E::File("up/.wh..wh..opq", b"")]),
        ],
        1,
        "up/.wh..wh..opq",
    );
}

#[test]
fn hard_links_to_host_paths_are_refused() {
    let mut f = Fixture::new();
    let victim = format!("{}/victim", f.host());
    let err = f.refused(&[tar_of(&[E::Hard("stolen", &victim)])], 0, "stolen");
    assert!(
        err.contains("its hard link target: an absolute path"),
        "{err}"
    );
    let err = f.refused(
        &[tar_of(&[E::Hard("stolen", "../../host/victim")])],
        0,
        "stolen",
    );
    assert!(err.contains("a `..` component"), "{err}");
    // Through a symlink a lower layer left.
    let host = f.host().to_string();
    let err = f.refused(
        &[
            tar_of(&[E::Sym("h", &host)]),
            tar_of(&[E::Hard("stolen", "h/victim")]),
        ],
        1,
        "stolen",
    );
    assert!(err.contains("leads out of the root"), "{err}");
    let links = std::fs::metadata(f.host.join("victim"))
        .expect("victim")
        .nlink();
    assert_eq!(links, 1, "no link to the host file was made");
}

#[test]
fn a_write_through_a_directory_symlink_is_refused() {
    let mut f = Fixture::new();
    let host = f.host().to_string();
    for layers in [
        vec![
            tar_of(&[E::Sym("etc", &host)]),
            tar_of(&[E::File("etc/passwd", b"root::0:0")]),
        ],
        vec![tar_of(&[
            E::Sym("etc", &host),
            E::File("etc/passwd", b"root::0:0"),
        ])],
    ] {
        let blame = layers.len() - 1;
        let err = f.refused(&layers, blame, "etc/passwd");
        assert!(err.contains("leads out of the root"), "{err}");
    }
    // A symlink, a directory and a hard link made through it: none lands on the host.
    for entry in [
        E::Sym("etc/evil", "/"),
        E::Dir("etc/newdir"),
        E::Hard("etc/link", "etc"),
    ] {
        let name = match entry {
            E::Sym(n, _) | E::Dir(n) | E::Hard(n, _) => n,
            _ => unreachable!(),
        };
        f.refused(
            &[tar_of(&[E::Sym("etc", &host)]), tar_of(&[entry])],
            1,
            name,
        );
    }
}

#[test]
fn absolute_and_dotdot_names_are_refused_and_quoted() {
    let mut f = Fixture::new();
    let target = format!("{}/planted", f.host());
    let err = f.refused(&[tar_of(&[E::File(&target, b"x")])], 0, &target);
    assert!(err.contains("an absolute path"), "{err}");
    for name in ["../planted", "a/../../planted", "./../host/planted"] {
        let err = f.refused(&[tar_of(&[E::File(name, b"x")])], 0, name);
        assert!(err.contains("a `..` component"), "{err}");
    }
    // A name with a newline and a right-to-left override is escaped in the message.
    let name = "/evil\u{202e}\nname";
    let err = f.refused(&[tar_of(&[E::File(name, b"x")])], 0, name);
    assert!(err.contains(r#""/evil\u{202e}\nname""#), "{err}");
    assert!(!f.host.join("planted").exists());
}

#[test]
fn a_type_change_through_a_symlink_is_refused_before_any_host_path_is_deleted() {
    let mut f = Fixture::new();
    let host = f.host().to_string();
    // The lower layer points `link` at the host; the upper one turns `link/sub` (a host
    // directory) into a file, and `link/victim` into a directory.
    for (entry, name) in [
        (E::File("link/sub", b"file now"), "link/sub"),
        (E::Dir("link/victim"), "link/victim"),
    ] {
        let err = f.refused(
            &[tar_of(&[E::Sym("link", &host)]), tar_of(&[entry])],
            1,
            name,
        );
        assert!(err.contains("leads out of the root"), "{err}");
    }
    assert_eq!(
        std::fs::read(f.host.join("sub/x")).expect("host sub dir kept"),
        b"host sub data"
    );
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    let mut f = Fixture::new();
    let err = f.refused(
        &[tar_of(&[E::File("ok", b"fine"), E::Char("dev/mem")])],
        0,
        "dev/mem",
    );
    assert!(err.contains("a device node"), "{err}");
    let err = f.refused(&[tar_of(&[E::Fifo("run/pipe")])], 0, "run/pipe");
    assert!(err.contains("a FIFO"), "{err}");
}

#[test]
fn a_setuid_file_is_refused_unless_the_option_strips_or_keeps_it() {
    let layers = [tar_of(&[
        E::Mode("bin/su", b"su", 0o4755),
        E::Mode("bin/wall", b"w", 0o2755),
    ])];
    let mut f = Fixture::new();
    let err = f.refused(&layers, 0, "bin/su");
    assert!(
        err.contains("a set-uid or set-gid file (mode 4755)"),
        "{err}"
    );
    assert!(err.contains("images.setuid"), "{err}");

    for (policy, su, wall) in [
        (SetuidPolicy::Strip, 0o755, 0o755),
        (SetuidPolicy::Keep, 0o4755, 0o2755),
    ] {
        let mut f = Fixture::with(ImageLimits {
            setuid: policy,
            ..ImageLimits::default()
        });
        let (source, _) = f.layout(&layers);
        let image = f.store.import(&source).expect("imports with the option");
        let mode = |p: &str| std::fs::metadata(image.rootfs.join(p)).expect(p).mode() & 0o7777;
        assert_eq!((mode("bin/su"), mode("bin/wall")), (su, wall), "{policy:?}");
    }
}

#[test]
fn a_gzip_bomb_is_stopped_at_the_bound_and_its_scratch_removed() {
    let small = ImageLimits {
        max_unpacked_bytes: 1 << 20,
        max_file_bytes: 512 << 10,
        max_entries: 100,
        max_path_bytes: 200,
        max_depth: 8,
        ..ImageLimits::default()
    };
    // 64 MiB of zeros in ~64 KiB of gzip, in one file and spread over several.
    let mut f = Fixture::with(ImageLimits {
        max_file_bytes: 1 << 30,
        ..small.clone()
    });
    let bomb = gzip(&tar_of(&[E::Zeros("zeros", 64 << 20)]));
    assert!(bomb.len() < 1 << 20, "the bomb is small: {}", bomb.len());
    let err = f.refused(&[bomb], 0, "zeros");
    assert!(
        err.contains("more than 1048576 bytes (images.max-unpacked)"),
        "{err}"
    );
    let spread: Vec<E<'_>> = ["a", "b", "c"]
        .iter()
        .map(|n| E::Zeros(n, 400 << 10))
        .collect();
    let err = f.refused(&[gzip(&tar_of(&spread))], 0, "c");
    assert!(err.contains("images.max-unpacked"), "{err}");

    let mut f = Fixture::with(small);
    let err = f.refused(&[gzip(&tar_of(&[E::Zeros("big", 600 << 10)]))], 0, "big");
    assert!(
        err.contains("over the bound of 524288 for one file (images.max-file)"),
        "{err}"
    );
    let names: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
    let many: Vec<E<'_>> = names.iter().map(|n| E::File(n, b"")).collect();
    let err = f.refused(&[tar_of(&many)], 0, "f100");
    assert!(
        err.contains("more than 100 entries (images.max-entries)"),
        "{err}"
    );
    // Entries count across layers.
    let half: Vec<E<'_>> = names[..60].iter().map(|n| E::File(n, b"")).collect();
    f.refused(&[tar_of(&half), tar_of(&half)], 1, "f40");
    let long = "d/".repeat(100) + "f";
    let err = f.refused(&[tar_of(&[E::Zeros(&long, 1)])], 0, &long);
    assert!(
        err.contains("201 bytes, over the bound of 200 (images.max-path)"),
        "{err}"
    );
    let deep = "d/".repeat(8) + "f";
    let err = f.refused(&[tar_of(&[E::Zeros(&deep, 1)])], 0, &deep);
    assert!(
        err.contains("9 components, over the bound of 8 (images.max-depth)"),
        "{err}"
    );
}

// ---- malicious layouts ----

#[test]
fn blobs_that_are_symlinks_to_dev_zero_or_out_of_the_layout_are_refused() {
    let mut f = Fixture::new();
    let (layout, _) = f.layout(&[tar_of(&[E::File("a", b"a")])]);
    let (m, c) = manifest_and_config(&layout);
    let blobs = layout.join("blobs/sha256");
    for (hex, target) in [(&m, "/dev/zero"), (&c, "../../../host/victim")] {
        let saved = std::fs::read(blobs.join(hex)).expect("blob");
        std::fs::remove_file(blobs.join(hex)).expect("rm");
        std::os::unix::fs::symlink(target, blobs.join(hex)).expect("symlink");
        let err = f.refused_source(&layout);
        assert!(
            err.starts_with(&format!("blob sha256:{hex}: "))
                && err.contains("is a symbolic link, not a regular file"),
            "{err}"
        );
        std::fs::remove_file(blobs.join(hex)).expect("rm");
        std::fs::write(blobs.join(hex), saved).expect("restore");
    }
    // index.json itself, and the blob directory pointing out of the layout.
    std::fs::rename(layout.join("index.json"), f.dir.path().join("index.json")).expect("mv");
    std::os::unix::fs::symlink("/dev/zero", layout.join("index.json")).expect("symlink");
    let err = f.refused_source(&layout);
    assert!(err.contains("index.json is a symbolic link"), "{err}");
    std::fs::remove_file(layout.join("index.json")).expect("rm");
    std::fs::rename(f.dir.path().join("index.json"), layout.join("index.json")).expect("mv");
    let outside = f.dir.path().join("elsewhere");
    std::fs::rename(layout.join("blobs"), &outside).expect("mv");
    std::os::unix::fs::symlink(&outside, layout.join("blobs")).expect("symlink");
    let err = f.refused_source(&layout);
    assert!(err.contains("leads out of the layout"), "{err}");
}

#[test]
fn a_fifo_blob_or_image_file_is_refused_without_blocking() {
    let mut f = Fixture::new();
    let (layout, digests) = f.layout(&[tar_of(&[E::File("a", b"a")])]);
    let fifo_at = |path: &Path| {
        let _ = std::fs::remove_file(path);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
    };
    fifo_at(&layout.join("blobs/sha256").join(&digests[0][7..]));
    let image_fifo = f.dir.path().join("image.tar");
    fifo_at(&image_fifo);
    // Nobody ever writes to these FIFOs: an import that opened one for reading would block
    // forever, so it runs on a thread and the test waits for its answer with a deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    let f = std::sync::Arc::new(f);
    let g = f.clone();
    std::thread::spawn(move || {
        let blob = g.refused_source(&layout);
        let file = g.refused_source(&image_fifo);
        let _ = tx.send((blob, file));
    });
    let (blob, file) = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("import of a FIFO returned instead of blocking");
    assert!(
        blob.starts_with(&format!("blob {}: ", digests[0]))
            && blob.contains("is a FIFO, not a regular file"),
        "{blob}"
    );
    assert!(
        file.contains("it is a FIFO, neither an OCI layout directory nor a tarball"),
        "{file}"
    );
}

#[test]
fn a_tampered_blob_or_a_non_layout_is_refused_by_name() {
    let mut f = Fixture::new();
    let (layout, digests) = f.layout(&[tar_of(&[E::File("a", b"a")])]);
    let path = layout.join("blobs/sha256").join(&digests[0][7..]);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[600] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let err = f.refused_source(&layout);
    assert!(
        err.starts_with(&format!(
            "blob {}: its content does not match its digest",
            digests[0]
        )),
        "{err}"
    );
    bytes.push(0);
    std::fs::write(&path, &bytes).expect("write");
    let err = f.refused_source(&layout);
    assert!(err.contains("but its descriptor says"), "{err}");
    let err = f.refused_source(f.dir.path());
    assert!(err.contains("no usable `oci-layout` file"), "{err}");
}

// ---- scratch and garbage collection ----

#[test]
fn scratch_left_by_a_killed_agent_is_removed_and_unused_images_are_collected() {
    let mut f = Fixture::new();
    let (one, _) = f.layout(&[tar_of(&[E::File("one", b"1")])]);
    let (two, _) = f.layout(&[tar_of(&[E::File("two", b"2")])]);
    let one = f.store.import(&one).expect("one").digest;
    let two = f.store.import(&two).expect("two").digest;
    // What a killed import and a killed removal leave: scratch directories with content,
    // one holding a symlink to the host that the cleanup must not follow.
    let killed = f.store.dir().join(".import-abc123/rootfs/etc");
    std::fs::create_dir_all(&killed).expect("mkdir");
    std::os::unix::fs::symlink(&f.host, killed.join("host")).expect("symlink");
    std::fs::create_dir_all(f.store.dir().join(".gc-dead/rootfs")).expect("mkdir");
    let host = snapshot(&f.host);
    let removed = f.store.remove_scratch().expect("scratch removed");
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert_eq!(snapshot(&f.host), host);
    let mut both = vec![one.clone(), two.clone()];
    both.sort();
    assert_eq!(f.store_names(), both);

    let in_use = BTreeSet::from([format!("sha256:{one}")]);
    assert_eq!(
        f.store.remove_unused(&in_use).expect("gc"),
        vec![two.clone()]
    );
    assert_eq!(f.store_names(), vec![one.clone()]);
    assert!(f.store.get(&two).is_none());
    assert!(f.store.get(&one).is_some());
}
