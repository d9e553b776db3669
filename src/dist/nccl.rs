//! The NCCL backend: CUDA tensors reduced by NCCL, which cudarc loads at run time.
//!
//! The binary therefore builds and runs on machines without CUDA; there, [`NcclCommunicator::over`]
//! returns [`DistError::NcclUnavailable`] saying what is missing instead of crashing. The NCCL
//! unique id travels from rank 0 over MPI, which also carries the byte broadcasts and barriers.
//! A lone process (no launcher, or a launcher's single rank) needs no MPI at all: it makes a
//! one-rank NCCL communicator itself, so a GPU machine without MPI can still run NCCL.
//! Collectives are enqueued on the legacy default stream, the stream libtorch uses unless told
//! otherwise, so they are ordered with the kernels that produced and will consume the tensors.

use cudarc::nccl::{result as nccl, sys as ncclsys};
use tch::Tensor;

use super::{AbortHandle, Backend, Communicator, DistError, Result, check_reducible};

/// A job's ranks connected through NCCL, one GPU per rank.
pub struct NcclCommunicator {
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
    if !nccl_library_present() {
        reasons.push(
            "libnccl: not found on the library path under the name libnccl.so \
             (`COSINE_WITH_CUDA=1 make setup` installs it; `source launch/env.sh` puts it on LD_LIBRARY_PATH)"
                .to_string(),
        );
    }
    if reasons.is_empty() {
        None
    } else {
        Some(reasons.join("; "))
    }
}

/// Whether cudarc can load libnccl (checked first: cudarc panics on a missing library).
pub fn nccl_library_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { ncclsys::is_culib_present() }
}

/// NCCL's version as "major.minor.patch", if the library loads.
pub fn library_version() -> Option<String> {
    if !nccl_library_present() {
        return None;
    }
    let code = nccl::get_nccl_version().ok()?;
    // Since NCCL 2.9 the code is major*10000 + minor*100 + patch.
    Some(format!(
        "{}.{}.{}",
        code / 10000,
        (code / 100) % 100,
        code % 100
    ))
}

fn nccl_error(op: &'static str, err: nccl::NcclError) -> DistError {
    // NcclError's Debug prints only its name; the result code is the useful part.
    DistError::Failed {
        op,
        detail: format!("NCCL returned {:?}", err.0),
    }
}

impl NcclCommunicator {
    /// Checks CUDA and libnccl, binds this rank to GPU `gpu` and creates the NCCL communicator
    /// of the job `host` connects (MPI, or a lone process).
    pub fn over(host: Box<dyn Communicator>, gpu: usize) -> Result<Self> {
        if let Some(reason) = unavailable_reason() {
            return Err(DistError::NcclUnavailable(reason));
        }
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
            let uid = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            id = uid.internal.iter().map(|&c| c as u8).collect();
        }
        host.broadcast_bytes(&mut id, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (dst, src) in internal.iter_mut().zip(&id) {
            *dst = *src as std::ffi::c_char;
        }
        let uid = ncclsys::ncclUniqueId { internal };
        let mut comm: ncclsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; size and rank come from the host communicator
        // and agree on all ranks.
        unsafe { nccl::comm_init_rank(&mut comm, host.size() as i32, uid, host.rank() as i32) }
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(Self { comm, gpu, host })
    }

    /// The GPU this rank's communicator is bound to.
    pub fn gpu(&self) -> usize {
        self.gpu
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        // SAFETY: `comm` was created by ncclCommInitRank and is destroyed exactly once.
        let _ = unsafe { nccl::comm_destroy(self.comm) };
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
        let n = check_reducible("NCCL all-reduce", tensor, true)?;
        if n == 0 {
            return Ok(());
        }
        let ptr = tensor.data_ptr();
        // SAFETY: a contiguous CUDA f32 buffer of `n` elements, reduced in place on the default
        // stream, which orders it after the kernels that wrote it.
        unsafe {
            nccl::all_reduce(
                ptr,
                ptr,
                n,
                ncclsys::ncclDataType_t::ncclFloat32,
                ncclsys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error("ncclAllReduce", e))?;
        // Wait for the result, as the MPI backend does: a collective that never completes then
        // blocks here, where the watchdog sees it, instead of in some later unrelated copy.
        // SAFETY: synchronising the legacy default stream of the current device.
        unsafe { cudarc::runtime::result::stream::synchronize(std::ptr::null_mut()) }.map_err(
            |e| DistError::Failed {
                op: "ncclAllReduce",
                detail: format!("waiting for the result: {e:?}"),
            },
        )?;
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn abort(&self, message: &str, code: i32) -> ! {
        // SAFETY: aborting a live communicator; the process ends right after.
        let _ = unsafe { nccl::comm_abort(self.comm) };
        self.host.abort(message, code)
    }

    fn abort_handle(&self) -> AbortHandle {
        let comm = self.comm as usize;
        let host = self.host.abort_handle();
        AbortHandle::new(move |message, code| {
            // SAFETY: ncclCommAbort may be called from another thread while a collective is
            // pending on the communicator; that is its purpose. The process ends right after.
            let _ = unsafe { nccl::comm_abort(comm as ncclsys::ncclComm_t) };
            host.abort(message, code)
        })
    }
}
