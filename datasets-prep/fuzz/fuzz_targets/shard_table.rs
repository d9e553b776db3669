//! Any bytes given to the shard parser: an error, or a layout whose records all lie in the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(layout) = datasets_prep::format::parse_shard(std::path::Path::new("fuzz"), data, 1000) {
        for e in layout.entries {
            assert!(e.offset + u64::from(e.length) <= data.len() as u64);
        }
    }
});
