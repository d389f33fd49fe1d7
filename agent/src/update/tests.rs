use super::*;

fn section(keys: &[String]) -> UpdateConfig {
    let mut text = String::from(
        "target = \"x86_64\"\nboot = \"grub\"\nboot-state = [\"/b/grubenv\"]\nslots = { A = \"/dev/vda2\", B = \"/dev/vda3\" }\n",
    );
    text.push_str(&format!("trusted-keys = {keys:?}\n"));
    toml::from_str(&text).expect("a valid [update] section")
}

#[test]
fn bundles_verify_with_the_deployment_key_formats() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = crate::keys::generate_key().unwrap();
    let (_, other) = crate::keys::generate_key().unwrap();
    std::fs::write(dir.path().join("key.pem"), &pem).unwrap();
    let signer = PublisherKey::load(&dir.path().join("key.pem")).unwrap();
    let signature = signer.sign(b"manifest").unwrap();

    let trusted =
        TrustedKeys::from_config(&section(&[other.clone(), public.clone()]), None).unwrap();
    assert_eq!(
        trusted.verify(b"manifest", &signature).unwrap(),
        signature.key_id.clone().unwrap()
    );
    let err = trusted
        .verify(b"tampered", &signature)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad signature"), "{err}");

    let stranger = TrustedKeys::from_config(&section(&[other]), None).unwrap();
    let err = stranger
        .verify(b"manifest", &signature)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not one of this node's trusted keys"), "{err}");
    let none = TrustedKeys::from_config(&section(&[]), None).unwrap();
    assert!(
        none.verify(b"manifest", &signature)
            .unwrap_err()
            .to_string()
            .contains("trusts no key")
    );

    let err = TrustedKeys::from_config(&section(&["zz".into()]), None)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("update.trusted-keys[0]"),
        "{err:#}"
    );
}
