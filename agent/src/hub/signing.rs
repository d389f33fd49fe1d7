//! Publisher keys and signatures of desired states: the canonical bytes a publisher signs,
//! ed25519 signing and verification, key ids, and the key encodings (hex or base64 public keys,
//! PKCS#8 private keys in PEM or DER) that `lichen hub keygen` writes and nodes read.

use anyhow::Result;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::DesiredState;
pub use crate::keys::{
    TrustedKey, base64_decode, base64_encode, generate_key, key_id, parse_public_key, pem_or_der,
};

/// Domain separation prefix of the signed bytes (see [`canonical_bytes`]).
pub const SIGNATURE_CONTEXT: &str = "lichen-desired-v1";
/// Domain separation prefix of the signed bytes of a desired state that lists artifacts
/// (see [`signed_bytes`]).
pub const SIGNATURE_CONTEXT_V2: &str = "lichen-desired-v2";
/// Domain separation prefix of the signed bytes of a desired state that names a system update
/// (see [`signed_bytes`]).
pub const SIGNATURE_CONTEXT_V3: &str = "lichen-desired-v3";

/// Domain separation prefix of the signed bytes of a desired state that ships precompiled
/// artifacts (see [`signed_bytes`]).
pub const SIGNATURE_CONTEXT_V4: &str = "lichen-desired-v4";

/// The bytes a publisher signs: `lichen-desired-v1\n<node>\n<version>\n<deployment>`. The node
/// and version are inside so that a signed deployment cannot be replayed to another node or
/// under a higher version.
pub fn canonical_bytes(node: &str, version: u64, deployment: &str) -> Vec<u8> {
    format!("{SIGNATURE_CONTEXT}\n{node}\n{version}\n{deployment}").into_bytes()
}

/// The bytes a publisher signs for `desired`: [`canonical_bytes`] when it lists no artifacts,
/// else `lichen-desired-v2\n<node>\n<version>\n<count>\n` then one `<sha256> <size>\n` line
/// per artifact (in digest order) and the deployment text, so the sizes the node fetches are
/// the publisher's too. A desired state naming a system update signs
/// `lichen-desired-v3\n<node>\n<version>\nsystem <version> <target> <size> <sha256>\n` then
/// the same count, artifact lines and text. A desired state listing precompiled artifacts
/// signs `lichen-desired-v4\n<count>\n`, one `precompiled <module> <target> <engine>
/// <sha256>\n` line per entry (in order), then the v2 or v3 bytes.
pub fn signed_bytes(node: &str, desired: &DesiredState) -> Vec<u8> {
    if !desired.precompiled.is_empty() {
        let mut text = format!("{SIGNATURE_CONTEXT_V4}\n{}\n", desired.precompiled.len());
        for p in &desired.precompiled {
            text.push_str(&p.signed_line());
        }
        let mut bytes = text.into_bytes();
        bytes.extend(listed_bytes(node, desired));
        return bytes;
    }
    if desired.artifacts.is_empty() && desired.system.is_none() {
        return canonical_bytes(node, desired.version, &desired.deployment);
    }
    listed_bytes(node, desired)
}

/// The v2 (or, with a system update, v3) signed bytes of `desired`.
fn listed_bytes(node: &str, desired: &DesiredState) -> Vec<u8> {
    let mut text = match &desired.system {
        None => format!("{SIGNATURE_CONTEXT_V2}\n{node}\n{}\n", desired.version),
        Some(system) => format!(
            "{SIGNATURE_CONTEXT_V3}\n{node}\n{}\n{}",
            desired.version,
            system.signed_line()
        ),
    };
    text.push_str(&format!("{}\n", desired.artifacts.len()));
    for (digest, size) in &desired.artifacts {
        text.push_str(&format!("{digest} {size}\n"));
    }
    text.push_str(&desired.deployment);
    text.into_bytes()
}

/// Signs a desired state with a PKCS#8 ed25519 key (DER, or PEM `PRIVATE KEY`); returns the
/// base64 signature and the key id.
pub fn sign(pkcs8: &[u8], node: &str, version: u64, deployment: &str) -> Result<(String, String)> {
    let der = pem_or_der(pkcs8)?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("not an ed25519 PKCS#8 private key: {e}"))?;
    let signature = pair.sign(&canonical_bytes(node, version, deployment));
    Ok((
        base64_encode(signature.as_ref()),
        key_id(pair.public_key().as_ref()),
    ))
}

/// Signs `desired` for `node` ([`signed_bytes`]: with its artifact sizes, if it lists any)
/// with a PKCS#8 ed25519 key; returns the base64 signature and the key id.
pub fn sign_desired(pkcs8: &[u8], node: &str, desired: &DesiredState) -> Result<(String, String)> {
    let der = pem_or_der(pkcs8)?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("not an ed25519 PKCS#8 private key: {e}"))?;
    let signature = pair.sign(&signed_bytes(node, desired));
    Ok((
        base64_encode(signature.as_ref()),
        key_id(pair.public_key().as_ref()),
    ))
}

/// Why a desired state's signature is not accepted (each names the deployment version).
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// No signature.
    #[error(
        "deployment version {0} is unsigned; this node accepts only deployments signed by a trusted key"
    )]
    Unsigned(u64),
    /// The signature field is not base64 (the decoder's words).
    #[error("deployment version {version}: signature is not base64: {reason}")]
    NotBase64 {
        /// The deployment version.
        version: u64,
        /// What the decoder says.
        #[source]
        reason: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No key to check against.
    #[error(
        "deployment version {0} is signed, but this node trusts no key (hub.trusted-keys is empty)"
    )]
    NoTrustedKey(u64),
    /// Signed by a key the node does not trust.
    #[error(
        "deployment version {version} is signed by key {key}, which is not in hub.trusted-keys"
    )]
    UnknownKey {
        /// The deployment version.
        version: u64,
        /// The key id the signature names.
        key: String,
    },
    /// No candidate key verifies the signature.
    #[error(
        "deployment version {0} has a bad signature (tampered, signed for another node or version, or by another key)"
    )]
    Mismatch(u64),
}

/// Checks the signature of `desired` for `node` against `keys`; returns the signing key's id.
pub fn verify(
    desired: &DesiredState,
    node: &str,
    keys: &[TrustedKey],
) -> Result<String, SignatureError> {
    let version = desired.version;
    let Some(signature) = &desired.signature else {
        return Err(SignatureError::Unsigned(version));
    };
    let signature = base64_decode(signature).map_err(|e| SignatureError::NotBase64 {
        version,
        reason: e.into(),
    })?;
    if keys.is_empty() {
        return Err(SignatureError::NoTrustedKey(version));
    }
    let candidates: Vec<&TrustedKey> = match &desired.key_id {
        Some(id) => {
            let found: Vec<_> = keys.iter().filter(|k| &k.id == id).collect();
            if found.is_empty() {
                return Err(SignatureError::UnknownKey {
                    version,
                    key: id.clone(),
                });
            }
            found
        }
        None => keys.iter().collect(),
    };
    let message = signed_bytes(node, desired);
    for key in candidates {
        if UnparsedPublicKey::new(&ED25519, &key.public)
            .verify(&message, &signature)
            .is_ok()
        {
            return Ok(key.id.clone());
        }
    }
    Err(SignatureError::Mismatch(version))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PKCS8_V1_ED25519_PREFIX;

    fn desired(version: u64, text: &str) -> DesiredState {
        DesiredState {
            version,
            deployment: text.into(),
            artifacts: Default::default(),
            precompiled: Vec::new(),
            system: None,
            signature: None,
            key_id: None,
        }
    }

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn base64_is_the_standard_alphabet_with_optional_padding_and_nothing_else() {
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        assert_eq!(base64_decode("+/8=").unwrap(), [0xfb, 0xff]);
        for bad in ["-_8=", "Zm8=Zm8=", "Zm 8=", "Zm8=\n", "Zm9=", "Z"] {
            assert!(base64_decode(bad).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn new_keys_are_pkcs8_v1_pem_of_the_seed() {
        let (pem, public) = generate_key().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let der = pem_or_der(pem.as_bytes()).unwrap();
        assert_eq!(der.len(), 48, "version 1, no public key inside");
        assert_eq!(der[..16], PKCS8_V1_ED25519_PREFIX);
        let seed: [u8; 32] = der[16..].try_into().unwrap();
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(hex::encode(pair.public_key().as_ref()), public);
        // DER works as well as PEM.
        let (sig, id) = sign(&der, "n", 1, "d").unwrap();
        assert_eq!(sign(pem.as_bytes(), "n", 1, "d").unwrap(), (sig, id));
    }

    #[test]
    fn keys_of_the_old_pkcs8_v2_form_still_sign() {
        let rng = ring::rand::SystemRandom::new();
        let v2 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let public = Ed25519KeyPair::from_pkcs8(v2.as_ref())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64_encode(v2.as_ref())
        );
        let key = TrustedKey {
            id: key_id(&public),
            public,
        };
        for form in [pem.as_bytes(), v2.as_ref()] {
            let (signature, id) = sign(form, "n1", 2, "text").unwrap();
            let d = DesiredState {
                precompiled: Vec::new(),
                system: None,
                signature: Some(signature),
                key_id: Some(id),
                ..desired(2, "text")
            };
            assert_eq!(
                verify(&d, "n1", std::slice::from_ref(&key)).unwrap(),
                key.id
            );
        }
    }

    #[test]
    fn key_files_that_are_not_pkcs8_ed25519_are_named() {
        let err = format!("{:#}", sign(b"hello", "n", 1, "d").unwrap_err());
        assert!(err.contains("BEGIN PRIVATE KEY"), "{err}");
        let rsa_like = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        let err = format!("{:#}", sign(rsa_like.as_bytes(), "n", 1, "d").unwrap_err());
        assert!(err.contains("BEGIN PRIVATE KEY"), "{err}");
        let err = format!(
            "{:#}",
            sign(&[0x30, 0x03, 0x02, 0x01, 0x00], "n", 1, "d").unwrap_err()
        );
        assert!(err.contains("not an ed25519 PKCS#8 private key"), "{err}");
    }

    #[test]
    fn signatures_verify_only_for_the_signed_node_version_and_text() {
        let (pem, public) = generate_key().unwrap();
        let key = parse_public_key(&public).unwrap();
        let mut d = desired(3, "[[workloads]]\n");
        let (sig, id) = sign(pem.as_bytes(), "n1", 3, &d.deployment).unwrap();
        assert_eq!(id, key.id);
        d.signature = Some(sig);
        d.key_id = Some(id);
        assert_eq!(
            verify(&d, "n1", std::slice::from_ref(&key)).unwrap(),
            key.id
        );
        let err = verify(&d, "n2", std::slice::from_ref(&key))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad signature"), "{err}");
        let mut tampered = d.clone();
        tampered.deployment.push('#');
        assert!(verify(&tampered, "n1", std::slice::from_ref(&key)).is_err());
        let mut bumped = d.clone();
        bumped.version = 4;
        assert!(verify(&bumped, "n1", std::slice::from_ref(&key)).is_err());
        let (_, other) = generate_key().unwrap();
        let other = parse_public_key(&other).unwrap();
        let err = verify(&d, "n1", &[other]).unwrap_err().to_string();
        assert!(err.contains("not in hub.trusted-keys"), "{err}");
        let err = verify(&desired(5, "x"), "n1", &[key])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsigned"), "{err}");
    }

    #[test]
    fn public_keys_parse_from_hex_or_base64_and_bad_ones_are_named() {
        let hex_key = "11".repeat(32);
        let a = parse_public_key(&hex_key).unwrap();
        let b = parse_public_key(&base64_encode(&[0x11; 32])).unwrap();
        assert_eq!(a, b);
        let err = format!("{:#}", parse_public_key("abcd").unwrap_err());
        assert!(err.contains("\"abcd\""), "{err}");
    }
}
