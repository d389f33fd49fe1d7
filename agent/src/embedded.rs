//! Device functions built into the binary for the default deployment.
//!
//! `build.rs` builds the guests of `examples/` from source and passes their paths in
//! `LICHEN_GUEST_*` environment variables. The agent embeds the two that its default
//! deployment runs; the paths of all of them are available to tests and benchmarks through
//! [`guest_path`].

/// The `counter` component (`examples/counter`): counts ticks in key-value state and publishes
/// the count on telemetry stream `count`. One of the device functions of the embedded default
/// deployment.
pub const COUNTER: &[u8] = include_bytes!(env!("LICHEN_GUEST_COUNTER"));

/// The `thermostat` component (`examples/thermostat`): simulates a room and switches a heater
/// with hysteresis, publishing on telemetry stream `climate`. One of the device functions of
/// the embedded default deployment.
pub const THERMOSTAT: &[u8] = include_bytes!(env!("LICHEN_GUEST_THERMOSTAT"));

/// Names of the guests [`guest_path`] knows.
pub const GUEST_NAMES: &[&str] = &[
    "counter",
    "thermostat",
    "misbehave",
    "hello-wasi",
    "hello-wasi-cli",
    "blinky",
    "adc-sampler",
    "env-sensor",
    "button-led",
];

/// Returns the absolute path of the `.wasm` file that `build.rs` built for the guest `name`
/// (`counter`, `thermostat`, `misbehave`, `hello-wasi`, `hello-wasi-cli`, `blinky`, `adc-sampler`,
/// `env-sensor` or `button-led`), or `None` for any other name.
///
/// The paths point into the build directory, so they are for tests and benchmarks run from
/// the build tree, not for an installed binary.
pub fn guest_path(name: &str) -> Option<&'static str> {
    match name {
        "counter" => Some(env!("LICHEN_GUEST_COUNTER")),
        "thermostat" => Some(env!("LICHEN_GUEST_THERMOSTAT")),
        "misbehave" => Some(env!("LICHEN_GUEST_MISBEHAVE")),
        "hello-wasi" => Some(env!("LICHEN_GUEST_HELLO_WASI")),
        "hello-wasi-cli" => Some(env!("LICHEN_GUEST_HELLO_WASI_CLI")),
        "blinky" => Some(env!("LICHEN_GUEST_BLINKY")),
        "adc-sampler" => Some(env!("LICHEN_GUEST_ADC_SAMPLER")),
        "env-sensor" => Some(env!("LICHEN_GUEST_ENV_SENSOR")),
        "button-led" => Some(env!("LICHEN_GUEST_BUTTON_LED")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_built_and_embedded_ones_are_components() {
        for name in GUEST_NAMES {
            let path = guest_path(name).expect("every listed guest has a path");
            let bytes = std::fs::read(path).expect("build.rs built every guest");
            assert_eq!(&bytes[..4], b"\0asm", "{name} is not Wasm");
        }
        assert_eq!(guest_path("nope"), None);
        // Byte 4..8: version 0x0d plus layer 1 for a component, version 1 layer 0 for a module.
        assert_eq!(&COUNTER[4..8], &[0x0d, 0, 1, 0]);
        assert_eq!(&THERMOSTAT[4..8], &[0x0d, 0, 1, 0]);
    }
}
