//! libFuzzer entry of the `mqtt_guard` target (see `lichen_fuzz::targets`); built by `scripts/fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lichen_fuzz::targets::mqtt_guard(data));
