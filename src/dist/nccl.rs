//! The NCCL backend: CUDA tensors reduced by NCCL, loaded at run time ([`super::nccl_library`]).
//!
//! The binary therefore builds and runs on machines without CUDA; there, [`NcclCommunicator::over`]
//! returns [`DistError::NcclUnavailable`] saying what is missing instead of crashing. The NCCL
//! unique id travels from rank 0 over MPI, which also carries the byte broadcasts and barriers.
//! A lone process (no launcher, or a launcher's single rank) needs no MPI at all: it makes a
//! one-rank NCCL communicator itself, so a GPU machine without MPI can still run NCCL.
//! Collectives are enqueued on the legacy default stream, the stream libtorch uses unless told
//! otherwise, so they are ordered with the kernels that produced and will consume the tensors.

use cudarc::nccl::sys as ncclsys;
use tch::Tensor;

use super::nccl_library::{self, NcclCallError, NcclLibrary};
use super::{AbortHandle, Backend, Communicator, DistError, Result, check_reducible};

/// A job's ranks connected through NCCL, one GPU per rank.
pub struct NcclCommunicator {
    nccl: &'static NcclLibrary,
    comm: ncclsys::ncclComm_t,
    gpu: usize,
    /// Ranks, host-memory collectives and aborts: MPI, or the lone process itself.
    host: Box<dyn Communicator>,
}

/// Why NCCL cannot be used in this process, or `None` when CUDA and libnccl are both there.
pub fn unavailable_reason() -> Option<String> {
    let mut reasons = Vec::new();
    if !tch::Cuda::is_available() {
        reasons.push(format!(
            "CUDA: {}",
            crate::runtime::device::cuda_unavailable_reason()
        ));
    }
    if let Err(why) = nccl_library::library() {
        reasons.push(why);
    }
    if reasons.is_empty() {
        None
    } else {
        Some(reasons.join("; "))
    }
}

/// Where libnccl was opened from, if it opens.
pub fn library_origin() -> Option<String> {
    nccl_library::library().ok().map(|lib| lib.origin.clone())
}

/// NCCL's version as "major.minor.patch", if the library opens.
pub fn library_version() -> Option<String> {
    nccl_library::library().ok()?.version().ok()
}

fn nccl_error(op: &'static str, err: NcclCallError) -> DistError {
    DistError::Failed {
        op,
        detail: err.to_string(),
    }
}

impl NcclCommunicator {
    /// Checks CUDA and libnccl, binds this rank to GPU `gpu` and creates the NCCL communicator
    /// of the job `host` connects (MPI, or a lone process).
    pub fn over(host: Box<dyn Communicator>, gpu: usize) -> Result<Self> {
        if let Some(reason) = unavailable_reason() {
            return Err(DistError::NcclUnavailable(reason));
        }
        let nccl = nccl_library::library().map_err(DistError::NcclUnavailable)?;
        let visible = tch::Cuda::device_count() as usize;
        if gpu >= visible {
            return Err(DistError::NcclUnavailable(format!(
                "rank {} wants GPU {gpu} but only {visible} are visible on this node \
                 (launch at most one rank per GPU, or check CUDA_VISIBLE_DEVICES)",
                host.rank()
            )));
        }
        cudarc::runtime::result::device::set(gpu as i32).map_err(|e| DistError::Failed {
            op: "cudaSetDevice",
            detail: format!("GPU {gpu}: {e:?}"),
        })?;

        let mut id = vec![0u8; 128];
        if host.rank() == 0 {
            let uid = nccl
                .unique_id()
                .map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            id = uid.internal.iter().map(|&c| c as u8).collect();
        }
        host.broadcast_bytes(&mut id, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (dst, src) in internal.iter_mut().zip(&id) {
            *dst = *src as std::ffi::c_char;
        }
        let uid = ncclsys::ncclUniqueId { internal };
        // SAFETY: size and rank come from the host communicator and agree on all ranks, which
        // all received rank 0's id.
        let comm = unsafe { nccl.comm_init_rank(host.size() as i32, uid, host.rank() as i32) }
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(Self {
            nccl,
            comm,
            gpu,
            host,
        })
    }

    /// The GPU this rank's communicator is bound to.
    pub fn gpu(&self) -> usize {
        self.gpu
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        // SAFETY: `comm` was created by ncclCommInitRank and is destroyed exactly once.
        let _ = unsafe { self.nccl.comm_destroy(self.comm) };
    }
}

impl Communicator for NcclCommunicator {
    fn backend(&self) -> Backend {
        Backend::Nccl
    }
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn local_rank(&self) -> usize {
        self.host.local_rank()
    }
    fn local_size(&self) -> usize {
        self.host.local_size()
    }

    // Host buffers (metrics, counts) go over MPI (or nowhere, alone); NCCL is for device memory.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.all_reduce_sum_queued(tensor)?;
        // Wait for the result, as the MPI backend does: a collective that never completes then
        // blocks here, where the watchdog sees it, instead of in some later unrelated copy.
        self.wait_queued()
    }

    fn all_reduce_sum_queued(&self, tensor: &mut Tensor) -> Result<()> {
        let n = check_reducible("NCCL all-reduce", tensor, true)?;
        if n == 0 {
            return Ok(());
        }
        let ptr = tensor.data_ptr();
        // SAFETY: a contiguous CUDA f32 buffer of `n` elements, reduced in place on the default
        // stream, which orders it after the kernels that wrote it and before those queued later.
        unsafe {
            self.nccl.all_reduce(
                ptr,
                ptr,
                n,
                ncclsys::ncclDataType_t::ncclFloat32,
                ncclsys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error("ncclAllReduce", e))
    }

    fn wait_queued(&self) -> Result<()> {
        // SAFETY: synchronising the legacy default stream of the current device.
        unsafe { cudarc::runtime::result::stream::synchronize(std::ptr::null_mut()) }.map_err(|e| {
            DistError::Failed {
                op: "ncclAllReduce",
                detail: format!("waiting for the result: {e:?}"),
            }
        })
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn abort(&self, message: &str, code: i32) -> ! {
        // SAFETY: aborting a live communicator; the process ends right after.
        let _ = unsafe { self.nccl.comm_abort(self.comm) };
        self.host.abort(message, code)
    }

    fn abort_handle(&self) -> AbortHandle {
        let comm = self.comm as usize;
        let nccl = self.nccl;
        let host = self.host.abort_handle();
        AbortHandle::new(move |message, code| {
            // SAFETY: ncclCommAbort may be called from another thread while a collective is
            // pending on the communicator; that is its purpose. The process ends right after.
            let _ = unsafe { nccl.comm_abort(comm as ncclsys::ncclComm_t) };
            host.abort(message, code)
        })
    }
}
