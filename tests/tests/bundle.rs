//! `lichen import` against hostile bundles, through the real daemon with its hub link up on a
//! real Mosquitto: each bundle is refused naming the member, nothing changes (workloads,
//! artifact store, applied version), and the hub link and `ps` keep answering. Before, a bundle
//! was read whole before its signature was checked (two 1 GiB members: the agent's memory went
//! past 2 GiB), and a FIFO member hung `import` and the hub link with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lichen_agent::api::types::WorkloadState;
use lichen_tests::broker::{Mosquitto, PERSISTENT, Seen, Watcher};
use lichen_tests::{Daemon, guest, lichen, lichen_bin, one_workload, output_text};

const NODE: &str = "n1";

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The node's setup: a trusted publisher key, the agent config, the counter deployment.
struct Node {
    dir: tempfile::TempDir,
    daemon: Daemon,
    broker_url: String,
}

impl Node {
    fn start(broker: &Mosquitto) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("trusted");
        let out = lichen(&["hub", "keygen", path(&key)]);
        assert!(out.status.success(), "keygen: {}", output_text(&out));
        let public = std::fs::read_to_string(dir.path().join("trusted.pub")).expect("pub");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[hub]\nurl = \"{}\"\nnode-id = \"{NODE}\"\ntrusted-keys = [\"{}\"]\n",
                broker.url(),
                public.trim()
            ),
        )
        .expect("config");
        let deployment = dir.path().join("counter.toml");
        std::fs::write(
            &deployment,
            one_workload(
                "counter",
                &guest("counter"),
                "triggers = [{ interval = \"100ms\" }]",
            ),
        )
        .expect("deployment");
        let daemon = Daemon::start_with(
            &["--config", path(&config), "--deploy", path(&deployment)],
            None,
        )
        .expect("daemon starts");
        daemon.wait_for("counter", "running", |w| w.state == WorkloadState::Running);
        Node {
            dir,
            daemon,
            broker_url: broker.url(),
        }
    }

    /// `lichen hub bundle` of a thermostat deployment as `version`, into `out`.
    fn bundle(&self, version: u64, out: &Path) -> String {
        self.bundle_with(version, out, &[])
    }

    /// [`Node::bundle`] with more `hub bundle` options; returns the module's digest.
    fn bundle_with(&self, version: u64, out: &Path, extra: &[&str]) -> String {
        let module = self.dir.path().join("thermostat.wasm");
        if !module.exists() {
            std::fs::copy(guest("thermostat"), &module).expect("copy guest");
        }
        let file = self.dir.path().join(format!("thermostat-{version}.toml"));
        std::fs::write(
            &file,
            "[[workloads]]\nname = \"thermostat\"\nmodule = \"thermostat.wasm\"\ntriggers = [{ interval = \"200ms\" }]\n",
        )
        .expect("write deployment");
        let key = self.dir.path().join("trusted");
        let run = lichen(
            &[
                "hub",
                "bundle",
                "--node",
                NODE,
                path(&file),
                "--key",
                path(&key),
                "--version",
                &version.to_string(),
                "--out",
                path(out),
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        assert!(run.status.success(), "hub bundle: {}", output_text(&run));
        lichen_sync::sha256_hex(&std::fs::read(&module).expect("module"))
    }

    /// `lichen import`, failing the test if it does not return within two minutes (a FIFO
    /// member used to hang it for ever).
    fn import(&self, bundle: &Path) -> Output {
        let mut child = Command::new(lichen_bin())
            .arg("--socket")
            .arg(self.daemon.socket())
            .args(["import", path(bundle)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lichen import runs");
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "lichen import {} did not return within 120 s\ndaemon log:\n{}",
                    bundle.display(),
                    self.daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("import output")
    }

    /// Files of the artifact store (compiled and source), sorted.
    fn store_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.daemon.state_dir().join("artifacts"))
            .expect("artifact store")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The refusal: exit code 2 and every one of `wanted` in the message; then nothing has
    /// changed and the daemon answers `ps` and, through the broker, a hub command.
    fn assert_refused(&self, bundle: &Path, wanted: &[&str], store_before: &[String]) {
        let out = self.import(bundle);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{}: {text}", bundle.display());
        for w in wanted {
            assert!(
                text.contains(w),
                "{}: wanted {w:?} in: {text}",
                bundle.display()
            );
        }
        let ps = self.daemon.ps();
        let names: Vec<&str> = ps.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["counter"], "{text}");
        assert_eq!(self.store_files(), store_before, "{text}");
        let send = lichen(&[
            "hub",
            "send",
            "--url",
            &self.broker_url,
            "--node",
            NODE,
            "counter",
            "get",
            "--timeout",
            "60s",
        ]);
        assert!(
            send.status.success(),
            "the hub link does not answer after {}: {}",
            bundle.display(),
            output_text(&send)
        );
    }
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A tar bundle of raw headers, names written as they are (tar::Builder refuses `..`).
fn raw_tar(out: &Path, members: &[(&str, &[u8])]) {
    let mut builder = tar::Builder::new(std::fs::File::create(out).expect("create tar"));
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().expect("gnu header").name[..name.len()]
            .copy_from_slice(name.as_bytes());
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(u64::try_from(data.len()).expect("size"));
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.finish().expect("finish tar");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[test]
fn hostile_bundles_are_refused_naming_the_member_and_the_node_keeps_answering() {
    let broker = Mosquitto::start_with(PERSISTENT);
    let node = Node::start(&broker);
    let work = node.dir.path().join("bundles");
    std::fs::create_dir(&work).expect("mkdir");
    let good = work.join("good");
    let digest = node.bundle(5, &good);
    let member = format!("artifacts/{digest}");
    let store_before = node.store_files();
    let variant = |name: &str| -> PathBuf {
        let dir = work.join(name);
        copy_dir(&good, &dir);
        dir
    };

    // A member larger than the bound (a sparse file: no disk used), refused by its size before
    // it is read: `hub bundle` signs each artifact's size, and the member is not that size.
    let oversized = variant("oversized");
    let signed_size = std::fs::metadata(good.join(&member)).expect("member").len();
    std::fs::File::options()
        .write(true)
        .open(oversized.join(&member))
        .expect("open member")
        .set_len(lichen_sync::MAX_ARTIFACT_SIZE + 1)
        .expect("grow");
    node.assert_refused(
        &oversized,
        &[
            &format!("member {member} is 1073741825 bytes"),
            &format!("the signed desired state says {signed_size}"),
        ],
        &store_before,
    );

    // A FIFO member: used to hang `import` and the hub link for ever.
    let fifo = variant("fifo");
    std::fs::remove_file(fifo.join(&member)).expect("rm");
    let made = Command::new("mkfifo")
        .arg(fifo.join(&member))
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    node.assert_refused(
        &fifo,
        &[&format!("{member} is a FIFO, not a regular file")],
        &store_before,
    );

    // A member that is a symlink to a file outside the bundle (with the right content, even).
    let link = variant("link");
    let outside = work.join("outside.wasm");
    std::fs::copy(guest("thermostat"), &outside).expect("copy");
    std::fs::remove_file(link.join(&member)).expect("rm");
    std::os::unix::fs::symlink(&outside, link.join(&member)).expect("symlink");
    node.assert_refused(
        &link,
        &[&format!("{member} is a symbolic link")],
        &store_before,
    );

    // Tars with names outside the bundle.
    let index = std::fs::read(good.join("bundle.json")).expect("bundle.json");
    let module = std::fs::read(good.join(&member)).expect("member");
    for (i, name) in ["../escape", "/tmp/escape", "artifacts/../../escape"]
        .iter()
        .enumerate()
    {
        let tar = work.join(format!("names-{i}.tar"));
        raw_tar(&tar, &[("bundle.json", &index), (name, &module)]);
        node.assert_refused(
            &tar,
            &[&format!("member {name:?} names a path outside the bundle")],
            &store_before,
        );
    }

    // A tampered member in a tar: refused naming it and the digest its content has.
    let mut tampered_bytes = module.clone();
    tampered_bytes[200] ^= 0xff;
    let tampered = work.join("tampered.tar");
    raw_tar(
        &tampered,
        &[("bundle.json", &index), (&member, &tampered_bytes)],
    );
    node.assert_refused(
        &tampered,
        &[
            &format!("artifact file {member}"),
            "tampered with or corrupted",
        ],
        &store_before,
    );

    // An index of many MB.
    let big = variant("big-index");
    let mut padded = index.clone();
    padded.extend(std::iter::repeat_n(b' ', 8 << 20));
    std::fs::write(big.join("bundle.json"), padded).expect("write");
    node.assert_refused(
        &big,
        &[
            "member bundle.json is 8",
            "more than the bound of 1048576 bytes",
        ],
        &store_before,
    );

    // A forged index (bad signature) with two 1 GiB members it names: refused at the
    // signature, before a member is read; the agent's peak memory stays far below 1 GiB.
    let forged = variant("forged");
    let d2 = "ab".repeat(32);
    let json = String::from_utf8(index.clone()).expect("utf-8 index");
    let json = json.replace(
        "triggers",
        &format!("triggers = []\\n[[workloads]]\\nname = \\\"two\\\"\\nmodule = \\\"sha256:{d2}\\\"\\ntriggers"),
    );
    std::fs::write(forged.join("bundle.json"), json).expect("write");
    for name in [digest.as_str(), d2.as_str()] {
        let f = std::fs::File::create(forged.join("artifacts").join(name)).expect("create");
        f.set_len(lichen_sync::MAX_ARTIFACT_SIZE).expect("1 GiB");
    }
    node.assert_refused(&forged, &["bad signature"], &store_before);
    let peak = peak_rss_kib(node.daemon.pid());
    assert!(
        peak < 512 * 1024,
        "the agent's peak resident memory reached {peak} KiB while refusing a forged bundle"
    );

    // None of the refusals consumed the version: the genuine bundle applies.
    let out = node.import(&good);
    assert!(out.status.success(), "{}", output_text(&out));
    node.daemon.wait_for("thermostat", "running", |w| {
        w.state == WorkloadState::Running
    });
}

/// `lichen hub bundle --precompile` for this node's target and another: `lichen import` takes
/// the compiled form signed for this node's engine and runs the module without compiling it
/// (reported `engine.compiled` unchanged, `precompiled-loads` one more), leaves the other
/// target's out; a bundle whose compiled member has a byte changed is refused naming it, and
/// nothing changes.
#[test]
fn a_bundle_precompiled_for_this_node_imports_without_compiling_and_a_changed_one_is_refused() {
    let broker = Mosquitto::start_with(PERSISTENT);
    let node = Node::start(&broker);
    let watcher = Watcher::connect(
        broker.port,
        "t-bundle-aot",
        &format!("lichen/v1/{NODE}/reported"),
    );
    let reported = |what: &str, want: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let seen = watcher.wait_for(what, Duration::from_secs(60), |m: &Seen| {
            m.topic.ends_with("/reported") && want(&m.json()["payload"])
        });
        seen.json()["payload"].clone()
    };
    let before = reported("the node's engine", &|r| {
        r["engine"]["fingerprint"].is_string()
    })["engine"]
        .clone();
    let count = |engine: &serde_json::Value, field: &str| {
        engine[field]
            .as_u64()
            .unwrap_or_else(|| panic!("engine.{field} in {engine}"))
    };
    let ours = before["target"].as_str().expect("engine.target").to_owned();
    let other = if ours.starts_with("aarch64") {
        "riscv64gc-unknown-linux-gnu"
    } else {
        "aarch64-unknown-linux-musl"
    };
    let (max_memory, guard) = (
        count(&before, "max-memory").to_string(),
        count(&before, "memory-guard").to_string(),
    );
    let work = node.dir.path().join("bundles");
    std::fs::create_dir(&work).expect("mkdir");
    let good = work.join("aot");
    let source = node.bundle_with(
        5,
        &good,
        &[
            "--precompile",
            &ours,
            "--precompile",
            other,
            "--engine-max-memory",
            &max_memory,
            "--engine-memory-guard",
            &guard,
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good.join("bundle.json")).expect("bundle.json"))
            .expect("json");
    let compiled_for = |target: &str| -> String {
        index["desired"]["precompiled"]
            .as_array()
            .expect("precompiled entries")
            .iter()
            .find(|p| p["target"] == target && p["module"] == source.as_str())
            .and_then(|p| p["sha256"].as_str())
            .unwrap_or_else(|| panic!("compiled for {target}: {index}"))
            .to_owned()
    };
    let (compiled, elsewhere) = (compiled_for(&ours), compiled_for(other));
    let store_before = node.store_files();

    // This node's compiled member with one byte changed: refused before anything is stored.
    let changed = work.join("changed");
    copy_dir(&good, &changed);
    let member = changed.join("artifacts").join(&compiled);
    let mut bytes = std::fs::read(&member).expect("compiled member");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&member, bytes).expect("change");
    node.assert_refused(
        &changed,
        &[&format!("artifacts/{compiled}"), "tampered"],
        &store_before,
    );

    // The genuine bundle: applied; the module is mapped from its compiled form.
    let out = node.import(&good);
    assert!(out.status.success(), "{}", output_text(&out));
    node.daemon.wait_for("thermostat", "running", |w| {
        w.state == WorkloadState::Running
    });
    let r = reported("version 5 applied", &|r| {
        r["applied-version"] == 5 && r["engine"]["precompiled-loads"].as_u64() > Some(0)
    });
    assert_eq!(
        count(&r["engine"], "compiled"),
        count(&before, "compiled"),
        "nothing compiled on the node: {r}"
    );
    assert_eq!(
        count(&r["engine"], "precompiled-loads"),
        count(&before, "precompiled-loads") + 1,
        "{r}"
    );
    assert!(r["last-rejection"].is_null(), "{r}");
    let files = node.store_files();
    assert!(
        files.iter().all(|f| !f.contains(&elsewhere)),
        "the other target's compiled form is left out: {files:?}"
    );
    let status = node.daemon.status("thermostat").expect("thermostat runs");
    assert_eq!(status.module_digest, format!("sha256:{source}"));
}
