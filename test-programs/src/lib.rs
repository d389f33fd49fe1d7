//! The guest device functions of `examples/`, built from source by `build.rs` for Lichen's
//! tests and benchmarks (Wasmtime's `test-programs` pattern).
//!
//! Each constant is the absolute path of a guest's `.wasm` file in the build directory, so
//! they are for tests run from the build tree. This crate is a dev-dependency only: the node
//! binary never builds these guests. The two guests the node's embedded default deployment
//! runs are checked in beside the agent (`agent/default-guests/`); a test of the agent checks
//! those copies against the builds here.

/// `examples/counter` (component): counts ticks in key-value state, publishes `count`.
pub const COUNTER: &str = env!("LICHEN_GUEST_COUNTER");
/// `examples/thermostat` (component): simulates a room and switches a heater.
pub const THERMOSTAT: &str = env!("LICHEN_GUEST_THERMOSTAT");
/// `examples/misbehave` (component): fails on purpose in the way its config `mode` asks.
pub const MISBEHAVE: &str = env!("LICHEN_GUEST_MISBEHAVE");
/// `examples/hello-wasi` built for `wasm32-wasip1`: a plain WASI preview-1 command module.
pub const HELLO_WASI: &str = env!("LICHEN_GUEST_HELLO_WASI");
/// `examples/hello-wasi` built for `wasm32-wasip2`: a component exporting `wasi:cli/run`.
pub const HELLO_WASI_CLI: &str = env!("LICHEN_GUEST_HELLO_WASI_CLI");
/// `examples/blinky` (component): toggles the output pin `led` on every tick.
pub const BLINKY: &str = env!("LICHEN_GUEST_BLINKY");
/// `examples/adc-sampler` (component): reads an MCP3008 ADC over SPI.
pub const ADC_SAMPLER: &str = env!("LICHEN_GUEST_ADC_SAMPLER");
/// `examples/env-sensor` (component): reads a TMP102 or BME280 sensor over I2C.
pub const ENV_SENSOR: &str = env!("LICHEN_GUEST_ENV_SENSOR");
/// `examples/button-led` (component): lights `led` while `button` is pressed (edge trigger).
pub const BUTTON_LED: &str = env!("LICHEN_GUEST_BUTTON_LED");

/// Every guest, by the name [`path`] takes, with its path.
pub const ALL: &[(&str, &str)] = &[
    ("counter", COUNTER),
    ("thermostat", THERMOSTAT),
    ("misbehave", MISBEHAVE),
    ("hello-wasi", HELLO_WASI),
    ("hello-wasi-cli", HELLO_WASI_CLI),
    ("blinky", BLINKY),
    ("adc-sampler", ADC_SAMPLER),
    ("env-sensor", ENV_SENSOR),
    ("button-led", BUTTON_LED),
];

/// Returns the path of the guest `name` (`counter`, `thermostat`, `misbehave`, `hello-wasi`,
/// `hello-wasi-cli`, `blinky`, `adc-sampler`, `env-sensor` or `button-led`), or `None` for
/// any other name.
pub fn path(name: &str) -> Option<&'static str> {
    ALL.iter()
        .find(|(known, _)| *known == name)
        .map(|(_, path)| *path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_built_as_the_kind_its_tests_expect() {
        for (name, path) in ALL {
            let bytes = std::fs::read(path).expect("build.rs built every guest");
            assert_eq!(&bytes[..4], b"\0asm", "{name} is not Wasm");
            // Bytes 4..8: version 0x0d, layer 1 for a component; version 1, layer 0 for a module.
            let expected: &[u8] = if *name == "hello-wasi" {
                &[1, 0, 0, 0]
            } else {
                &[0x0d, 0, 1, 0]
            };
            assert_eq!(&bytes[4..8], expected, "{name} has the wrong kind");
        }
        assert_eq!(path("counter"), Some(COUNTER));
        assert_eq!(path("nope"), None);
    }
}
