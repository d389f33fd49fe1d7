//! libFuzzer entry of the `deployment_toml` target (see `lichen_fuzz::targets`); built by `scripts/fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lichen_fuzz::targets::deployment_toml(data));
