//! Publisher keys and signatures of desired states: the canonical bytes a publisher signs,
//! ed25519 signing and verification, key ids, and the key encodings (hex or base64 public keys,
//! PKCS#8 private keys in PEM or DER) that `lichen hub keygen` writes and nodes read.

use anyhow::{Context, Result, bail};
use ring::signature::{ED25519, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use super::DesiredState;

/// Domain separation prefix of the signed bytes (see [`canonical_bytes`]).
pub const SIGNATURE_CONTEXT: &str = "lichen-desired-v1";

/// The bytes a publisher signs: `lichen-desired-v1\n<node>\n<version>\n<deployment>`. The node
/// and version are inside so that a signed deployment cannot be replayed to another node or
/// under a higher version.
pub fn canonical_bytes(node: &str, version: u64, deployment: &str) -> Vec<u8> {
    format!("{SIGNATURE_CONTEXT}\n{node}\n{version}\n{deployment}").into_bytes()
}

/// A key's id: the first 16 hex digits of the SHA-256 of its 32 public-key bytes.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// A publisher key the node trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// [`key_id`] of the key.
    pub id: String,
    /// The raw ed25519 public key.
    pub public: Vec<u8>,
}

/// Parses an ed25519 public key written as 64 hex digits or as base64 of its 32 bytes.
pub fn parse_public_key(text: &str) -> Result<TrustedKey> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).context("hex public key")?
    } else {
        base64_decode(text)
            .with_context(|| format!("public key {text:?} is neither 64 hex digits nor base64"))?
    };
    if bytes.len() != 32 {
        bail!(
            "public key {text:?} has {} bytes; an ed25519 public key has 32",
            bytes.len()
        );
    }
    Ok(TrustedKey {
        id: key_id(&bytes),
        public: bytes,
    })
}

/// Signs a desired state with a PKCS#8 ed25519 key (DER, or PEM `PRIVATE KEY`); returns the
/// base64 signature and the key id.
pub fn sign(pkcs8: &[u8], node: &str, version: u64, deployment: &str) -> Result<(String, String)> {
    let der = pem_or_der(pkcs8)?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("not an ed25519 PKCS#8 private key: {e}"))?;
    let signature = pair.sign(&canonical_bytes(node, version, deployment));
    Ok((
        base64_encode(signature.as_ref()),
        key_id(pair.public_key().as_ref()),
    ))
}

/// Checks the signature of `desired` for `node` against `keys`; returns the signing key's id.
pub fn verify(desired: &DesiredState, node: &str, keys: &[TrustedKey]) -> Result<String, String> {
    let Some(signature) = &desired.signature else {
        return Err(format!(
            "deployment version {} is unsigned; this node accepts only deployments signed by a trusted key",
            desired.version
        ));
    };
    let signature = base64_decode(signature).map_err(|e| {
        format!(
            "deployment version {}: signature is not base64: {e}",
            desired.version
        )
    })?;
    if keys.is_empty() {
        return Err(format!(
            "deployment version {} is signed, but this node trusts no key (hub.trusted-keys is empty)",
            desired.version
        ));
    }
    let candidates: Vec<&TrustedKey> = match &desired.key_id {
        Some(id) => {
            let found: Vec<_> = keys.iter().filter(|k| &k.id == id).collect();
            if found.is_empty() {
                return Err(format!(
                    "deployment version {} is signed by key {id}, which is not in hub.trusted-keys",
                    desired.version
                ));
            }
            found
        }
        None => keys.iter().collect(),
    };
    let message = canonical_bytes(node, desired.version, &desired.deployment);
    for key in candidates {
        if UnparsedPublicKey::new(&ED25519, &key.public)
            .verify(&message, &signature)
            .is_ok()
        {
            return Ok(key.id.clone());
        }
    }
    Err(format!(
        "deployment version {} has a bad signature (tampered, signed for another node or version, or by another key)",
        desired.version
    ))
}
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace ignored).
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = B64
            .iter()
            .position(|&b| b == c)
            .with_context(|| format!("{:?} is not a base64 character", char::from(c)))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// The DER of a PEM `PRIVATE KEY`, or the bytes as they are if they are not PEM.
fn pem_or_der(bytes: &[u8]) -> Result<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    let Some(start) = text.find("-----BEGIN PRIVATE KEY-----") else {
        bail!("key file is text but holds no -----BEGIN PRIVATE KEY----- block");
    };
    let body = &text[start + "-----BEGIN PRIVATE KEY-----".len()..];
    let end = body
        .find("-----END PRIVATE KEY-----")
        .context("key file has no -----END PRIVATE KEY----- line")?;
    base64_decode(&body[..end]).context("key file's PEM body is not base64")
}

/// A new ed25519 key pair: the private key as PKCS#8 PEM, and the public key as hex.
pub fn generate_key() -> Result<(String, String)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("cannot generate an ed25519 key: no system randomness"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("generated key does not parse: {e}"))?;
    let body = base64_encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, hex::encode(pair.public_key().as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(version: u64, text: &str) -> DesiredState {
        DesiredState {
            version,
            deployment: text.into(),
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
        let err = verify(&d, "n2", std::slice::from_ref(&key)).unwrap_err();
        assert!(err.contains("bad signature"), "{err}");
        let mut tampered = d.clone();
        tampered.deployment.push('#');
        assert!(verify(&tampered, "n1", std::slice::from_ref(&key)).is_err());
        let mut bumped = d.clone();
        bumped.version = 4;
        assert!(verify(&bumped, "n1", std::slice::from_ref(&key)).is_err());
        let (_, other) = generate_key().unwrap();
        let other = parse_public_key(&other).unwrap();
        let err = verify(&d, "n1", &[other]).unwrap_err();
        assert!(err.contains("not in hub.trusted-keys"), "{err}");
        let err = verify(&desired(5, "x"), "n1", &[key]).unwrap_err();
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
