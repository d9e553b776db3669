//! `cosine-train doctor`: what this binary runs on (libtorch, CUDA, MPI, NCCL, threads).
//!
//! Nothing here initialises MPI or touches a GPU, so it is safe on a login node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The environment report, printed as text or JSON.
#[derive(Debug, Serialize)]
pub struct EnvReport {
    pub cosine_train_version: &'static str,
    pub git_revision: &'static str,
    pub libtorch_version: String,
    pub libtorch_dir: Option<PathBuf>,
    pub built_with_cuda_feature: bool,
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cuda_unavailable_reason: Option<String>,
    pub cudnn_version: Option<i64>,
    pub mpi_library: String,
    pub nccl_loadable: bool,
    /// The name or path libnccl was opened under.
    pub nccl_library: Option<String>,
    pub nccl_version: Option<String>,
    pub nccl_unavailable_reason: Option<String>,
    pub torch_threads: i32,
    pub torch_interop_threads: i32,
    pub cpu_cores_available: usize,
}

/// Collects the report.
pub fn collect() -> EnvReport {
    let cuda_available = tch::Cuda::is_available();
    let libtorch_dir = crate::runtime::libraries::loaded_libtorch_dir();
    let nccl_library = crate::dist::nccl::library_origin();
    EnvReport {
        cosine_train_version: env!("CARGO_PKG_VERSION"),
        git_revision: env!("COSINE_GIT_REVISION"),
        libtorch_version: libtorch_dir
            .as_deref()
            .and_then(libtorch_version_in)
            .unwrap_or_else(|| "unknown".into()),
        libtorch_dir,
        built_with_cuda_feature: crate::runtime::device::BUILT_WITH_CUDA,
        cuda_available,
        cuda_device_count: tch::Cuda::device_count(),
        cuda_unavailable_reason: (!cuda_available)
            .then(crate::runtime::device::cuda_unavailable_reason),
        cudnn_version: (cuda_available && tch::Cuda::cudnn_is_available())
            .then(tch::utils::version_cudnn),
        mpi_library: crate::dist::mpi::library_version(),
        nccl_loadable: nccl_library.is_some(),
        nccl_library,
        nccl_version: crate::dist::nccl::library_version(),
        nccl_unavailable_reason: crate::dist::nccl::unavailable_reason(),
        torch_threads: tch::get_num_threads(),
        torch_interop_threads: tch::get_num_interop_threads(),
        cpu_cores_available: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

impl EnvReport {
    /// One line for `--version`.
    pub fn summary_line(&self) -> String {
        format!(
            "{} (git {}) libtorch {}, CUDA {}, {}, NCCL {}",
            self.cosine_train_version,
            self.git_revision,
            self.libtorch_version,
            if self.cuda_available {
                format!("yes ({} GPUs)", self.cuda_device_count)
            } else {
                "no".into()
            },
            self.mpi_library.split(',').next().unwrap_or("MPI unknown"),
            self.nccl_version.as_deref().unwrap_or("not loadable"),
        )
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let mut lines = vec![
            format!(
                "cosine-train     {} (git {})",
                self.cosine_train_version, self.git_revision
            ),
            format!("libtorch         {}", self.libtorch_version),
            format!(
                "libtorch dir     {}",
                self.libtorch_dir
                    .as_ref()
                    .map_or("unknown".into(), |p| p.display().to_string())
            ),
            format!("cuda feature     {}", yes_no(self.built_with_cuda_feature)),
            format!(
                "cuda available   {} ({} device(s))",
                yes_no(self.cuda_available),
                self.cuda_device_count
            ),
        ];
        if let Some(reason) = &self.cuda_unavailable_reason {
            lines.push(format!("  why not        {reason}"));
        }
        if let Some(v) = self.cudnn_version {
            lines.push(format!("cudnn            {v}"));
        }
        lines.push(format!(
            "mpi library      {}",
            self.mpi_library.lines().next().unwrap_or("")
        ));
        lines.push(format!(
            "nccl loadable    {} ({}{})",
            yes_no(self.nccl_loadable),
            opt(&self.nccl_version),
            self.nccl_library
                .as_ref()
                .map_or(String::new(), |origin| format!(", {origin}"))
        ));
        if let Some(reason) = &self.nccl_unavailable_reason {
            lines.push(format!("  why not        {reason}"));
        }
        lines.push(format!(
            "threads          {} intra-op, {} inter-op, {} core(s) available",
            self.torch_threads, self.torch_interop_threads, self.cpu_cores_available
        ));
        lines.join("\n")
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Reads the version of the libtorch whose `lib/` directory is `lib_dir`: the PyPI wheel has
/// `torch/version.py`, the C++ distribution a `build-version` file.
fn libtorch_version_in(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest.trim_start_matches([' ', '=', ':']).trim();
                let v = v
                    .rsplit('=')
                    .next()
                    .unwrap_or(v)
                    .trim()
                    .trim_matches(['\'', '"']);
                return Some(v.to_string());
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wheel_and_cxx_version_files() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir(&lib).unwrap();
        std::fs::write(
            dir.path().join("version.py"),
            "from typing import Optional\n__version__: str = '2.11.0+cu130'\ncuda = '13.0'\n",
        )
        .unwrap();
        assert_eq!(libtorch_version_in(&lib).as_deref(), Some("2.11.0+cu130"));
        std::fs::remove_file(dir.path().join("version.py")).unwrap();
        std::fs::write(dir.path().join("build-version"), "2.11.0+cpu\n").unwrap();
        assert_eq!(libtorch_version_in(&lib).as_deref(), Some("2.11.0+cpu"));
    }
}
