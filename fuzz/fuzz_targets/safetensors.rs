//! Any bytes as a checkpoint's or run's `.safetensors` file: an error or named CPU tensors whose
//! element counts match their shapes, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = cosine_train::run_dir::checkpoint::from_safetensors(data, "fuzz") {
        for (_, t) in tensors {
            assert_eq!(t.numel() as i64, t.size().iter().product::<i64>());
        }
    }
});
