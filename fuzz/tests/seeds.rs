//! The seed inputs under `fuzz/seeds/<target>/`: what `scripts/fuzz` starts from and what the
//! stable pass mutates. They are written from the repository's own examples, built-in config
//! and board profiles, a signed desired state and bundle, and generator input for the
//! structured modes.
//!
//! `cargo test -p lichen-fuzz --test seeds -- --ignored` writes them again (after a format
//! changes); the test that always runs checks that every target has seeds.

use std::path::{Path, PathBuf};

use lichen_agent::hub::DesiredState;
use lichen_agent::hub::bundle::{self, BundleIndex, FORMAT};
use lichen_fuzz::harness::SplitMix64;
use lichen_fuzz::keys::{self, NODE};
use lichen_sync::Manifest;
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the fuzz crate sits in the repository")
        .to_path_buf()
}

#[test]
fn every_target_has_seeds() {
    for (name, _) in lichen_fuzz::targets::ALL {
        let seeds = lichen_fuzz::harness::inputs("seeds", name);
        assert!(
            seeds.len() >= 4,
            "fuzz/seeds/{name} has {} seeds; write them with `cargo test -p lichen-fuzz --test seeds -- --ignored`",
            seeds.len()
        );
    }
}

/// Generator input for a structured mode: the mode byte, then random bytes.
fn generated(mode: u8, index: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(0x5eed ^ (u64::from(mode) << 32) ^ index);
    let mut out = vec![mode];
    out.extend((0..len).map(|_| rng.next_u8()));
    out
}

fn with_mode(mode: u8, text: &[u8]) -> Vec<u8> {
    [&[mode][..], text].concat()
}

const CONTAINER: &str = r#"[[workloads]]
name = "vendor-tool"
kind = "container"
image = "vendor-oci"
args = ["--interval", "5"]
env = { MODE = "field" }
gpio = [{ name = "led", pin = "GPIO17", mode = "output" }]
[workloads.limits]
memory = "32MiB"
cpus = 0.5
pids = 64
"#;

const MICROVM: &str = r#"[[workloads]]
name = "vm"
kind = "microvm"
kernel = "vmlinuz"
initramfs = "initrd.cpio.gz"
vcpus = 1
cmdline = "quiet"
ready-marker = "LICHEN-READY"
boot-timeout = "60s"
[workloads.limits]
memory = "128MiB"
"#;

const GRANTS: &str = r#"description = "grants on the simulated board"
[[workloads]]
name = "blinky"
module = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
restart = "always"
triggers = [{ interval = "500ms" }, { gpio-edge = "button", edge = "falling", debounce = "5ms" }]
gpio = [
  { name = "led", pin = "GPIO17", mode = "output", initial = "low" },
  { name = "button", pin = "GPIO27", mode = "input", bias = "pull-up", edge = "falling", debounce = "5ms" },
]
spi = [{ name = "adc", bus = "spi0.0", max-hz = 1000000 }]
i2c = [{ name = "env", bus = "i2c-1", addresses = [0x48, 0x76] }]
[workloads.config]
step = 2
[workloads.limits]
memory = "16MiB"
time-slice = "100ms"
queue = 64
"#;

const HUB_CONFIG: &str = r#"board = "sim"
[wasm]
max-instances = 64
max-memory = "16MiB"
memory-guard = "64KiB"
[logs]
ring-lines = 100
lines-per-second = 10.0
burst = 20.0
persisted-lines = 100
level = "debug"
[hub]
url = "mqtt://127.0.0.1:1883"
node-id = "node-1"
username = "node-1"
password = "secret"
trusted-keys = ["6a5f1c8e3b2d4f7a9c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f1a3c5e7b9d1f3a"]
outbox-quota = "16MiB"
"#;

fn deployments() -> Vec<String> {
    let mut texts = vec![CONTAINER.to_owned(), MICROVM.to_owned(), GRANTS.to_owned()];
    for file in ["examples/deploy.toml", "examples/devices.toml"] {
        texts.push(std::fs::read_to_string(repo().join(file)).expect("an example deployment"));
    }
    texts
}

fn signed_envelope(version: u64, deployment: &str) -> Vec<u8> {
    let (signature, key_id) = keys::sign(NODE, version, deployment);
    serde_json::to_vec(&json!({
        "id": "hub:7",
        "ts": 1_767_225_600_000u64,
        "payload": {
            "version": version,
            "deployment": deployment,
            "signature": signature,
            "key-id": key_id,
        },
    }))
    .expect("JSON")
}

fn signed_bundle_tar() -> Vec<u8> {
    let module = b"module 1".to_vec();
    let digest = lichen_sync::sha256_hex(&module);
    let deployment = format!("[[workloads]]\nname = \"w\"\nmodule = \"sha256:{digest}\"\n");
    let mut desired = DesiredState {
        version: 2,
        deployment,
        artifacts: [(digest.clone(), module.len() as u64)].into(),
        precompiled: Vec::new(),
        system: None,
        signature: None,
        key_id: None,
    };
    let (signature, key_id) = keys::sign_desired(NODE, &desired);
    desired.signature = Some(signature);
    desired.key_id = Some(key_id);
    let index = BundleIndex {
        format: FORMAT.to_owned(),
        node: NODE.to_owned(),
        desired,
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("b.tar");
    bundle::write(&out, &index, &[(digest, &module[..])]).expect("writing a bundle");
    std::fs::read(out).expect("reading it back")
}

/// One tar entry: path, type, link target, content, mode.
type Entry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8], u32);

fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, kind, link, data, mode) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        header.set_path(path).expect("a path");
        if !link.is_empty() {
            header.set_link_name(link).expect("a link name");
        }
        header.set_cksum();
        tar.append(&header, *data).expect("a tar in memory");
    }
    tar.into_inner().expect("a tar in memory")
}

fn sha(bytes: &[u8]) -> String {
    lichen_sync::sha256_hex(bytes)
}

/// The `oci_image` raw-layout form (mode 5): an OCI layout tarball with these layers, every
/// digest right.
fn oci_tarball(layers: &[Vec<u8>]) -> Vec<u8> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut descs = Vec::new();
    for layer in layers {
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{}", sha(layer)),
            "size": layer.len(),
        }));
        blobs.push((sha(layer), layer.clone()));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:{}", sha(l))).collect::<Vec<_>>()},
    }))
    .expect("JSON");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(&config)), "size": config.len()},
        "layers": descs,
    }))
    .expect("JSON");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha(&manifest)), "size": manifest.len()}],
    }))
    .expect("JSON");
    blobs.push((sha(&config), config));
    blobs.push((sha(&manifest), manifest));
    let marker = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut entries: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), marker.to_vec()),
        ("index.json".into(), index),
    ];
    for (hex, bytes) in blobs {
        entries.push((format!("blobs/sha256/{hex}"), bytes));
    }
    let borrowed: Vec<Entry<'_>> = entries
        .iter()
        .map(|(p, b)| (p.as_str(), tar::EntryType::Regular, "", b.as_slice(), 0o644))
        .collect();
    with_mode(5, &tar_of(&borrowed))
}

#[test]
#[ignore = "writes fuzz/open/oci_image/ and fuzz/regressions/oci_image/; run it by hand to make them again"]
fn write_oci_reproducers() {
    use tar::EntryType::{Regular, Symlink};
    let link_to_outside = tar_of(&[("etc", Symlink, "/outside", b"", 0o777)]);
    let link_to_outside_dir = tar_of(&[("etc", Symlink, "/outside/dir", b"", 0o777)]);
    let cases = [
        (
            "open",
            "whiteout-through-symlink-deletes-outside",
            oci_tarball(&[
                link_to_outside.clone(),
                tar_of(&[
                    (".wh.x", Regular, "", b"", 0o644),
                    ("etc/.wh.victim", Regular, "", b"", 0o644),
                ]),
            ]),
        ),
        (
            "open",
            "opaque-whiteout-through-symlink-empties-outside",
            oci_tarball(&[
                link_to_outside_dir,
                tar_of(&[("etc/.wh..wh..opq", Regular, "", b"", 0o644)]),
            ]),
        ),
        (
            "regressions",
            "file-through-symlink-writes-outside",
            oci_tarball(&[
                link_to_outside,
                tar_of(&[("etc/planted", Regular, "", b"planted", 0o644)]),
            ]),
        ),
        (
            "open",
            "setuid-file-kept",
            oci_tarball(&[tar_of(&[("bin/su", Regular, "", b"#!/bin/sh\n", 0o4755)])]),
        ),
    ];
    for (kind, name, bytes) in cases {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(kind)
            .join("oci_image");
        std::fs::create_dir_all(&dir).expect("creating the reproducer directory");
        std::fs::write(dir.join(name), bytes).expect("writing a reproducer");
    }
}

#[test]
#[ignore = "writes fuzz/open/bundle/; run it by hand to make it again"]
fn write_bundle_reproducers() {
    // A directory bundle whose artifact is a FIFO: reading it never ends.
    let tar = signed_bundle_tar();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut builder = tar::Builder::new(Vec::new());
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("an entry");
        let header = entry.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).expect("reading");
        builder.append(&header, &data[..]).expect("appending");
    }
    let mut fifo = tar::Header::new_gnu();
    fifo.set_entry_type(tar::EntryType::Fifo);
    fifo.set_path("artifacts/x").expect("a path");
    fifo.set_mode(0o644);
    fifo.set_uid(0);
    fifo.set_gid(0);
    fifo.set_mtime(1_700_000_000);
    fifo.set_size(0);
    fifo.set_cksum();
    builder.append(&fifo, &[][..]).expect("appending");
    let bytes = with_mode(2, &builder.into_inner().expect("a tar"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("open/bundle");
    std::fs::create_dir_all(&dir).expect("creating fuzz/open/bundle");
    std::fs::write(dir.join("fifo-member-hangs-read"), bytes).expect("writing");
}

/// A QoS 1 PUBLISH with packet id `pkid`.
fn publish(topic: &str, pkid: u16, payload: Vec<u8>) -> rumqttc::Publish {
    let mut p = rumqttc::Publish::new(topic, rumqttc::QoS::AtLeastOnce, payload);
    p.pkid = pkid;
    p
}

fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut toml = Vec::new();
    let mut json = Vec::new();
    for text in deployments() {
        toml.push(with_mode(0, text.as_bytes()));
        let value: toml::Value = toml::from_str(&text).expect("the examples are TOML");
        json.push(with_mode(
            0,
            serde_json::to_string_pretty(&value)
                .expect("TOML as JSON")
                .as_bytes(),
        ));
    }
    for i in 0..12u8 {
        toml.push(generated(1, u64::from(i), 64 + 32 * usize::from(i)));
        json.push(generated(1, u64::from(i), 64 + 32 * usize::from(i)));
    }

    let mut config = vec![
        with_mode(0, lichen_agent::config::DEFAULT_CONFIG.as_bytes()),
        with_mode(0, HUB_CONFIG.as_bytes()),
        with_mode(
            0,
            &std::fs::read(repo().join("images/test-guest/lichen.toml")).expect("a config"),
        ),
    ];
    let mut boards: Vec<_> = std::fs::read_dir(repo().join("boards"))
        .expect("boards/")
        .flatten()
        .map(|e| e.path())
        .collect();
    boards.sort();
    for board in boards {
        config.push(with_mode(
            2,
            &std::fs::read(board).expect("a board profile"),
        ));
    }
    for i in 0..6 {
        config.push(generated(1, i, 96));
    }
    for i in 0..4 {
        config.push(generated(3, i, 96));
    }

    let original: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let (manifest, chunks) = Manifest::split(&original, 1024);
    let mut hub = vec![
        with_mode(0, &signed_envelope(3, GRANTS)),
        with_mode(
            0,
            &signed_envelope(1, "[[workloads]]\nname = \"w\"\nmodule = \"w.wasm\"\n"),
        ),
        with_mode(
            1,
            br#"{"id":"hub:9","ts":1,"payload":{"command":"status","payload":"now"}}"#,
        ),
        with_mode(
            2,
            &serde_json::to_vec(&json!({"id": "hub:1", "ts": 1, "payload": manifest}))
                .expect("JSON"),
        ),
        [&[3u8, 1][..], chunks[1]].concat(),
    ];
    let topic = b"lichen/v1/node-1/cmd/w";
    hub.push(
        [
            &[4u8, u8::try_from(topic.len()).unwrap()][..],
            topic,
            br#"{"id":"hub:2","ts":5,"payload":{"command":"x"}}"#,
        ]
        .concat(),
    );
    for mode in [8u8, 9, 10, 11, 12] {
        for i in 0..3 {
            hub.push(generated(mode, i, 128));
        }
    }

    // The broker's byte stream: a PUBLISH within the limit, one over it, a ping.
    let mut stream = Vec::new();
    for packet in [
        rumqttc::Packet::Publish(publish(
            "lichen/v1/node-1/cmd/w",
            1,
            br#"{"id":"hub:2","ts":5,"payload":{"command":"x"}}"#.to_vec(),
        )),
        rumqttc::Packet::Publish(publish("lichen/v1/node-1/desired", 2, vec![b'{'; 5000])),
        rumqttc::Packet::PingResp,
    ] {
        let mut buf = bytes::BytesMut::new();
        packet.write(&mut buf, usize::MAX).expect("encodes");
        stream.extend_from_slice(&buf);
    }
    let mut mqtt = vec![
        [&[0u8, 5, 1, 7][..], &stream].concat(),
        [&[0u8, 3, 2, 200, 1][..], &stream].concat(),
    ];
    for i in 0..10 {
        mqtt.push(generated(1, i, 96));
    }

    let mut bundles = vec![
        with_mode(0, &signed_bundle_tar()),
        with_mode(2, &signed_bundle_tar()),
    ];
    for i in 0..8 {
        bundles.push(generated(1, i, 160));
    }

    let mut oci = vec![
        oci_tarball(&[tar_of(&[
            ("bin", tar::EntryType::Directory, "", b"", 0o755),
            (
                "bin/hello",
                tar::EntryType::Regular,
                "",
                b"#!/bin/sh\necho hello\n",
                0o755,
            ),
            ("sh", tar::EntryType::Symlink, "bin/hello", b"", 0o777),
        ])]),
        oci_tarball(&[
            tar_of(&[("etc/a", tar::EntryType::Regular, "", b"a", 0o644)]),
            tar_of(&[("etc/.wh.a", tar::EntryType::Regular, "", b"", 0o644)]),
        ]),
    ];
    for mode in 0..5u8 {
        for i in 0..5 {
            oci.push(generated(mode, i, 256));
        }
    }

    let host: Vec<Vec<u8>> = (0..10)
        .map(|i| generated(0, i, 200)[1..].to_vec())
        .collect();
    let store: Vec<Vec<u8>> = (0..8).map(|i| generated(0, i, 300)[1..].to_vec()).collect();

    vec![
        ("deployment_toml", toml),
        ("deployment_json", json),
        ("agent_config", config),
        ("hub_message", hub),
        ("mqtt_guard", mqtt),
        ("bundle", bundles),
        ("oci_image", oci),
        ("host_calls", host),
        ("store", store),
    ]
}

#[test]
#[ignore = "writes fuzz/seeds/; run it by hand after a format changes"]
fn write_seeds() {
    lichen_fuzz::harness::install_hook();
    for (name, inputs) in seeds() {
        // A seed is an input the code handles today: the pass replays seeds and must pass,
        // so generated candidates that hit a known open failure are left out.
        let (_, target) = lichen_fuzz::targets::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a target of that name");
        let inputs: Vec<Vec<u8>> = inputs
            .into_iter()
            .filter(|input| std::panic::catch_unwind(|| target(input)).is_ok())
            .collect();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the seed directory");
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), input).expect("writing a seed");
        }
    }
}
