//! Where this process's shared libraries came from.

use std::path::{Path, PathBuf};

/// The directory of the libtorch_cpu.so this process actually loaded (it can differ from the one
/// the binary was built against when LD_LIBRARY_PATH points elsewhere).
pub fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent().map(PathBuf::from))
        .or_else(|| Some(PathBuf::from(env!("COSINE_LIBTORCH_LIB"))))
}
