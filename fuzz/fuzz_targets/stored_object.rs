//! Fuzz target: `kairos_ops::fuzz::stored_object` must never panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kairos_ops::fuzz::stored_object(data));
