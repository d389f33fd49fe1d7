//! Publisher keys and their text forms: key ids, trusted public keys, base64 as Lichen reads
//! it, PKCS#8 private keys (PEM or DER) and new key pairs. Both the hub link (signed desired
//! states) and `lichen update` (signed bundles) use them; neither owns them.

use anyhow::{Context, Result, bail};
use base64::Engine;
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::{self, PemObject};
use sha2::{Digest, Sha256};

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

/// Base64 as Lichen reads it: the standard alphabet (RFC 4648 section 4: `A-Z a-z 0-9 + /`),
/// `=` padding optional, no whitespace or line breaks.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// Decodes standard base64 (padding optional; no whitespace).
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    BASE64
        .decode(text)
        .map_err(|e| anyhow::anyhow!("not standard base64: {e}"))
}

/// The DER of a PKCS#8 private key given as PEM (`PRIVATE KEY`) or as DER (which starts with a
/// SEQUENCE tag, 0x30).
pub fn pem_or_der(bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    match PrivatePkcs8KeyDer::from_pem_slice(bytes) {
        Ok(der) => Ok(der.secret_pkcs8_der().to_vec()),
        Err(pem::Error::NoItemsFound) => {
            bail!("key file holds no -----BEGIN PRIVATE KEY----- block (PKCS#8 PEM) and is not DER")
        }
        Err(e) => bail!("key file's PEM is malformed: {e}"),
    }
}

/// PKCS#8 v1 (RFC 5208 `PrivateKeyInfo`) of an Ed25519 key up to its 32-byte seed, as RFC 8410
/// section 7 gives it: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING {
/// OCTET STRING (32 bytes) } }. The form OpenSSL, Python's `cryptography` and ring all read
/// (ring's own `generate_pkcs8` writes v2, with the public key, which OpenSSL 3 refuses).
pub(crate) const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new ed25519 key pair: the private key as PKCS#8 v1 PEM (`PRIVATE KEY`), and the public
/// key as hex.
pub fn generate_key() -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| anyhow::anyhow!("cannot generate an ed25519 key: no system randomness"))?;
    let mut der = PKCS8_V1_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    seed.fill(0);
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("generated key does not parse: {e}"))?;
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in base64_encode(&der).as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    der.fill(0);
    Ok((pem, hex::encode(pair.public_key().as_ref())))
}
