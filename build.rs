//! Link settings that torch-sys cannot give downstream binaries.
//!
//! * An rpath to the real libtorch directory (symlinks resolved, so that the wheel's own
//!   `$ORIGIN/../../nvidia/...` rpaths still resolve): binaries and `cargo test` run without
//!   `LD_LIBRARY_PATH`.
//! * `csrc/libtorch_shim.cpp`, the libtorch calls tch does not expose (page-locked allocation,
//!   multi-tensor ops), compiled against the same libtorch headers.
//! * With feature `cuda`, `libtorch_cuda.so` is linked with `--no-as-needed`. rustc links with
//!   `--as-needed`, and nothing references a symbol of libtorch_cuda directly, so without this the
//!   library is dropped, its kernels never register, and CUDA silently looks unavailable.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => {
            panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys must stay a direct dependency")
        }
    };
    let real_dir = std::fs::canonicalize(lib.join("libtorch_cpu.so"))
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| lib.clone());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", real_dir.display());
    println!("cargo:rustc-env=COSINE_LIBTORCH_LIB={}", real_dir.display());

    git_revision();
    libtorch_shim(&real_dir);

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if !lib.join("libtorch_cuda.so").exists() {
            panic!(
                "feature `cuda` needs a CUDA build of libtorch, but {} has no libtorch_cuda.so \
                 (install one with `COSINE_WITH_CUDA=1 make setup` and `source launch/env.sh`)",
                lib.display()
            );
        }
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Compiles the libtorch shim with the flags torch-sys uses for its own wrapper.
fn libtorch_shim(lib_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/libtorch_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = lib_dir.join("../include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/libtorch_shim.cpp")
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false)
        .compile("cosine_libtorch_shim");
}

/// Records the git revision for `config.json` and `doctor` ("unknown" outside a checkout).
fn git_revision() {
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=COSINE_GIT_REVISION={revision}");
}
