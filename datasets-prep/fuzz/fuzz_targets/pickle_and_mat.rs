//! The pickle and MAT v5 readers on any bytes: an error or a value, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = datasets_prep::pickle::parse(data) {
        let _ = datasets_prep::pickle::ndarray(&v);
    }
    let _ = datasets_prep::mat::read_mat(data);
});
