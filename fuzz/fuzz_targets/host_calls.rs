//! libFuzzer entry of the `host_calls` target (see `lichen_fuzz::targets`); built by `scripts/fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lichen_fuzz::targets::host_calls(data));
