//! Any bytes as a `.npy` class-embedding matrix (`--embedding`): an error or a matrix whose
//! values fill its shape, never a panic. The reader is the trainer's own source file.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../../src/embedding/npy.rs"]
mod npy;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = npy::read_matrix(data) {
        assert_eq!(m.values.len(), m.rows * m.cols);
    }
});
