//! Fuzz targets for everything Lichen reads from outside: deployment files (TOML and JSON),
//! the agent config and board profiles, every hub message kind, the broker's byte stream
//! through the MQTT size guard, bundles, OCI images, the host
//! calls a guest makes, and the state store those inputs end up in.
//!
//! Each target is a function of one byte slice that panics when the code under test panics
//! or breaks a property (the module docs of each target list its properties). Two drivers
//! run them:
//! - `cargo fuzz` (libFuzzer, coverage-guided), through `scripts/fuzz [MINUTES]`: the binaries
//!   in `fuzz_targets/`, built with the `libfuzzer` feature, on the stable toolchain
//!   (`--sanitizer none`);
//! - [`harness`], a stable, deterministic pass that `cargo test` runs (so CI does): every
//!   checked-in regression input and seed, then a fixed number of inputs mutated from the
//!   seeds or drawn at random.
//!
//! ```
//! // A target takes any bytes; this one is a generated deployment (odd first byte) in TOML.
//! lichen_fuzz::targets::deployment_toml(&[1, 2, 3, 4]);
//! ```

pub mod harness;
pub mod input;
pub mod keys;
pub mod sandbox;

mod bundle;
mod config;
mod deployment;
mod host_calls;
mod hub;
mod mqtt;
mod oci;
mod store;

/// The fuzz targets, one function per input kind.
pub mod targets {
    /// A deployment file in TOML (`lichen deploy deploy.toml`, or a hub desired state).
    pub fn deployment_toml(data: &[u8]) {
        crate::deployment::toml(data)
    }

    /// A deployment file in JSON (`lichen deploy deploy.json`).
    pub fn deployment_json(data: &[u8]) {
        crate::deployment::json(data)
    }

    /// The agent config file (`lichen run --config`) and board profiles.
    pub fn agent_config(data: &[u8]) {
        crate::config::agent_config(data)
    }

    /// A hub message: desired state, command, artifact manifest or chunk, any topic.
    pub fn hub_message(data: &[u8]) {
        crate::hub::hub_message(data)
    }

    /// The bytes a broker sends, through the inbound MQTT size guard.
    pub fn mqtt_guard(data: &[u8]) {
        crate::mqtt::mqtt_guard(data)
    }

    /// A deployment bundle (`lichen import`), as a tar file or a directory.
    pub fn bundle(data: &[u8]) {
        crate::bundle::bundle(data)
    }

    /// An OCI image layout or tarball imported into the image store, in a sandbox.
    pub fn oci_image(data: &[u8]) {
        crate::oci::oci_image(data)
    }

    /// Sequences of WIT host calls with arbitrary arguments, on the simulated board.
    pub fn host_calls(data: &[u8]) {
        crate::host_calls::host_calls(data)
    }

    /// The generator-independent (raw) form of a structured input of `target`, for the text
    /// targets: the same bytes a regression input should hold. `None` when the input is raw
    /// already or the target has no raw form of it.
    pub fn as_raw(target: &str, data: &[u8]) -> Option<Vec<u8>> {
        match target {
            "deployment_toml" => crate::deployment::as_raw(data, false),
            "deployment_json" => crate::deployment::as_raw(data, true),
            "agent_config" => crate::config::as_raw(data),
            _ => None,
        }
    }

    /// A target: one input in, a panic out when something is wrong.
    pub type Target = fn(&[u8]);

    /// Sequences of state store writes (concurrent batches, restarts) checked against a model.
    pub fn store(data: &[u8]) {
        crate::store::store(data)
    }

    /// Every target by name, as `fuzz_targets/` and `seeds/` name them.
    pub const ALL: &[(&str, Target)] = &[
        ("deployment_toml", deployment_toml),
        ("deployment_json", deployment_json),
        ("agent_config", agent_config),
        ("hub_message", hub_message),
        ("mqtt_guard", mqtt_guard),
        ("bundle", bundle),
        ("oci_image", oci_image),
        ("host_calls", host_calls),
        ("store", store),
    ];
}
