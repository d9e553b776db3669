//! Any bytes as a checkpoint's `state.json` (the file that names and sizes the others): loading
//! the checkpoint is an error or a checkpoint, never a panic, and never reads outside it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cosine-fuzz-{}", std::process::id()));
    let checkpoint = dir.join("step-000000000001");
    std::fs::create_dir_all(&checkpoint).expect("scratch checkpoint directory");
    std::fs::write(checkpoint.join("state.json"), data).expect("write state.json");
    let _ = cosine_train::run_dir::checkpoint::load(&checkpoint);
});
