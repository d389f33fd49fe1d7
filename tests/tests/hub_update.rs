//! System updates pushed by the hub, with a real Mosquitto and the real agent on a board whose
//! slots are files and whose boot state is a GRUB environment block made by Debian's
//! `grub-editenv` (no reboot: the reboot command touches a file). A pushed update lands in the
//! inactive slot armed to try once, and after the (simulated) reboot the health check commits
//! it and the deployment applies; bad pushes change nothing and name the field; a transfer cut
//! by a broker restart and an agent kill resumes.
//!
//! Not under QEMU: a board image's config has no `[hub]` (images/build would need one per
//! broker port, each a separate cached image) and the guest would need a route to the host's
//! broker; what the QEMU runs add over this file (the real reboot, GRUB reading the armed state)
//! is already covered by `lichen update` in tests/tests/image.rs, which shares every step after
//! the bundle is on disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lichen_agent::hub::update::{MAX_SYSTEM_BUNDLE_SIZE, SystemUpdate};
use lichen_tests::broker::{Mosquitto, PERSISTENT, Seen, Watcher};
use lichen_tests::{Daemon, guest, lichen, one_workload, output_text};
use serde_json::{Value, json};

const NODE: &str = "n1";
/// Size of each slot file.
const SLOT_SIZE: usize = 1 << 20;

fn topic(suffix: &str) -> String {
    format!("lichen/v1/{NODE}/{suffix}")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A board: keys, slot files, boot state, the agent config with `[hub]` and `[update]`.
struct Board {
    dir: tempfile::TempDir,
    config: PathBuf,
    deployment: PathBuf,
}

impl Board {
    fn new(broker: &Mosquitto) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for name in ["trusted", "untrusted"] {
            let out = lichen(&["hub", "keygen", path(&d.join(name))]);
            assert!(out.status.success(), "keygen: {}", output_text(&out));
        }
        let public = std::fs::read_to_string(d.join("trusted.pub")).expect("public key");
        for slot in ["slot-a", "slot-b"] {
            std::fs::write(d.join(slot), vec![0u8; SLOT_SIZE]).expect("slot file");
        }
        std::fs::write(
            d.join("cmdline"),
            "console=ttyS0 lichen.slot=A lichen.root=rootfs-a\n",
        )
        .expect("cmdline");
        std::fs::write(
            d.join("system.json"),
            r#"{"version": "1", "target": "x86_64"}"#,
        )
        .expect("system.json");
        for name in ["grubenv", "grubenv.bak"] {
            for args in [
                vec!["create"],
                vec!["set", "BOOT_ORDER=A B", "BOOT_A_LEFT=3", "BOOT_B_LEFT=3"],
            ] {
                let out = std::process::Command::new("grub-editenv")
                    .arg(d.join(name))
                    .args(&args)
                    .output()
                    .expect("grub-editenv (grub-common, scripts/install-deps) runs");
                assert!(out.status.success(), "grub-editenv: {}", output_text(&out));
            }
        }
        let p = |name: &str| path(&d.join(name)).to_owned();
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[hub]\nurl = \"{}\"\nnode-id = \"{NODE}\"\ntrusted-keys = [\"{}\"]\n\n\
                 [update]\ntarget = \"x86_64\"\nboot = \"grub\"\nboot-state = [\"{}\", \"{}\"]\n\
                 slots = {{ A = \"{}\", B = \"{}\" }}\ncmdline = \"{}\"\nsystem-file = \"{}\"\n\
                 confirm-file = \"{}\"\nhealth-deadline = \"10s\"\nreboot-command = [\"touch\", \"{}\"]\n",
                broker.url(),
                public.trim(),
                p("grubenv"),
                p("grubenv.bak"),
                p("slot-a"),
                p("slot-b"),
                p("cmdline"),
                p("system.json"),
                p("confirmed"),
                p("rebooted"),
            ),
        )
        .expect("config");
        let deployment = d.join("counter.toml");
        std::fs::write(
            &deployment,
            one_workload(
                "counter",
                &guest("counter"),
                "triggers = [{ interval = \"100ms\" }]\n[workloads.config]\nstep = \"1\"",
            ),
        )
        .expect("deployment");
        Board {
            dir,
            config,
            deployment,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn daemon(&self) -> Daemon {
        Daemon::start_with(
            &[
                "--config",
                path(&self.config),
                "--deploy",
                path(&self.deployment),
            ],
            None,
        )
        .expect("daemon starts")
    }

    /// A root image of `len` bytes (any bytes: the slot writer does not read the file
    /// system) and its bundle at `version`, signed with the trusted key.
    fn bundle(&self, version: &str, len: usize) -> (Vec<u8>, PathBuf) {
        // A byte pattern: the low byte of a counter (truncation is the point).
        let image: Vec<u8> = (0..len).map(|i| (i * 7 + len).to_le_bytes()[0]).collect();
        let rootfs = self.file(&format!("rootfs-{version}.img"));
        std::fs::write(&rootfs, &image).expect("rootfs image");
        let out = self.file(&format!("v{version}.lub"));
        let made = lichen(&[
            "hub",
            "update-bundle",
            path(&rootfs),
            "--system-version",
            version,
            "--target",
            "x86_64",
            "--key",
            path(&self.file("trusted")),
            "--out",
            path(&out),
        ]);
        assert!(
            made.status.success(),
            "update-bundle: {}",
            output_text(&made)
        );
        (image, out)
    }

    /// The grub environment as `grub-editenv list` prints it.
    fn boot_state(&self) -> String {
        let out = std::process::Command::new("grub-editenv")
            .arg(self.file("grubenv"))
            .arg("list")
            .output()
            .expect("grub-editenv list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything a refused update must leave alone.
    fn untouched(&self, daemon: &Daemon) {
        let slot_b = std::fs::read(self.file("slot-b")).expect("slot b");
        assert!(slot_b.iter().all(|&b| b == 0), "slot B was written");
        let env = self.boot_state();
        assert!(
            env.contains("BOOT_ORDER=A B")
                && env.contains("BOOT_A_LEFT=3")
                && env.contains("BOOT_B_LEFT=3"),
            "{env}"
        );
        assert!(!self.file("rebooted").exists(), "a reboot was requested");
        let journal = daemon.state_dir().join("update/journal.json");
        if let Ok(text) = std::fs::read_to_string(&journal) {
            let j: Value = serde_json::from_str(&text).expect("journal is JSON");
            assert!(j["pending"].is_null(), "an update is pending: {j}");
        }
    }
}

/// Waits for a reported state that `want` accepts; returns its payload.
fn reported(watcher: &Watcher, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let seen = watcher.wait_for(what, Duration::from_secs(60), |m: &Seen| {
        m.topic == topic("reported") && want(&m.json()["payload"])
    });
    seen.json()["payload"].clone()
}

/// Waits for a file to appear (the reboot command's mark), with a deadline.
fn wait_for_file(file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A desired state at `version` naming `system`, signed with key `key`, as a message.
fn desired_message(board: &Board, version: u64, system: SystemUpdate, key: &str) -> String {
    let text = std::fs::read_to_string(&board.deployment).expect("deployment");
    let mut desired = lichen_agent::hub::DesiredState {
        version,
        deployment: text,
        artifacts: Default::default(),
        precompiled: Vec::new(),
        system: Some(system),
        signature: None,
        key_id: None,
    };
    let (signature, key_id) = lichen_agent::hub::sign_desired(
        &std::fs::read(board.file(key)).expect("key file"),
        NODE,
        &desired,
    )
    .expect("signs");
    desired.signature = Some(signature);
    desired.key_id = Some(key_id);
    json!({"id": format!("operator:{version}"), "ts": 1, "payload": desired}).to_string()
}

fn describe(bytes: &[u8], version: &str) -> SystemUpdate {
    SystemUpdate {
        version: version.into(),
        target: "x86_64".into(),
        size: bytes.len() as u64,
        sha256: lichen_sync::sha256_hex(bytes),
    }
}

fn hub_update(r: &Value) -> &Value {
    &r["system"]["hub-update"]
}

#[test]
fn an_update_pushed_by_lichen_hub_deploy_is_written_armed_and_then_committed() {
    let broker = Mosquitto::start_with(PERSISTENT);
    let board = Board::new(&broker);
    let watcher = Watcher::connect(broker.port, "t-push", &topic("reported"));
    let mut daemon = board.daemon();
    reported(&watcher, "slot A, version 1", |r| {
        r["system"]["booted-slot"] == "A" && r["system"]["version"] == "1"
    });

    let (image, bundle) = board.bundle("2", 300 * 1024);
    let out = lichen(&[
        "hub",
        "deploy",
        "--url",
        &broker.url(),
        "--node",
        NODE,
        path(&board.deployment),
        "--key",
        path(&board.file("trusted")),
        "--version",
        "2",
        "--update",
        path(&bundle),
        "--chunk-size",
        "16KiB",
    ]);
    assert!(out.status.success(), "hub deploy: {}", output_text(&out));

    let r = reported(&watcher, "the update armed", |r| {
        hub_update(r)["phase"] == "armed"
    });
    assert_eq!(hub_update(&r)["version"], "2", "{r}");
    assert_eq!(r["system"]["update-in-progress"]["phase"], "armed", "{r}");
    assert_eq!(r["system"]["update-in-progress"]["slot"], "B", "{r}");
    assert!(
        r["applied-version"].is_null(),
        "the deployment waits for the new system: {r}"
    );
    let slot_b = std::fs::read(board.file("slot-b")).expect("slot b");
    assert_eq!(&slot_b[..image.len()], &image[..], "slot B holds the image");
    let env = board.boot_state();
    assert!(
        env.contains("BOOT_ORDER=B A") && env.contains("BOOT_B_LEFT=1"),
        "boot state tries B once: {env}"
    );
    assert!(
        std::fs::read(board.file("slot-a"))
            .expect("slot a")
            .iter()
            .all(|&b| b == 0),
        "the running slot is not touched"
    );
    wait_for_file(&board.file("rebooted"));

    // The "reboot": the boot loader took B's try; the new root says version 2.
    daemon.stop().expect("daemon stops");
    std::fs::write(
        board.file("cmdline"),
        "console=ttyS0 lichen.slot=B lichen.root=rootfs-b\n",
    )
    .expect("cmdline");
    std::fs::write(
        board.file("system.json"),
        r#"{"version": "2", "target": "x86_64"}"#,
    )
    .expect("system.json");
    for name in ["grubenv", "grubenv.bak"] {
        let out = std::process::Command::new("grub-editenv")
            .arg(board.file(name))
            .args(["set", "BOOT_B_LEFT=0"])
            .output()
            .expect("grub-editenv");
        assert!(out.status.success(), "{}", output_text(&out));
    }
    daemon.restart().expect("daemon restarts");
    let r = reported(
        &watcher,
        "version 2 committed and the deployment applied",
        |r| r["system"]["last-update"]["result"] == "committed" && r["applied-version"] == 2,
    );
    assert_eq!(r["system"]["booted-slot"], "B", "{r}");
    assert_eq!(r["system"]["version"], "2", "{r}");
}

#[test]
fn a_bundle_transfer_cut_by_a_broker_restart_and_an_agent_kill_resumes() {
    let mut broker = Mosquitto::start_with(PERSISTENT);
    let board = Board::new(&broker);
    let watcher = Watcher::connect(broker.port, "t-resume", &topic("reported"));
    let mut daemon = board.daemon();
    reported(&watcher, "slot A", |r| r["system"]["booted-slot"] == "A");

    let (image, bundle) = board.bundle("2", 200 * 1024);
    let bytes = std::fs::read(&bundle).expect("bundle");
    let topics = lichen_sync::Topics::new(NODE).expect("node id");
    let messages = lichen_agent::hub::artifacts::artifact_messages(&topics, &bytes, 8192, 1);
    let chunks = messages.len() - 1;
    let half = chunks / 2;
    watcher.publish(
        &topic("desired"),
        true,
        desired_message(&board, 2, describe(&bytes, "2"), "trusted"),
    );
    for (t, retain, payload) in &messages[..=half] {
        watcher.publish(t, *retain, payload.clone());
    }
    let fetching = |r: &Value| r["artifacts"]["fetching"][0].clone();
    let r = reported(&watcher, "half of the bundle stored", |r| {
        fetching(r)["held"] == half
    });
    assert_eq!(hub_update(&r)["phase"], "fetching", "{r}");

    daemon.kill9().expect("kill -9");
    broker.stop();
    broker.restart();
    daemon.restart().expect("daemon restarts");
    let r = reported(&watcher, "the transfer resumed from disk", |r| {
        fetching(r)["resumed"] == half
    });
    assert_eq!(fetching(&r)["chunks"], chunks, "{r}");
    board.untouched(&daemon);

    for (t, retain, payload) in &messages[half + 1..] {
        watcher.publish(t, *retain, payload.clone());
    }
    let r = reported(&watcher, "the update armed", |r| {
        hub_update(r)["phase"] == "armed"
    });
    assert_eq!(
        r["counters"]["artifact-chunks"],
        chunks - half,
        "only the missing chunks were fetched after the restart: {r}"
    );
    let slot_b = std::fs::read(board.file("slot-b")).expect("slot b");
    assert_eq!(&slot_b[..image.len()], &image[..]);
    assert!(board.boot_state().contains("BOOT_ORDER=B A"));
    wait_for_file(&board.file("rebooted"));
}

#[test]
fn bad_pushed_updates_change_nothing_and_name_the_field() {
    let broker = Mosquitto::start_with(PERSISTENT);
    let board = Board::new(&broker);
    let watcher = Watcher::connect(broker.port, "t-bad", &topic("reported"));
    let daemon = board.daemon();
    reported(&watcher, "slot A", |r| r["system"]["booted-slot"] == "A");
    let (_, bundle) = board.bundle("2", 100 * 1024);
    let bytes = std::fs::read(&bundle).expect("bundle");
    let topics = lichen_sync::Topics::new(NODE).expect("node id");
    let publish_bundle = |bytes: &[u8]| {
        for (t, retain, payload) in
            lichen_agent::hub::artifacts::artifact_messages(&topics, bytes, 8192, 1)
        {
            watcher.publish(&t, retain, payload);
        }
    };
    let rejected = |version: u64, what: &str| -> (String, Value) {
        let r = reported(&watcher, what, |r| {
            r["last-rejection"]["version"] == version
        });
        let reason = r["last-rejection"]["reason"]
            .as_str()
            .expect("a reason")
            .to_owned();
        (reason, r)
    };

    // A wrong signature: signed by a key the node does not trust.
    publish_bundle(&bytes);
    watcher.publish(
        &topic("desired"),
        true,
        desired_message(&board, 2, describe(&bytes, "2"), "untrusted"),
    );
    let (reason, _) = rejected(2, "the untrusted signature refused");
    assert!(reason.contains("not in hub.trusted-keys"), "{reason}");
    board.untouched(&daemon);

    // Another target.
    let mut other = describe(&bytes, "2");
    other.target = "arm64".into();
    watcher.publish(
        &topic("desired"),
        true,
        desired_message(&board, 3, other, "trusted"),
    );
    let (reason, _) = rejected(3, "the wrong target refused");
    assert!(reason.contains("system.target"), "{reason}");
    board.untouched(&daemon);

    // Oversize: over the bound, refused before fetching anything.
    let mut big = describe(&bytes, "2");
    big.size = MAX_SYSTEM_BUNDLE_SIZE + 1;
    watcher.publish(
        &topic("desired"),
        true,
        desired_message(&board, 4, big, "trusted"),
    );
    let (reason, _) = rejected(4, "the oversize bundle refused");
    assert!(reason.contains("system.size"), "{reason}");
    board.untouched(&daemon);

    // A truncated bundle, signed for what it is: the transfer completes, the bundle's own
    // check refuses it.
    let truncated = &bytes[..bytes.len() / 2];
    publish_bundle(truncated);
    watcher.publish(
        &topic("desired"),
        true,
        desired_message(&board, 5, describe(truncated, "2"), "trusted"),
    );
    let (reason, r) = rejected(5, "the truncated bundle refused");
    assert!(reason.contains("the bundle is refused"), "{reason}");
    assert!(
        reason.contains("truncated") && reason.contains("rootfs.img"),
        "names the image member: {reason}"
    );
    board.untouched(&daemon);
    assert_eq!(hub_update(&r)["phase"], "rejected", "{r}");
    assert!(
        hub_update(&r)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("the bundle is refused")),
        "{r}"
    );
    assert!(
        !daemon
            .state_dir()
            .join("update/incoming")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "the refused bundle is not kept"
    );
}

#[test]
fn an_offline_bundle_naming_a_system_update_is_refused_and_changes_nothing() {
    let broker = Mosquitto::start_with(PERSISTENT);
    let board = Board::new(&broker);
    let watcher = Watcher::connect(broker.port, "t-import", &topic("reported"));
    let daemon = board.daemon();
    reported(&watcher, "slot A", |r| r["system"]["booted-slot"] == "A");
    let (_, bundle) = board.bundle("2", 10 * 1024);
    let bytes = std::fs::read(&bundle).expect("bundle");
    let message: Value = serde_json::from_str(&desired_message(
        &board,
        2,
        describe(&bytes, "2"),
        "trusted",
    ))
    .expect("JSON");
    let index = lichen_agent::hub::bundle::BundleIndex {
        format: lichen_agent::hub::bundle::FORMAT.to_owned(),
        node: NODE.to_owned(),
        desired: serde_json::from_value(message["payload"].clone()).expect("desired state"),
    };
    let out = board.file("site");
    lichen_agent::hub::bundle::write(&out, &index, &[]).expect("writes the bundle");
    let run = daemon.cli(&["import", path(&out)]);
    let text = output_text(&run);
    assert_eq!(run.status.code(), Some(2), "{text}");
    assert!(
        text.contains("(system)") && text.contains("lichen update"),
        "{text}"
    );
    board.untouched(&daemon);
    let r = reported(&watcher, "the refusal reported", |r| {
        r["last-rejection"]["version"] == 2
    });
    assert!(r["applied-version"].is_null(), "nothing applied: {r}");
}
