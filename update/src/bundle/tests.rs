use super::*;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// An ed25519 key in the tests (the agent passes its own signer and verifier).
pub(crate) struct TestKey(pub Ed25519KeyPair);

impl TestKey {
    pub(crate) fn new() -> TestKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        TestKey(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }
    fn id(&self) -> String {
        hex::encode(&self.0.public_key().as_ref()[..8])
    }
}

impl Signer for TestKey {
    fn sign(&self, message: &[u8]) -> Result<BundleSignature, SignatureError> {
        Ok(BundleSignature {
            key_id: Some(self.id()),
            signature: hex::encode(self.0.sign(message).as_ref()),
        })
    }
}

impl Verifier for TestKey {
    fn verify(&self, message: &[u8], sig: &BundleSignature) -> Result<String, SignatureError> {
        if sig.key_id.as_deref() != Some(&self.id()) {
            return Err(format!("signed by key {:?}, which is not trusted", sig.key_id).into());
        }
        let bytes = hex::decode(&sig.signature)?;
        UnparsedPublicKey::new(&ED25519, self.0.public_key().as_ref())
            .verify(message, &bytes)
            .map_err(|_| "bad signature")?;
        Ok(self.id())
    }
}

pub(crate) fn image(dir: &Path, size: usize) -> PathBuf {
    let path = dir.join("rootfs.img");
    let bytes: Vec<u8> = (0..size)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_written_bundle_verifies_and_streams_its_image() {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new();
    let img = image(dir.path(), 300_000);
    let out = dir.path().join("v2.lub");
    let manifest = write_bundle(&out, "2", "x86_64", &img, &key).unwrap();
    assert_eq!(manifest.image.size, 300_000);
    let bundle = open_verified(&out, "x86_64", &key).unwrap();
    assert_eq!(bundle.manifest, manifest);
    let mut bytes = Vec::new();
    bundle.image().unwrap().read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, std::fs::read(&img).unwrap());
}

#[test]
fn bad_bundles_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new();
    let other = TestKey::new();
    let img = image(dir.path(), 100_000);
    let good = dir.path().join("good.lub");
    write_bundle(&good, "2", "x86_64", &img, &key).unwrap();

    let err = open_verified(&good, "arm64", &key).unwrap_err().to_string();
    assert!(
        err.contains("target \"x86_64\"") && err.contains("\"arm64\""),
        "{err}"
    );

    let wrong_key = dir.path().join("wrong-key.lub");
    write_bundle(&wrong_key, "2", "x86_64", &img, &other).unwrap();
    let err = open_verified(&wrong_key, "x86_64", &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not trusted"), "{err}");

    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.lub");
    std::fs::write(&truncated, &bytes[..bytes.len() - 60_000]).unwrap();
    let err = open_verified(&truncated, "x86_64", &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");

    // One image byte flipped: the signature holds, the hash does not.
    let mut tampered = bytes.clone();
    let at = tampered.len() - 70_000;
    tampered[at] ^= 1;
    let path = dir.path().join("tampered.lub");
    std::fs::write(&path, &tampered).unwrap();
    let err = open_verified(&path, "x86_64", &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256") && err.contains("tampered"), "{err}");

    // Without manifest.sig.
    let unsigned = dir.path().join("unsigned.lub");
    let mut builder = tar::Builder::new(File::create(&unsigned).unwrap());
    for name in ["manifest.json", "rootfs.img"] {
        let data = std::fs::read(if name == "rootfs.img" { &img } else { &good }).unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder.finish().unwrap();
    let err = open_verified(&unsigned, "x86_64", &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsigned"), "{err}");

    let err = open_verified(&img, "x86_64", &key).unwrap_err().to_string();
    assert!(err.contains("member 1") || err.contains("tar"), "{err}");
}

#[test]
fn manifest_fields_are_checked_by_name() {
    let p = Path::new("b.lub");
    let doc = |version: &str, size: u64, sha: &str, fs: &str| {
        format!(
            r#"{{"format":"lichen-update-v1","version":"{version}","target":"x86_64","image":{{"size":{size},"sha256":"{sha}","fs":"{fs}"}}}}"#
        )
    };
    let sha = "a".repeat(64);
    for (text, field) in [
        (doc("../../x", 1, &sha, "squashfs"), "version"),
        (doc("2", 0, &sha, "squashfs"), "image.size"),
        (doc("2", 1, "xyz", "squashfs"), "image.sha256"),
        (doc("2", 1, &sha, "ext4"), "image.fs"),
        (
            doc("2", 1, &sha, "squashfs").replace("lichen-update-v1", "v0"),
            "format",
        ),
    ] {
        let err = parse_manifest(p, text.as_bytes()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("manifest field {field}:")),
            "{field}: {err}"
        );
    }
    assert!(parse_manifest(p, doc("2.0-rc1", 1, &sha, "squashfs").as_bytes()).is_ok());
}

#[test]
fn oversized_members_are_refused_before_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new();
    let path = dir.path().join("big.lub");
    let mut builder = tar::Builder::new(File::create(&path).unwrap());
    let mut header = tar::Header::new_ustar();
    header.set_size(MAX_MANIFEST + 1);
    builder
        .append_data(
            &mut header,
            "manifest.json",
            std::io::repeat(b' ').take(MAX_MANIFEST + 1),
        )
        .unwrap();
    builder.finish().unwrap();
    let err = open_verified(&path, "x86_64", &key)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.json") && err.contains("65536"),
        "{err}"
    );
}
