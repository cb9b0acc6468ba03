//! libFuzzer target: the fuzz input is everything the (model) NVMe device answers.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
