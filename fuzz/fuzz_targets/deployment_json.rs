//! libFuzzer entry of the `deployment_json` target (see `lichen_fuzz::targets`); built by `scripts/fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lichen_fuzz::targets::deployment_json(data));
