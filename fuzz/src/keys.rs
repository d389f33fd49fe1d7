//! One fixed ed25519 publisher key, so generated desired states and bundles can carry valid
//! signatures and reach what comes after verification.

use lichen_agent::hub::{self, TrustedKey};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The node every generated message and bundle is for.
pub const NODE: &str = "node-1";

fn pair() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a 32-byte seed is an ed25519 key")
}

/// The key the node trusts.
pub fn trusted() -> TrustedKey {
    let public = pair().public_key().as_ref().to_vec();
    TrustedKey {
        id: hub::key_id(&public),
        public,
    }
}

/// Signs `deployment` as version `version` for `node`: the base64 signature and the key id.
pub fn sign(node: &str, version: u64, deployment: &str) -> (String, String) {
    let pair = pair();
    let signature = pair.sign(&hub::canonical_bytes(node, version, deployment));
    (
        hub::base64_encode(signature.as_ref()),
        hub::key_id(pair.public_key().as_ref()),
    )
}

/// Signs `desired` for `node` as a publisher does ([`hub::signed_bytes`]: the v2 bytes, with
/// the artifact sizes, when it lists any): the base64 signature and the key id.
pub fn sign_desired(node: &str, desired: &hub::DesiredState) -> (String, String) {
    let pair = pair();
    let signature = pair.sign(&hub::signed_bytes(node, desired));
    (
        hub::base64_encode(signature.as_ref()),
        hub::key_id(pair.public_key().as_ref()),
    )
}
