//! Lichen against tools it did not write: keys that OpenSSL 3 reads and writes, and a hub
//! written in Python from docs/topics.md alone (examples/python-hub) driving the real agent
//! through a real Mosquitto.

use std::path::Path;
use std::process::Command;

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{lichen, output_text};

/// Runs `openssl` with `args`; fails the test if OpenSSL is missing (scripts/install-deps
/// installs it).
fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (scripts/install-deps installs it)")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn hub_keygen_writes_a_key_openssl_reads_and_a_key_openssl_made_signs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("publisher.key");
    let out = lichen(&["hub", "keygen", path(&key)]);
    assert!(out.status.success(), "keygen: {}", output_text(&out));

    // OpenSSL 3 reads the private key, and derives the public key keygen wrote beside it.
    let check = openssl(&["pkey", "-in", path(&key), "-noout"]);
    assert!(
        check.status.success(),
        "openssl pkey: {}",
        output_text(&check)
    );
    let public = openssl(&["pkey", "-in", path(&key), "-pubout", "-outform", "DER"]);
    assert!(public.status.success(), "{}", output_text(&public));
    let der = public.stdout;
    assert_eq!(der.len(), 44, "SubjectPublicKeyInfo of an Ed25519 key");
    let written = std::fs::read_to_string(dir.path().join("publisher.key.pub")).expect("pub");
    assert_eq!(written.trim(), hex::encode(&der[12..]));

    // A key OpenSSL generated signs a bundle that verifies against OpenSSL's public key.
    let theirs = dir.path().join("openssl.key");
    let gen_out = openssl(&["genpkey", "-algorithm", "ed25519", "-out", path(&theirs)]);
    assert!(gen_out.status.success(), "{}", output_text(&gen_out));
    let public = openssl(&["pkey", "-in", path(&theirs), "-pubout", "-outform", "DER"]);
    let their_public = hex::encode(&public.stdout[12..]);
    let deployment = dir.path().join("d.toml");
    std::fs::write(
        &deployment,
        format!(
            "[[workloads]]\nname = \"x\"\nmodule = \"sha256:{}\"\n",
            "0".repeat(64)
        ),
    )
    .expect("write");
    let bundle = dir.path().join("b");
    let out = lichen(&[
        "hub",
        "bundle",
        "--node",
        "n1",
        path(&deployment),
        "--key",
        path(&theirs),
        "--version",
        "7",
        "--out",
        path(&bundle),
    ]);
    assert!(out.status.success(), "hub bundle: {}", output_text(&out));
    let index: lichen_agent::hub::bundle::BundleIndex =
        serde_json::from_slice(&std::fs::read(bundle.join("bundle.json")).expect("bundle.json"))
            .expect("bundle.json parses");
    let trusted = lichen_agent::hub::parse_public_key(&their_public).expect("public key");
    let signer = lichen_agent::hub::verify(&index.desired, "n1", std::slice::from_ref(&trusted))
        .expect("the signature of an OpenSSL key verifies");
    assert_eq!(signer, trusted.id);
}

/// The Python interpreter for examples/python-hub: `LICHEN_PYTHON`, else Debian's
/// `/usr/bin/python3` (where scripts/install-deps puts python3-paho-mqtt and
/// python3-cryptography), else `python3`.
fn python() -> String {
    if let Ok(p) = std::env::var("LICHEN_PYTHON") {
        return p;
    }
    if Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".into();
    }
    "python3".into()
}

/// Runs examples/python-hub/lichenhub.py with `args`.
fn pyhub(args: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-hub/lichenhub.py");
    Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("python runs")
}

/// Runs the Python hub and parses each line of its output as JSON; fails with its output.
fn pyhub_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = pyhub(args);
    assert!(
        out.status.success(),
        "lichenhub.py {args:?}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_python_reference_hub_deploys_commands_and_reads_a_real_node() {
    use lichen_tests::broker::{Mosquitto, PERSISTENT};
    use lichen_tests::{Daemon, guest};

    // Fails, not skips, without its packages: CI installs them (scripts/install-deps).
    let check = Command::new(python())
        .args(["-c", "import paho.mqtt.client, cryptography"])
        .output()
        .expect("python runs");
    assert!(
        check.status.success(),
        "{} lacks paho-mqtt or cryptography (scripts/install-deps installs python3-paho-mqtt and python3-cryptography; LICHEN_PYTHON names another interpreter): {}",
        python(),
        output_text(&check)
    );

    let broker = Mosquitto::start_with(PERSISTENT);
    let url = broker.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("py.key");
    let made = pyhub_json(&["keygen", path(&key)]);
    let public = made[0]["public-key"]
        .as_str()
        .expect("public key")
        .to_owned();
    // The key the Python hub wrote is one OpenSSL reads too.
    let check = openssl(&["pkey", "-in", path(&key), "-noout"]);
    assert!(check.status.success(), "{}", output_text(&check));
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[hub]\nurl = \"{url}\"\nnode-id = \"py-node\"\ntrusted-keys = [\"{public}\"]\n"),
    )
    .expect("config");
    let daemon = Daemon::start_with(&["--config", path(&config)], None).expect("daemon starts");

    // Desired state: the counter, as an artifact in 4 KiB chunks, signed by the Python key.
    let module = dir.path().join("counter.wasm");
    std::fs::copy(guest("counter"), &module).expect("copy guest");
    let digest = {
        let out = pyhub(&["digest", path(&module)]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        digest,
        lichen_sync::sha256_hex(&std::fs::read(&module).expect("module"))
    );
    let deployment = dir.path().join("site.toml");
    std::fs::write(
        &deployment,
        format!(
            "[[workloads]]\nname = \"counter\"\nmodule = \"sha256:{digest}\"\ntriggers = [{{ interval = \"100ms\" }}]\n"
        ),
    )
    .expect("deployment");
    let broker_args = [
        "--url",
        url.as_str(),
        "--node",
        "py-node",
        "--timeout",
        "60",
    ];
    let with = |verb: &str, rest: &[&str]| -> Vec<String> {
        let mut all = vec![verb.to_owned()];
        all.extend(broker_args.iter().map(|s| (*s).to_owned()));
        all.extend(rest.iter().map(|s| (*s).to_owned()));
        all
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        pyhub_json(&refs)
    };
    let deployed = run(with(
        "deploy",
        &[
            "--key",
            path(&key),
            "--version",
            "3",
            "--chunk-size",
            "4096",
            "--artifact",
            path(&module),
            path(&deployment),
        ],
    ));
    assert!(
        deployed[0]["artifacts"][0]["chunks"]
            .as_u64()
            .expect("chunks")
            > 1
    );
    daemon.wait_for("counter", "running", |w| w.state == WorkloadState::Running);

    // Reported state, read by the Python hub: the version it published, applied.
    let reported = run(with("reported", &["--applied", "3"]));
    assert_eq!(reported[0]["node"], "py-node", "{reported:?}");
    assert_eq!(
        reported[0]["deployment"]["source"], "hub desired version 3",
        "{reported:?}"
    );

    // Telemetry: the counter's records, one sequence of ids from the node.
    let telemetry = run(with("telemetry", &["--count", "3"]));
    assert_eq!(telemetry.len(), 3);
    let mut last = 0;
    for t in &telemetry {
        assert_eq!(t["workload"], "counter", "{t}");
        assert_eq!(t["origin"], "py-node", "{t}");
        let seq = t["sequence"].as_u64().expect("sequence");
        assert!(seq > last, "{telemetry:?}");
        last = seq;
        assert!(t["payload"]["count"].is_u64(), "{t}");
    }

    // A command and its result; a command to no workload gets ok: false naming it.
    let result = run(with("send", &["counter", "get"]));
    assert_eq!(result[0]["ok"], true, "{result:?}");
    let count: u64 = result[0]["reply"]
        .as_str()
        .expect("reply text")
        .trim()
        .parse()
        .expect("the counter's count");
    assert!(count >= 1, "{result:?}");
    let out = pyhub(
        &with("send", &["nobody", "get"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let refused: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the result as JSON");
    assert_eq!(refused["ok"], false);
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("nobody")),
        "{refused}"
    );

    // A desired state signed by a key the node does not trust is rejected and reported.
    let other = dir.path().join("other.key");
    pyhub_json(&["keygen", path(&other)]);
    run(with(
        "deploy",
        &["--key", path(&other), "--version", "4", path(&deployment)],
    ));
    let reported = run(with("reported", &["--rejected", "4"]));
    assert_eq!(reported[0]["applied-version"], 3, "{reported:?}");
    assert!(
        reported[0]["last-rejection"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not in hub.trusted-keys")),
        "{reported:?}"
    );
}
