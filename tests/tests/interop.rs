//! Lichen against tools it did not write: keys that OpenSSL 3 reads and writes, and a hub
//! written in Python from docs/topics.md alone (examples/python-hub) driving the real agent
//! through a real Mosquitto.

use std::path::Path;
use std::process::Command;

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
