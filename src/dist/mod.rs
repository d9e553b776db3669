//! Collective communication between the ranks of a job.
//!
//! Every backend implements [`Communicator`]. Control flow must be rank-symmetric: every rank calls
//! every collective in the same order, otherwise the job hangs (or, with a collective timeout,
//! aborts). Backends:
//! * [`single::SingleProcess`]: one rank, collectives are identities; no MPI initialised.
//! * [`mpi::MpiCommunicator`]: CPU buffers over MPI (rsmpi, OpenMPI).
//! * [`nccl::NcclCommunicator`]: CUDA tensors over NCCL, loaded at run time; bootstrapped over MPI
//!   (a lone process needs none).

pub mod heartbeat;
pub mod job;
pub mod mpi;
pub mod nccl;
pub mod single;
pub mod watchdog;

use std::sync::Arc;

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
    /// Element-wise sum over all ranks of a host buffer of f64 (counts, metrics), in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
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
    /// A handle that ends the whole job from any thread (the collective watchdog's).
    fn abort_handle(&self) -> AbortHandle;
    /// Describes what the next collectives are for ("gradient all-reduce, epoch 3 step 17"), for
    /// the message of a collective that times out. Only the watchdog wrapper records it.
    fn set_context(&self, _context: &str) {}
}

/// Ends the job from any thread: prints the message, then aborts every rank with the code.
#[derive(Clone)]
pub struct AbortHandle(Arc<AbortFn>);

/// What an [`AbortHandle`] calls: prints the message and ends the job with the exit code.
type AbortFn = dyn Fn(&str, i32) + Send + Sync;

impl AbortHandle {
    pub fn new(f: impl Fn(&str, i32) + Send + Sync + 'static) -> Self {
        AbortHandle(Arc::new(f))
    }
    pub fn abort(&self, message: &str, code: i32) -> ! {
        (self.0)(message, code);
        // The backend's abort should not return; make sure the process ends regardless.
        std::process::exit(code)
    }
}

/// Which backend to use (`--dist`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// MPI on CPU, NCCL when the device is CUDA.
    Auto,
    /// One process, no MPI.
    Single,
    /// MPI (CPU tensors).
    Mpi,
    /// NCCL (CUDA tensors), bootstrapped over MPI (a lone process needs no MPI).
    Nccl,
}

impl crate::choice::Choice for Backend {
    const WHAT: &'static str = "backend";
    const ALL: &'static [Backend] = &[Backend::Auto, Backend::Single, Backend::Mpi, Backend::Nccl];
    fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Single => "single",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }
}

crate::choice_traits!(Backend);

/// The backend `backend` stands for on `device`: `Auto` is NCCL for CUDA and MPI otherwise.
pub fn resolve_backend(backend: Backend, device: crate::runtime::device::DeviceChoice) -> Backend {
    match backend {
        Backend::Auto if matches!(device, crate::runtime::device::DeviceChoice::Cuda(_)) => {
            Backend::Nccl
        }
        Backend::Auto => Backend::Mpi,
        other => other,
    }
}

/// Connects this process to its job and picks its device: MPI first (rank, size, local rank),
/// then the device of the local rank (`--device cuda` = GPU `local_rank`), then NCCL on that
/// GPU when the backend is NCCL. Works the same under `mpirun`, `srun` and as a plain process
/// (an MPI singleton).
pub fn connect(
    backend: Backend,
    device: crate::runtime::device::DeviceChoice,
) -> anyhow::Result<(Box<dyn Communicator>, tch::Device)> {
    use anyhow::Context;
    device.ensure_available()?;
    match resolve_backend(backend, device) {
        Backend::Single => {
            if let Some((var, n)) = launched_ranks() {
                anyhow::bail!(
                    "--dist single, but this process is one of {n} ranks ({var}={n}): each would \
                     train alone and write the same run directory; use --dist auto (or mpi/nccl)"
                );
            }
            Ok((Box::new(single::SingleProcess), device.resolve(0)?))
        }
        Backend::Mpi => {
            let mpi = mpi::MpiCommunicator::init()?;
            let resolved = device
                .resolve(mpi.local_rank())
                .with_context(|| format!("rank {}", mpi.rank()))?;
            Ok((Box::new(mpi), resolved))
        }
        Backend::Nccl => {
            if let Some(reason) = nccl::unavailable_reason() {
                // A lone process needs no collectives: auto then runs without NCCL.
                if backend == Backend::Auto && launched_ranks().is_none() {
                    let mpi = mpi::MpiCommunicator::init()?;
                    if mpi.size() == 1 {
                        let resolved = device.resolve(0)?;
                        return Ok((Box::new(mpi), resolved));
                    }
                }
                return Err(DistError::NcclUnavailable(reason).into());
            }
            let resolved = match device {
                crate::runtime::device::DeviceChoice::Cpu => {
                    anyhow::bail!("--dist nccl needs --device cuda (NCCL reduces GPU tensors)")
                }
                crate::runtime::device::DeviceChoice::Cuda(_) => device,
            };
            // A lone process makes its one-rank NCCL communicator without MPI.
            let host: Box<dyn Communicator> = if launched_ranks().is_none() {
                Box::new(single::SingleProcess)
            } else {
                Box::new(mpi::MpiCommunicator::init()?)
            };
            let rank = host.rank();
            let tch_device = resolved
                .resolve(host.local_rank())
                .with_context(|| format!("rank {rank}"))?;
            let gpu = match tch_device {
                tch::Device::Cuda(i) => i,
                _ => unreachable!("a CUDA choice resolves to a CUDA device"),
            };
            let comm = nccl::NcclCommunicator::over(host, gpu)
                .with_context(|| format!("rank {rank}: NCCL on GPU {gpu}"))?;
            Ok((Box::new(comm), tch_device))
        }
        Backend::Auto => unreachable!("auto was resolved above"),
    }
}

/// The launcher's rank count when this process was started as one of several ranks: the
/// variable that says so and its value. Used to refuse `--dist single` under a launcher and to
/// let a lone NCCL process skip MPI; ranks themselves always come from MPI.
pub fn launched_ranks() -> Option<(&'static str, usize)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find_map(|var| {
            let n: usize = std::env::var(var).ok()?.trim().parse().ok()?;
            (n > 1).then_some((var, n))
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
