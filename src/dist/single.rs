//! The one-process backend: every collective is the identity.

use tch::Tensor;

use super::{AbortHandle, Backend, Communicator, Result, check_reducible};

/// A job of exactly one rank, without MPI.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn backend(&self) -> Backend {
        Backend::Single
    }
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        check_reducible("all-reduce", tensor, tensor.device().is_cuda()).map(|_| ())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("rank 0: {message}");
        std::process::exit(code)
    }
    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(|message, code| {
            eprintln!("rank 0: {message}");
            std::process::exit(code)
        })
    }
}
