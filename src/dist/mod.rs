//! Collective communication between the ranks of a job.
//!
//! Every backend implements [`Communicator`]. Control flow must be rank-symmetric: every rank calls
//! every collective in the same order, otherwise the job hangs (or, with a collective timeout,
//! aborts). Backends:
//! * [`single::SingleProcess`]: one rank, collectives are identities; no MPI initialised.
//! * [`mpi::MpiCommunicator`]: CPU buffers over MPI (rsmpi, OpenMPI).
//! * [`nccl::NcclCommunicator`]: CUDA tensors over NCCL, loaded at run time; bootstrapped over MPI
//!   (a lone process needs none).

pub mod deadline;
pub mod heartbeat;
pub mod job;
pub mod mpi;
pub mod nccl;
pub mod nccl_library;
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
    /// [`Communicator::all_reduce_sum`], but it may return before the sum is there: the
    /// reduction is queued on the device after the work that wrote the tensor and before any
    /// queued later (NCCL on the CUDA stream), so kernels that read it see the sum, and the host
    /// waits only in [`Communicator::wait_queued`]. Backends that finish in the call do so.
    fn all_reduce_sum_queued(&self, tensor: &mut Tensor) -> Result<()> {
        self.all_reduce_sum(tensor)
    }
    /// Waits until every reduction queued by [`Communicator::all_reduce_sum_queued`] is done.
    fn wait_queued(&self) -> Result<()> {
        Ok(())
    }
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

/// How the ranks of a job split into groups that each train their own runs (`sweep`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouping {
    /// Ranks per group (`--ranks-per-run`); 0: one group of every rank.
    pub ranks_per_run: usize,
    /// Processes sharing each GPU (`--runs-per-gpu`), from different groups.
    pub runs_per_gpu: usize,
}

impl Grouping {
    /// One group of every rank, one rank per GPU: what `train` uses.
    pub const WHOLE: Grouping = Grouping {
        ranks_per_run: 0,
        runs_per_gpu: 1,
    };

    /// Ranks per group in a job of `size` ranks, checked to divide it.
    pub fn group_size(self, size: usize) -> anyhow::Result<usize> {
        let g = if self.ranks_per_run == 0 {
            size
        } else {
            self.ranks_per_run
        };
        if g > size || !size.is_multiple_of(g) {
            anyhow::bail!(
                "--ranks-per-run {g}: the job's {size} rank(s) do not split into groups of {g} \
                 (launch a multiple of {g} ranks)"
            );
        }
        Ok(g)
    }

    /// The GPU slot (index among the node's visible GPUs) of the rank with `local_rank` of
    /// `local_size` on its node, for groups of `group_size`. One process per GPU: the local
    /// rank. With R runs per GPU the node's ranks cycle over its `local_size / R` GPUs, so the
    /// consecutive ranks of one group land on different GPUs (NCCL refuses two ranks of one
    /// communicator on the same GPU).
    pub fn gpu_slot(
        self,
        local_rank: usize,
        local_size: usize,
        group_size: usize,
    ) -> anyhow::Result<usize> {
        let r = self.runs_per_gpu.max(1);
        if r == 1 {
            return Ok(local_rank);
        }
        if !local_size.is_multiple_of(r) {
            anyhow::bail!(
                "--runs-per-gpu {r}: the {local_size} rank(s) on this node do not share GPUs \
                 {r} to a GPU (start a multiple of {r} ranks per node)"
            );
        }
        let gpus = local_size / r;
        if group_size > gpus {
            anyhow::bail!(
                "--runs-per-gpu {r} with --ranks-per-run {group_size}: the node's {local_size} \
                 ranks use {gpus} GPU(s), fewer than a run's ranks, so two ranks of one run \
                 would share a GPU"
            );
        }
        Ok(local_rank % gpus)
    }
}

/// This process's connection to its job, and to its group of a grouped job.
pub struct Connection {
    /// The group's communicator (every rank when not grouped): what training reduces over.
    pub comm: Box<dyn Communicator>,
    pub device: tch::Device,
    /// Every rank of the job, when the job is split into several groups.
    pub world: Option<Box<dyn Communicator>>,
    /// This process's group and the number of groups.
    pub group: usize,
    pub groups: usize,
}

/// Connects this process to its job and picks its device: MPI first (rank, size, local rank),
/// then the device of the local rank (`--device cuda` = GPU `local_rank`), then NCCL on that
/// GPU when the backend is NCCL. Works the same under `mpirun`, `srun` and as a plain process
/// (an MPI singleton).
///
/// Creating an NCCL communicator that has not finished within `join_timeout` (a rank failed to
/// join) ends the job; zero waits forever.
pub fn connect(
    backend: Backend,
    device: crate::runtime::device::DeviceChoice,
    join_timeout: std::time::Duration,
) -> anyhow::Result<(Box<dyn Communicator>, tch::Device)> {
    let c = connect_grouped(backend, device, Grouping::WHOLE, join_timeout)?;
    Ok((c.comm, c.device))
}

/// [`connect`], with the job's ranks split into groups by `grouping`: consecutive ranks form a
/// group, and each group gets its own communicator (MPI, and NCCL on GPUs).
pub fn connect_grouped(
    backend: Backend,
    device: crate::runtime::device::DeviceChoice,
    grouping: Grouping,
    join_timeout: std::time::Duration,
) -> anyhow::Result<Connection> {
    device.ensure_available()?;
    match resolve_backend(backend, device) {
        Backend::Single => {
            if let Some((var, n)) = launched_ranks() {
                anyhow::bail!(
                    "--dist single, but this process is one of {n} ranks ({var}={n}): each would \
                     train alone and write the same run directory; use --dist auto (or mpi/nccl)"
                );
            }
            grouping.group_size(1)?;
            Ok(Connection {
                comm: Box::new(single::SingleProcess),
                device: device.resolve(0)?,
                world: None,
                group: 0,
                groups: 1,
            })
        }
        Backend::Mpi => {
            let world = mpi::MpiCommunicator::init()?;
            fail_job(&world, joining_fault(&world))?;
            let (group, groups, slot) = fail_job(&world, place(&world, grouping))?;
            let resolved = fail_job(&world, device.resolve(slot))?;
            split_off(world, group, groups, resolved, |comm| Ok(Box::new(comm)))
        }
        Backend::Nccl => {
            if let Some(reason) = nccl::unavailable_reason() {
                // A lone process needs no collectives: auto then runs without NCCL.
                if backend == Backend::Auto && launched_ranks().is_none() {
                    let mpi = mpi::MpiCommunicator::init()?;
                    if mpi.size() == 1 {
                        let resolved = device.resolve(0)?;
                        return Ok(Connection {
                            comm: Box::new(mpi),
                            device: resolved,
                            world: None,
                            group: 0,
                            groups: 1,
                        });
                    }
                }
                return Err(DistError::NcclUnavailable(reason).into());
            }
            if device == crate::runtime::device::DeviceChoice::Cpu {
                anyhow::bail!("--dist nccl needs --device cuda (NCCL reduces GPU tensors)");
            }
            let over_nccl = |host: Box<dyn Communicator>, tch_device: tch::Device| {
                nccl_over(host, tch_device, join_timeout)
            };
            // A lone process makes its one-rank NCCL communicator without MPI.
            if launched_ranks().is_none() {
                grouping.group_size(1)?;
                let tch_device = device.resolve(0)?;
                return Ok(Connection {
                    comm: over_nccl(Box::new(single::SingleProcess), tch_device)?,
                    device: tch_device,
                    world: None,
                    group: 0,
                    groups: 1,
                });
            }
            let world = mpi::MpiCommunicator::init()?;
            fail_job(&world, joining_fault(&world))?;
            let (group, groups, slot) = fail_job(&world, place(&world, grouping))?;
            let tch_device = fail_job(&world, device.resolve(slot))?;
            split_off(world, group, groups, tch_device, |comm| {
                over_nccl(Box::new(comm), tch_device)
            })
        }
        Backend::Auto => unreachable!("auto was resolved above"),
    }
}

/// The NCCL communicator of the ranks `host` connects, on `device`'s GPU. Its creation waits
/// for every rank before the collective watchdog exists, so with several ranks it is bounded by
/// `join_timeout`: past it the job ends (exit 3) naming this rank and its GPU.
fn nccl_over(
    host: Box<dyn Communicator>,
    device: tch::Device,
    join_timeout: std::time::Duration,
) -> anyhow::Result<Box<dyn Communicator>> {
    let gpu = match device {
        tch::Device::Cuda(i) => i,
        _ => anyhow::bail!("--dist nccl needs a CUDA device, not {device:?}"),
    };
    let (rank, size) = (host.rank(), host.size());
    let limit = if size > 1 {
        join_timeout
    } else {
        std::time::Duration::ZERO
    };
    let abort = host.abort_handle();
    let on_timeout = move || {
        abort.abort(
            &format!(
                "cosine-train: creating the NCCL communicator of {size} ranks on GPU {gpu} did \
                 not finish within {} s (--collective-timeout): a rank did not join; \
                 ending the job",
                limit.as_secs()
            ),
            watchdog::EXIT_COLLECTIVE_TIMEOUT,
        )
    };
    deadline::within(limit, on_timeout, || {
        nccl::NcclCommunicator::over(host, gpu)
    })
    .map(|c| Box::new(c) as Box<dyn Communicator>)
    .map_err(|e| anyhow::anyhow!("rank {rank}: NCCL on GPU {gpu}: {e}"))
}

/// The failure-path tests' fault for a rank joining the job (`COSINE_FAULT` with `step=0`).
fn joining_fault(world: &mpi::MpiCommunicator) -> anyhow::Result<()> {
    crate::runtime::fault::Fault::from_env()?.before_step(world.rank(), 0, None)
}

/// This rank's group, the number of groups and its GPU slot. The checks give the same answer
/// on every rank, so an error ends each rank alike.
fn place(
    world: &mpi::MpiCommunicator,
    grouping: Grouping,
) -> anyhow::Result<(usize, usize, usize)> {
    let g = grouping.group_size(world.size())?;
    let slot = grouping.gpu_slot(world.local_rank(), world.local_size(), g)?;
    Ok((world.rank() / g, world.size() / g, slot))
}

/// The group's communicator made by `make` from the group's MPI ranks (the world itself when
/// there is one group); a failure on one rank ends the whole job, as the others would wait.
fn split_off(
    world: mpi::MpiCommunicator,
    group: usize,
    groups: usize,
    device: tch::Device,
    make: impl FnOnce(mpi::MpiCommunicator) -> anyhow::Result<Box<dyn Communicator>>,
) -> anyhow::Result<Connection> {
    if groups == 1 {
        let abort = world.abort_handle();
        let size = world.size();
        let comm = make(world).map_err(|e| abort_if_many(&abort, size, e))?;
        return Ok(Connection {
            comm,
            device,
            world: None,
            group,
            groups,
        });
    }
    let part = fail_job(&world, world.split(group).map_err(anyhow::Error::from))?;
    let comm = fail_job(&world, make(part))?;
    Ok(Connection {
        comm,
        device,
        world: Some(Box::new(world)),
        group,
        groups,
    })
}

/// Passes `result` through; with several ranks an error ends the job at once (the other ranks
/// would otherwise wait in their next collective).
fn fail_job<T>(world: &dyn Communicator, result: anyhow::Result<T>) -> anyhow::Result<T> {
    result.map_err(|e| abort_if_many(&world.abort_handle(), world.size(), e))
}

/// [`fail_job`] where the communicator has been handed on: its abort handle and size.
fn abort_if_many(abort: &AbortHandle, size: usize, e: anyhow::Error) -> anyhow::Error {
    if size > 1 {
        abort.abort(&format!("cosine-train: {e:#}"), 1)
    }
    e
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

#[cfg(test)]
mod tests {
    use super::Grouping;

    fn grouping(ranks_per_run: usize, runs_per_gpu: usize) -> Grouping {
        Grouping {
            ranks_per_run,
            runs_per_gpu,
        }
    }

    #[test]
    fn groups_divide_the_job_and_share_gpus_without_two_ranks_of_a_run_on_one() {
        assert_eq!(Grouping::WHOLE.group_size(4).unwrap(), 4);
        assert_eq!(grouping(2, 1).group_size(4).unwrap(), 2);
        assert!(grouping(3, 1).group_size(4).is_err());
        assert!(grouping(8, 1).group_size(4).is_err());
        // One process per GPU: the local rank.
        assert_eq!(grouping(1, 1).gpu_slot(3, 4, 1).unwrap(), 3);
        // 4 ranks, 2 per GPU, runs of 1: ranks cycle over the 2 GPUs.
        let slots: Vec<usize> = (0..4)
            .map(|l| grouping(1, 2).gpu_slot(l, 4, 1).unwrap())
            .collect();
        assert_eq!(slots, [0, 1, 0, 1]);
        // Runs of 2 ranks (consecutive ranks) land on different GPUs.
        let slots: Vec<usize> = (0..8)
            .map(|l| grouping(2, 2).gpu_slot(l, 8, 2).unwrap())
            .collect();
        assert_eq!(slots, [0, 1, 2, 3, 0, 1, 2, 3]);
        assert!(
            grouping(1, 2).gpu_slot(0, 3, 1).is_err(),
            "3 ranks do not pair up"
        );
        let err = grouping(4, 2).gpu_slot(0, 4, 4).unwrap_err().to_string();
        assert!(err.contains("would share a GPU"), "{err}");
    }
}
