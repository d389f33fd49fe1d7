//! The small-node flavour (`cargo build -p lichen --no-default-features --features
//! small-node`: the Wasm runtime, devices and hub link; no Cranelift, containers, microVMs,
//! KubeEdge, operator or bench), really built and run. The test builds it once, into
//! `<target dir>/small-node` so it never replaces the full `lichen` the other tests run, and
//! checks what a small board's operator meets: a module the full binary precompiled for this
//! node's engine loads and runs; a plain module, a container and a microVM are refused with
//! messages that name them and change nothing; `doctor` says what the flavour lacks.

use std::path::{Path, PathBuf};
use std::process::Command;

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{
    Daemon, guest, lichen, nested_cargo_build, one_workload, output_text, test_profile,
};

const NODE: &str = "small";
/// The node's `[wasm]` sizing, which the hub compiles for (it changes compiled code).
const MAX_MEMORY: &str = "16MiB";
const MEMORY_GUARD: &str = "64KiB";

/// The small-node `lichen`, built once per test process by a nested cargo in the profile of
/// this test run, into `<target dir>/small-node` (a no-op when it is fresh).
fn small_node_bin() -> PathBuf {
    let (profile_dir, _) = test_profile();
    let target_dir = profile_dir
        .parent()
        .expect("the target directory")
        .join("small-node");
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        nested_cargo_build(
            &[
                "-p",
                "lichen",
                "--bin",
                "lichen",
                "--no-default-features",
                "--features",
                "small-node",
            ],
            Some(&target_dir),
        )
    });
    let profile_name = profile_dir.file_name().expect("a profile directory");
    let bin = target_dir.join(profile_name).join("lichen");
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

/// A publisher key pair made by the full binary, the node's config trusting it (with a hub
/// that is not there: the field, offline), and a small-node daemon on that config.
fn small_node(dir: &Path) -> Daemon {
    let key = dir.join("publisher");
    let out = lichen(&["hub", "keygen", key.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "keygen: {}", output_text(&out));
    let public = std::fs::read_to_string(dir.join("publisher.pub")).expect("public key");
    let config = dir.join("agent.toml");
    // Port 9 on loopback (discard): nothing listens, the hub link retries in the background.
    std::fs::write(
        &config,
        format!(
            "board = \"sim\"\n[wasm]\nmax-memory = \"{MAX_MEMORY}\"\nmemory-guard = \"{MEMORY_GUARD}\"\n\
             [hub]\nurl = \"mqtt://127.0.0.1:9\"\nnode-id = \"{NODE}\"\ntrusted-keys = [\"{}\"]\n",
            public.trim()
        ),
    )
    .expect("write config");
    Daemon::start_bin(
        small_node_bin(),
        &["--config", config.to_str().expect("utf-8 path")],
        None,
    )
    .expect("the small-node daemon starts")
}

/// A bundle of `text` (deployment `version`) made by the full binary, each module compiled
/// for the small node's engine.
fn precompiled_bundle(dir: &Path, text: &str, version: u64) -> PathBuf {
    let file = dir.join(format!("deploy-{version}.toml"));
    std::fs::write(&file, text).expect("write deployment");
    let out_dir = dir.join(format!("bundle-{version}"));
    let out = lichen(&[
        "hub",
        "bundle",
        "--node",
        NODE,
        file.to_str().expect("utf-8 path"),
        "--key",
        dir.join("publisher").to_str().expect("utf-8 path"),
        "--version",
        &version.to_string(),
        "--out",
        out_dir.to_str().expect("utf-8 path"),
        "--precompile",
        "host",
        "--engine-max-memory",
        MAX_MEMORY,
        "--engine-memory-guard",
        MEMORY_GUARD,
    ]);
    assert!(out.status.success(), "hub bundle: {}", output_text(&out));
    out_dir
}

fn counter_count(daemon: &Daemon) -> u64 {
    daemon
        .kv("counter", "count")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until counter has counted past `past`: it runs (its deadline is the harness's).
fn wait_for_count_past(daemon: &Daemon, past: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let count = counter_count(daemon);
        if count > past {
            return count;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counter did not count past {past} in 60 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_small_node_runs_precompiled_modules_and_refuses_what_it_lacks_by_name() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let dir = scratch.path();
    let daemon = small_node(dir);

    let version = Command::new(small_node_bin())
        .arg("--version")
        .output()
        .expect("lichen --version runs");
    assert!(
        output_text(&version).contains("(small node)"),
        "{}",
        output_text(&version)
    );

    // `doctor` names the flavour and each part it lacks.
    let doctor = output_text(&daemon.cli(&["doctor"]));
    for piece in [
        "small node",
        "cargo feature `compiler`",
        "cargo feature `containers`",
        "cargo feature `microvms`",
        "cargo feature `pods`",
        "without a compiler",
    ] {
        assert!(doctor.contains(piece), "doctor lacks {piece:?}:\n{doctor}");
    }
    // No task server is built in: none is checked, none is bound, and the log says why (the
    // daemon logs it before its API answers, so it is there once the daemon is ready).
    assert!(
        !doctor.contains("containerd task server"),
        "the small node checks a task server it does not have:\n{doctor}"
    );
    let task_socket = daemon
        .state_dir()
        .parent()
        .expect("the state dir is in the daemon's dir")
        .join("task.sock");
    assert!(
        !task_socket.exists(),
        "the small node bound {}",
        task_socket.display()
    );
    assert!(
        daemon
            .log()
            .contains("is built without pods (cargo feature `pods`)"),
        "{}",
        daemon.log()
    );
    assert!(
        !doctor.contains("with Cranelift"),
        "the small node claims a compiler:\n{doctor}"
    );

    // A module the full binary precompiled for this node's engine loads and runs.
    std::fs::copy(guest("counter"), dir.join("counter.wasm")).expect("copy the module");
    let counter = "[[workloads]]\nname = \"counter\"\nmodule = \"counter.wasm\"\ntriggers = [{ interval = \"50ms\" }]\n";
    let bundle = precompiled_bundle(dir, counter, 2);
    let out = daemon.cli(&["import", bundle.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "import: {}", output_text(&out));
    daemon.wait_for("counter", "running", |w| w.state == WorkloadState::Running);
    let count = wait_for_count_past(&daemon, 0);
    let before = daemon.status("counter").expect("counter runs");

    // A plain module: refused, naming the module and saying the node has no compiler.
    let plain = one_workload(
        "thermostat",
        &guest("thermostat"),
        "triggers = [{ interval = \"200ms\" }]",
    );
    let out = daemon.deploy("plain.toml", &plain);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    let digest = lichen_sync::sha256_hex(&std::fs::read(guest("thermostat")).expect("guest"));
    assert!(
        text.contains("workloads[0].module") && text.contains(&format!("module sha256:{digest}")),
        "the refusal names the module: {text}"
    );
    assert!(
        text.contains("built without a compiler") && text.contains("--precompile"),
        "the refusal says the node has no compiler and what to do: {text}"
    );

    // A container and a microVM: refused, naming the kind this binary lacks.
    std::fs::create_dir_all(dir.join("rootfs")).expect("rootfs dir");
    for (kind, fields, feature) in [
        (
            "container",
            "rootfs = \"rootfs\"\ncommand = [\"/bin/true\"]\n",
            "containers",
        ),
        (
            "microvm",
            "kernel = \"vmlinuz\"\ninitramfs = \"initrd\"\n",
            "microvms",
        ),
    ] {
        let text = format!("[[workloads]]\nname = \"box\"\nkind = \"{kind}\"\n{fields}");
        let out = daemon.deploy(&format!("{kind}.toml"), &text);
        let message = output_text(&out);
        assert!(!out.status.success(), "{message}");
        assert!(
            message.contains(&format!(
                "\"{kind}\" isolation needs a lichen built with the {kind} runtime"
            )) && message.contains(&format!("cargo feature `{feature}` off")),
            "{kind}: {message}"
        );
    }

    // None of the refusals changed anything: counter still runs the imported version.
    let rows = daemon.ps();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].name, "counter");
    assert_eq!(rows[0].deployment_version, before.deployment_version);
    assert_eq!(rows[0].module_digest, before.module_digest);
    wait_for_count_past(&daemon, count);
    assert!(
        !daemon.log().contains("compiling module"),
        "the small node compiled something:\n{}",
        daemon.log()
    );
}
