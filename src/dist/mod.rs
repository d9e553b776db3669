//! Collective communication between the ranks of a job.
//!
//! Every backend implements [`Communicator`]. Control flow must be rank-symmetric: every rank calls
//! every collective in the same order, otherwise the job hangs (or, with a collective timeout,
//! aborts). Backends:
//! * [`single::SingleProcess`]: one rank, collectives are identities; no MPI initialised.
//! * [`mpi::MpiCommunicator`]: CPU buffers over MPI (rsmpi, OpenMPI).
//! * [`nccl::NcclCommunicator`]: CUDA tensors over NCCL, loaded at run time; bootstrapped over MPI.

pub mod mpi;
pub mod nccl;
pub mod single;

use std::fmt;

use tch::Tensor;

/// Errors of the collective layer. Each names the operation and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("NCCL not available: {0}")]
    NcclUnavailable(String),
    #[error("MPI could not be initialised: {0}")]
    MpiInit(String),
    #[error("{op}: expected {expected}, got {got}")]
    BadArgument {
        op: &'static str,
        expected: String,
        got: String,
    },
    #[error("{op} failed: {detail}")]
    Failed { op: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, DistError>;

/// The collective operations training needs, identical in meaning on every backend.
pub trait Communicator {
    /// Short backend name, as accepted by `--dist`.
    fn backend(&self) -> Backend;
    /// This process's rank in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the job.
    fn size(&self) -> usize;
    /// Rank among the processes on this node (shared-memory domain); selects the GPU.
    fn local_rank(&self) -> usize;
    /// Number of ranks on this node.
    fn local_size(&self) -> usize;
    /// Element-wise sum over all ranks of a host buffer, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over all ranks of a contiguous f32 tensor, in place. The tensor must live
    /// where the backend works (CPU for MPI, the rank's GPU for NCCL).
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()>;
    /// Replace `bytes` on every rank by the bytes of rank `root` (any length).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Block until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// End the whole job: print `message` (prefixed with this rank) and make every rank exit with
    /// `code`. Never returns.
    fn abort(&self, message: &str, code: i32) -> !;
}

/// Which backend to use (`--dist`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// MPI on CPU, NCCL when the device is CUDA.
    Auto,
    /// One process, no MPI.
    Single,
    /// MPI (CPU tensors).
    Mpi,
    /// NCCL (CUDA tensors), bootstrapped over MPI.
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Single => "single",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        })
    }
}

/// Builds the communicator for `backend` on `device`. `Auto` resolves to NCCL for CUDA devices
/// and MPI otherwise.
pub fn connect(backend: Backend, device: tch::Device) -> Result<Box<dyn Communicator>> {
    let resolved = match backend {
        Backend::Auto if device.is_cuda() => Backend::Nccl,
        Backend::Auto => Backend::Mpi,
        other => other,
    };
    Ok(match resolved {
        Backend::Single => Box::new(single::SingleProcess),
        Backend::Mpi => Box::new(mpi::MpiCommunicator::init()?),
        Backend::Nccl => {
            let gpu = match device {
                tch::Device::Cuda(i) => Some(i),
                _ => None,
            };
            Box::new(nccl::NcclCommunicator::init(gpu)?)
        }
        Backend::Auto => unreachable!("auto was resolved above"),
    })
}

/// Checks that `tensor` is a contiguous f32 tensor on the expected kind of device and returns its
/// element count.
pub(crate) fn check_reducible(op: &'static str, tensor: &Tensor, want_cuda: bool) -> Result<usize> {
    if tensor.kind() != tch::Kind::Float {
        return Err(DistError::BadArgument {
            op,
            expected: "an f32 tensor".into(),
            got: format!("{:?}", tensor.kind()),
        });
    }
    if tensor.device().is_cuda() != want_cuda {
        return Err(DistError::BadArgument {
            op,
            expected: if want_cuda {
                "a CUDA tensor".into()
            } else {
                "a CPU tensor".into()
            },
            got: format!("a tensor on {:?}", tensor.device()),
        });
    }
    if !tensor.is_contiguous() {
        return Err(DistError::BadArgument {
            op,
            expected: "a contiguous tensor".into(),
            got: format!("strides {:?}", tensor.stride()),
        });
    }
    Ok(tensor.numel())
}
