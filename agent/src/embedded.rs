//! Device functions built into the binary for the default deployment.
//!
//! The node embeds the two guests its default deployment runs (`lichen run` on a fresh
//! machine) from copies checked in under `agent/default-guests/`, so building the node builds
//! no guest. Those copies are the release builds of `examples/counter` and
//! `examples/thermostat` with the pinned toolchain (`rust-toolchain.toml`) and the examples'
//! lock file, which are reproducible byte for byte; a test below rebuilds nothing itself but
//! compares them with the builds of the dev-only `lichen-test-programs` crate, and fails when
//! a guest's source, the WIT or the toolchain changed without the copies being refreshed
//! (`LICHEN_BLESS_DEFAULT_GUESTS=1 cargo test -p lichen-agent --lib embedded` refreshes them).
//! Tests and benchmarks that need the other example guests take their paths from
//! `lichen-test-programs`.

/// The `counter` component (`examples/counter`): counts ticks in key-value state and publishes
/// the count on telemetry stream `count`. One of the device functions of the embedded default
/// deployment.
pub const COUNTER: &[u8] = include_bytes!("../default-guests/counter.wasm");

/// The `thermostat` component (`examples/thermostat`): simulates a room and switches a heater
/// with hysteresis, publishing on telemetry stream `climate`. One of the device functions of
/// the embedded default deployment.
pub const THERMOSTAT: &[u8] = include_bytes!("../default-guests/thermostat.wasm");

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in copies are what their sources build today: a change to `examples/counter`,
    /// `examples/thermostat`, the WIT or the toolchain that was not carried into
    /// `agent/default-guests/` fails here, naming the file and how to refresh it.
    #[test]
    fn embedded_default_guests_are_the_builds_of_their_sources() {
        let bless = std::env::var_os("LICHEN_BLESS_DEFAULT_GUESTS").is_some();
        for (embedded, built, file) in [
            (COUNTER, lichen_test_programs::COUNTER, "counter.wasm"),
            (
                THERMOSTAT,
                lichen_test_programs::THERMOSTAT,
                "thermostat.wasm",
            ),
        ] {
            let fresh = std::fs::read(built).expect("lichen-test-programs built the guest");
            if embedded == fresh.as_slice() {
                continue;
            }
            let checked_in = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("default-guests")
                .join(file);
            if bless {
                std::fs::write(&checked_in, &fresh).expect("write the refreshed guest");
                continue;
            }
            panic!(
                "{} ({} bytes) is not the build of its source ({built}, {} bytes): refresh it \
                 with LICHEN_BLESS_DEFAULT_GUESTS=1 cargo test -p lichen-agent --lib embedded",
                checked_in.display(),
                embedded.len(),
                fresh.len(),
            );
        }
        // Byte 4..8: version 0x0d plus layer 1 for a component.
        assert_eq!(&COUNTER[4..8], &[0x0d, 0, 1, 0]);
        assert_eq!(&THERMOSTAT[4..8], &[0x0d, 0, 1, 0]);
    }
}
