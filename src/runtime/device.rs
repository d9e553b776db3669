//! Which device a rank computes on (`--device`).

use std::fmt;
use std::str::FromStr;

/// The device a user asks for. `cuda` without an index means "the GPU of my local rank".
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceChoice {
    Cpu,
    Cuda(Option<usize>),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(Some(i))),
                _ => Err(format!(
                    "unknown device '{s}': expected cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(i)) => write!(f, "cuda:{i}"),
        }
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl DeviceChoice {
    /// Resolves the choice for a rank, checking that the device exists. A bare `cuda` picks the
    /// GPU numbered by the rank's local rank (GPU slot), or the only GPU when one is visible.
    pub fn resolve(self, local_rank: usize) -> anyhow::Result<tch::Device> {
        match self {
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Cuda(index) => {
                self.ensure_available()?;
                let count = tch::Cuda::device_count() as usize;
                Ok(tch::Device::Cuda(gpu_index(
                    self, index, local_rank, count,
                )?))
            }
        }
    }

    /// Fails with a clear message when CUDA is asked for but libtorch cannot use it. Cheap;
    /// call it before anything expensive (MPI, data loading) starts.
    pub fn ensure_available(self) -> anyhow::Result<()> {
        if matches!(self, Self::Cuda(_)) && !tch::Cuda::is_available() {
            anyhow::bail!(
                "--device {self} was requested but CUDA is not available: {}",
                cuda_unavailable_reason()
            );
        }
        Ok(())
    }
}

/// The GPU a rank with GPU slot `local_rank` uses among `count` visible ones: `cuda:N` names it;
/// a bare `cuda` takes the only GPU when one is visible (a launcher that binds a GPU to each
/// task: srun --gpus-per-task=1 or --gpu-bind, or CUDA_VISIBLE_DEVICES set per rank), else the
/// one numbered by the slot.
fn gpu_index(
    choice: DeviceChoice,
    index: Option<usize>,
    local_rank: usize,
    count: usize,
) -> anyhow::Result<usize> {
    let gpu = index.unwrap_or(if count == 1 { 0 } else { local_rank });
    if gpu >= count {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES")
            .map_or_else(|_| "unset".to_string(), |v| format!("{v:?}"));
        anyhow::bail!(
            "--device {choice} on local rank {local_rank} resolves to GPU {gpu}, but {count} \
             GPU(s) are visible (CUDA_VISIBLE_DEVICES {visible}); start one rank per visible GPU, \
             or bind one GPU to each task"
        );
    }
    Ok(gpu)
}

/// Whether this binary force-links libtorch_cuda (feature `cuda`).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// Whether libtorch's CUDA library is mapped into this process. (libtorch's own `hasCUDA` is
/// also false for a CUDA build on a machine without a driver, so it cannot tell the two apart.)
fn libtorch_cuda_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|maps| maps.contains("libtorch_cuda.so"))
}

/// A sentence on why libtorch sees no GPU.
pub fn cuda_unavailable_reason() -> String {
    if !BUILT_WITH_CUDA {
        "this binary was built without the `cuda` feature, so libtorch's CUDA kernels are not \
         linked (rebuild with `cargo build --release --features cuda` against a CUDA libtorch)"
            .to_string()
    } else if !libtorch_cuda_loaded() {
        "the libtorch this binary loaded is a CPU-only build (no libtorch_cuda)".to_string()
    } else {
        "libtorch found no CUDA device (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides the GPUs)"
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(None)));
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>(),
            Ok(DeviceChoice::Cuda(Some(3)))
        );
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(DeviceChoice::Cpu.resolve(5).unwrap(), tch::Device::Cpu);
    }

    #[test]
    fn gpu_follows_the_binding() {
        let cuda = DeviceChoice::Cuda(None);
        // Per-task binding: each rank sees its own GPU as the only one.
        assert_eq!(gpu_index(cuda, None, 3, 1).unwrap(), 0);
        // A node's GPUs all visible: the local rank's.
        assert_eq!(gpu_index(cuda, None, 3, 4).unwrap(), 3);
        // Named explicitly.
        assert_eq!(
            gpu_index(DeviceChoice::Cuda(Some(1)), Some(1), 0, 2).unwrap(),
            1
        );
        // More ranks than visible GPUs.
        let err = gpu_index(cuda, None, 2, 2).unwrap_err().to_string();
        assert!(
            err.contains("local rank 2") && err.contains("CUDA_VISIBLE_DEVICES"),
            "{err}"
        );
        assert!(gpu_index(DeviceChoice::Cuda(Some(4)), Some(4), 0, 2).is_err());
    }
}
