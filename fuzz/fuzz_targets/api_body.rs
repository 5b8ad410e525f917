//! Fuzz target: `kairos_ops::fuzz::api_bodies` must never panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kairos_ops::fuzz::api_bodies(data));
