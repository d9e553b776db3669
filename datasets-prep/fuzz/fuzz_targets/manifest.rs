//! Any bytes given to the manifest parser: an error or a manifest, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = datasets_prep::Manifest::parse(std::path::Path::new("fuzz"), data);
});
