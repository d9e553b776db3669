//! Any bytes as a class hierarchy (`--hierarchy`), in both line orders: an error or a tree, never
//! a panic; a tree's derived tables (leaves, heights, similarities of a few leaves) never panic.
//! The parser is the trainer's own source file (it needs no libtorch).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../../src/embedding/hierarchy.rs"]
mod hierarchy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for is_a in [false, true] {
        if let Ok(h) = hierarchy::Hierarchy::parse(text, is_a, "fuzz") {
            let leaves = h.leaves();
            let _ = h.heights();
            let few: Vec<i64> = leaves.into_iter().take(16).collect();
            let _ = h.similarity(&few);
        }
    }
});
