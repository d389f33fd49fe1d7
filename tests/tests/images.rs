//! OCI images from an untrusted vendor, deployed through the real daemon: a layer that reaches
//! for the host through a symlink is refused with the layer and entry named, nothing of the
//! deployment is applied, the host directory is intact and the image store holds nothing; the
//! `[images]` section of the agent config reaches the store (set-uid files stripped when it
//! says so, and the stripped image runs under the real OCI runtime); images no deployment uses
//! any more are removed after the next deploy and at start. Needs root and runc
//! (`scripts/install-deps`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, output_text};
use sha2::Digest as _;

/// Fails the test when no OCI runtime works: the refusal must be seen on the container path.
fn require_oci_runtime() {
    let probe = lichen_agent::runtime::container::probe_cached();
    assert!(
        probe.usable_runtime().is_some(),
        "these tests need a working runc or crun (scripts/install-deps): {}",
        probe.runtime_summary()
    );
}

/// One tar entry of a layer.
enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Sym(&'a str, &'a str),
}

fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_000_000);
        match *e {
            E::File(name, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(mode);
                b.append_data(&mut h, name, data).expect("append");
            }
            E::Sym(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, name, target).expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

/// Writes an OCI layout of `layers` at `dir`; returns the layers' digests.
fn layout(dir: &Path, layers: &[Vec<u8>], entrypoint: &[&str]) -> Vec<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs dir");
    let put = |bytes: &[u8], media: &str| -> serde_json::Value {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("write blob");
        serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    };
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| put(l, "application/vnd.oci.image.layer.v1.tar"))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let config = put(
        &serde_json::to_vec(&config).expect("json"),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descs
    });
    let manifest = put(
        &serde_json::to_vec(&manifest).expect("json"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [manifest]}))
            .expect("json"),
    )
    .expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    descs
        .iter()
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// Every path under `dir` with its type, mode and content.
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
            } else {
                format!("{:?}", std::fs::read(&path).expect("read"))
            };
            out.insert(path, format!("{what} {:o}", meta.mode()));
        }
    }
    out
}

/// Names in the daemon's image store (none if it was never created).
fn store(daemon: &Daemon) -> Vec<String> {
    std::fs::read_dir(daemon.state_dir().join("images"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn busybox() -> Vec<u8> {
    let path = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("busybox"))
                .find(|b| b.is_file())
        })
        .expect("busybox-static is installed (scripts/install-deps)");
    std::fs::read(path).expect("read busybox")
}

#[test]
fn a_layer_reaching_the_host_through_a_symlink_is_refused_and_nothing_is_applied() {
    require_oci_runtime();
    let daemon = Daemon::start().expect("daemon starts");
    let good = format!(
        "[[workloads]]\nname = \"counter\"\nmodule = \"{}\"\n",
        guest("counter").display()
    );
    let out = daemon.deploy("good.toml", &good);
    assert!(out.status.success(), "{}", output_text(&out));
    let before = daemon.status("counter").expect("counter runs");

    // A host directory the image points at, outside the daemon's state.
    let outside = tempfile::tempdir().expect("temp dir");
    let host = outside.path().join("host-etc");
    std::fs::create_dir_all(host.join("ssh")).expect("mkdir");
    std::fs::write(host.join("victim"), "host data").expect("write");
    std::fs::write(host.join("ssh/key"), "host key").expect("write");
    let host_before = snapshot(&host);
    let host_str = host.to_str().expect("utf-8 temp path");
    let digests = layout(
        &daemon.dir.path().join("evil-oci"),
        &[
            layer(&[E::Sym("etc", host_str)]),
            layer(&[
                E::File("etc/.wh.victim", b"", 0o644),
                E::File("etc/.wh..wh..opq", b"", 0o644),
                E::File("etc/planted", b"planted", 0o644),
            ]),
        ],
        &["/bin/true"],
    );

    let text = format!(
        "{good}\n[[workloads]]\nname = \"evil\"\nkind = \"container\"\nimage = \"evil-oci\"\nrestart = \"never\"\n"
    );
    let out = daemon.deploy("evil.toml", &text);
    let message = output_text(&out);
    assert!(!out.status.success(), "{message}");
    assert_eq!(
        snapshot(&host),
        host_before,
        "the host directory changed: {message}"
    );
    assert!(
        message.contains(&format!(
            "layer {} entry \"etc/.wh.victim\": cannot open \"etc\" inside the root: the path leads out of the root",
            digests[1]
        )),
        "{message}"
    );
    assert!(message.contains("image"), "the field is named: {message}");

    // Nothing changed: the running deployment, the image store.
    let rows = daemon.ps();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].deployment_version, before.deployment_version);
    assert_eq!(store(&daemon), Vec::<String>::new());

    // A set-uid file is refused by default, naming the config key that allows it.
    let digests = layout(
        &daemon.dir.path().join("setuid-oci"),
        &[layer(&[E::File("bin/su", b"su", 0o4755)])],
        &["/bin/su"],
    );
    let text = format!(
        "{good}\n[[workloads]]\nname = \"su\"\nkind = \"container\"\nimage = \"setuid-oci\"\nrestart = \"never\"\n"
    );
    let message = output_text(&daemon.deploy("su.toml", &text));
    assert!(
        message.contains(&format!(
            "layer {} entry \"bin/su\": a set-uid or set-gid file (mode 4755) is refused; set images.setuid",
            digests[0]
        )),
        "{message}"
    );
    assert_eq!(store(&daemon), Vec::<String>::new());
    assert_eq!(daemon.ps().len(), 1);
}

#[test]
fn the_images_config_reaches_the_store_and_a_stripped_image_runs() {
    require_oci_runtime();
    let config_dir = tempfile::tempdir().expect("temp dir");
    let config = config_dir.path().join("lichen.toml");
    std::fs::write(&config, "[images]\nsetuid = \"strip\"\n").expect("write config");
    let daemon = Daemon::start_with(&["--config", config.to_str().expect("utf-8")], None)
        .expect("daemon starts");
    let busybox = busybox();
    layout(
        &daemon.dir.path().join("su-oci"),
        &[
            layer(&[
                E::File("bin/busybox", &busybox, 0o755),
                E::Sym("bin/sh", "busybox"),
            ]),
            layer(&[E::File("bin/su", b"su", 0o4755)]),
        ],
        &["/bin/sh", "-c", "echo stripped image runs"],
    );
    let text = "[[workloads]]\nname = \"su\"\nkind = \"container\"\nimage = \"su-oci\"\nrestart = \"never\"\n";
    let out = daemon.deploy("su.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = daemon.wait_for("su", "completed", |s| s.state == WorkloadState::Completed);
    assert_eq!(status.exit_code, Some(0));
    let logs = output_text(&daemon.cli(&["logs", "su"]));
    assert!(logs.contains("[stdout] stripped image runs"), "{logs}");
    let digest = status.module_digest.trim_start_matches("sha256:");
    let su = daemon
        .state_dir()
        .join("images")
        .join(digest)
        .join("rootfs/bin/su");
    let mode = std::fs::metadata(&su).expect("bin/su imported").mode() & 0o7777;
    assert_eq!(mode, 0o755, "set-uid bit stripped");

    // An agent killed mid-import leaves a scratch directory (here holding a symlink to a
    // directory outside): the next start removes it without following the symlink, and keeps
    // the stored image.
    let mut daemon = daemon;
    daemon.kill9().expect("kill -9");
    let outside = tempfile::tempdir().expect("temp dir");
    std::fs::write(outside.path().join("keep"), "outside").expect("write");
    let scratch = daemon.state_dir().join("images/.import-killed");
    std::fs::create_dir_all(scratch.join("rootfs/etc")).expect("mkdir");
    std::os::unix::fs::symlink(outside.path(), scratch.join("rootfs/etc/out")).expect("symlink");
    daemon.restart().expect("daemon restarts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while scratch.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the scratch directory is still there 60 s after the restart:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(outside.path().join("keep").is_file());
    assert!(su.is_file(), "the stored image is kept");
}

/// A small image: busybox, plus `/name` holding `name` so each one has its own digest.
fn named_image(daemon: &Daemon, name: &str, busybox: &[u8]) -> PathBuf {
    let dir = daemon.dir.path().join(format!("{name}-oci"));
    layout(
        &dir,
        &[layer(&[
            E::File("bin/busybox", busybox, 0o755),
            E::Sym("bin/sh", "busybox"),
            E::File("name", name.as_bytes(), 0o644),
        ])],
        &["/bin/sh", "-c", "cat /name"],
    );
    dir
}

fn container(name: &str) -> String {
    format!(
        "[[workloads]]\nname = \"{name}\"\nkind = \"container\"\nimage = \"{name}-oci\"\n\
         restart = \"never\"\n"
    )
}

/// The digest (hex) of the image workload `name` runs, once it has completed.
fn image_of(daemon: &Daemon, name: &str) -> String {
    let status = daemon.wait_for(name, "completed", |s| s.state == WorkloadState::Completed);
    assert_eq!(status.exit_code, Some(0), "{}", daemon.log());
    status
        .module_digest
        .trim_start_matches("sha256:")
        .to_string()
}

#[test]
fn images_no_deployment_uses_are_removed_after_the_next_deploy_and_at_start() {
    require_oci_runtime();
    let mut daemon = Daemon::start().expect("daemon starts");
    let busybox = busybox();
    named_image(&daemon, "a", &busybox);
    named_image(&daemon, "b", &busybox);
    let both = format!("{}{}", container("a"), container("b"));
    let out = daemon.deploy("both.toml", &both);
    assert!(out.status.success(), "{}", output_text(&out));
    let (a, b) = (image_of(&daemon, "a"), image_of(&daemon, "b"));
    assert_ne!(a, b);
    let mut stored = store(&daemon);
    stored.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(stored, expected, "both images are imported");

    // The next deployment runs only `b`: `a`'s image is gone once the deploy returns.
    let out = daemon.deploy("b.toml", &container("b"));
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(store(&daemon), vec![b.clone()], "{}", daemon.log());
    assert_eq!(image_of(&daemon, "b"), b);

    // An image imported by an agent killed before its deployment was committed (here imported
    // into the stopped agent's store by the same code the agent uses) is removed at the next
    // start; the one the applied deployment uses stays.
    daemon.kill9().expect("kill -9");
    let c = named_image(&daemon, "c", &busybox);
    let images =
        lichen_agent::runtime::container::ImageStore::new(daemon.state_dir().join("images"));
    let orphan = images.import(&c).expect("image c imports").digest;
    let orphan = orphan.trim_start_matches("sha256:").to_string();
    let mut stored = store(&daemon);
    stored.sort();
    let mut expected = vec![b.clone(), orphan.clone()];
    expected.sort();
    assert_eq!(stored, expected, "c is in the store before the restart");
    daemon.restart().expect("daemon restarts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store(&daemon).contains(&orphan) {
        assert!(
            std::time::Instant::now() < deadline,
            "the unused image is still there 60 s after the restart:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(store(&daemon), vec![b.clone()]);
    let status = daemon.status("b").expect("b is still deployed");
    assert_eq!(status.module_digest.trim_start_matches("sha256:"), b);
    // With no container left in the deployment, no image is kept.
    let text = lichen_tests::one_workload("counter", &guest("counter"), "");
    let out = daemon.deploy("wasm.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(store(&daemon), Vec::<String>::new(), "{}", daemon.log());
}
