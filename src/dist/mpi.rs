//! The MPI backend (rsmpi over OpenMPI): CPU buffers and tensors.
//!
//! Rank and size come from MPI itself, under `mpirun`, `srun --mpi=pmix` or as a singleton; the
//! local rank comes from splitting the world communicator by shared-memory domain, so no
//! launcher-specific environment variable is read. MPI's default error handler
//! (`MPI_ERRORS_ARE_FATAL`) aborts the whole job on a communication error, which is what we want:
//! a failed collective never leaves the other ranks waiting.

use std::cell::RefCell;
use std::rc::Rc;

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use tch::Tensor;

use super::{AbortHandle, Backend, Communicator, DistError, Result, check_reducible};

/// MPI counts are C ints; larger buffers go in pieces of this many elements.
const MAX_ELEMENTS_PER_CALL: usize = 1 << 30;

/// A job's ranks connected through MPI (all of them, or one group of a [`split`]).
///
/// [`split`]: MpiCommunicator::split
pub struct MpiCommunicator {
    // Field order matters: communicators are freed on drop, before the universe finalises MPI
    // (when the last communicator sharing it goes).
    world: SimpleCommunicator,
    local: SimpleCommunicator,
    /// `MPI_IN_PLACE` of the MPI library in use, when known (see [`in_place_sentinel`]).
    in_place: Option<*mut std::ffi::c_void>,
    /// Receive buffer for all-reduces where `MPI_IN_PLACE` is unknown; grows to the largest
    /// buffer reduced and is then reused, so steady-state training allocates nothing here.
    scratch: RefCell<Vec<f32>>,
    _universe: Rc<Universe>,
}

impl MpiCommunicator {
    /// Initialises MPI (once per process) and splits off the node-local communicator.
    pub fn init() -> Result<Self> {
        let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| {
                DistError::MpiInit("MPI was already initialised in this process".into())
            })?;
        let world = universe.world();
        let local = world.split_shared(world.rank());
        Ok(Self {
            world,
            local,
            in_place: in_place_sentinel(&library_version()),
            scratch: RefCell::new(Vec::new()),
            _universe: Rc::new(universe),
        })
    }

    /// The ranks with the same `color` as this one, as a communicator of their own (ranked in
    /// the order of their ranks here). Every rank must call it, in the same order.
    pub fn split(&self, color: usize) -> Result<Self> {
        let failed = |detail: String| DistError::Failed {
            op: "MPI_Comm_split",
            detail,
        };
        let color = i32::try_from(color).map_err(|_| failed(format!("color {color} too large")))?;
        let group = self
            .world
            .split_by_color_with_key(Color::with_value(color), self.world.rank())
            .ok_or_else(|| failed("no communicator came back".into()))?;
        let local = group.split_shared(group.rank());
        Ok(Self {
            world: group,
            local,
            in_place: self.in_place,
            scratch: RefCell::new(Vec::new()),
            _universe: Rc::clone(&self._universe),
        })
    }
}

/// The value of `MPI_IN_PLACE` for the MPI library named by `version`: a C macro, so rsmpi 0.8
/// cannot export it, but a fixed part of each implementation's ABI: `(void *) 1` in Open MPI,
/// `(void *) -1` in MPICH and its derivatives (Intel MPI, MVAPICH, Cray MPICH). `None` for any
/// other library: all-reduces then go through a scratch buffer and one extra copy.
pub fn in_place_sentinel(version: &str) -> Option<*mut std::ffi::c_void> {
    if version.starts_with("Open MPI") {
        Some(std::ptr::without_provenance_mut(1))
    } else if ["MPICH", "Intel(R) MPI", "MVAPICH", "CRAY MPICH"]
        .iter()
        .any(|p| version.starts_with(p))
    {
        Some(std::ptr::without_provenance_mut(usize::MAX))
    } else {
        None
    }
}

/// The MPI library's own version string, e.g. "Open MPI v4.1.4, ...". Needs no initialisation.
pub fn library_version() -> String {
    match mpi::environment::library_version() {
        Ok(v) => v.trim_end_matches(['\0', '\n', ' ']).to_string(),
        Err(e) => format!("unreadable ({e})"),
    }
}

impl Communicator for MpiCommunicator {
    fn backend(&self) -> Backend {
        Backend::Mpi
    }
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn local_rank(&self) -> usize {
        self.local.rank() as usize
    }
    fn local_size(&self) -> usize {
        self.local.size() as usize
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        if let Some(in_place) = self.in_place {
            for chunk in buf.chunks_mut(MAX_ELEMENTS_PER_CALL) {
                // SAFETY: `chunk` is a valid f32 buffer of `chunk.len()` (< 2^31) elements, used
                // as both send and receive buffer through this library's MPI_IN_PLACE; the world
                // communicator and the predefined type and op handles are valid until finalise.
                let code = unsafe {
                    mpi::ffi::MPI_Allreduce(
                        in_place,
                        chunk.as_mut_ptr().cast(),
                        chunk.len() as i32,
                        mpi::ffi::RSMPI_FLOAT,
                        mpi::ffi::RSMPI_SUM,
                        self.world.as_raw(),
                    )
                };
                if code != 0 {
                    return Err(DistError::Failed {
                        op: "MPI_Allreduce",
                        detail: format!("error code {code}"),
                    });
                }
            }
            return Ok(());
        }
        let mut scratch = self.scratch.borrow_mut();
        for chunk in buf.chunks_mut(MAX_ELEMENTS_PER_CALL) {
            if scratch.len() < chunk.len() {
                scratch.resize(chunk.len(), 0.0);
            }
            let out = &mut scratch[..chunk.len()];
            self.world
                .all_reduce_into(&*chunk, out, SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        for chunk in buf.chunks_mut(MAX_ELEMENTS_PER_CALL) {
            let mut out = vec![0f64; chunk.len()];
            self.world
                .all_reduce_into(&*chunk, &mut out[..], SystemOperation::sum());
            chunk.copy_from_slice(&out);
        }
        Ok(())
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let n = check_reducible("MPI all-reduce", tensor, false)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: `check_reducible` established a contiguous CPU f32 tensor of `n` elements, and
        // we hold the only `&mut` to it for the duration of the call.
        let data = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut f32, n) };
        self.all_reduce_sum_f32(data)
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(DistError::BadArgument {
                op: "broadcast",
                expected: format!("a root rank below {}", self.size()),
                got: root.to_string(),
            });
        }
        let root_process = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root_process.broadcast_into(&mut len);
        let len = usize::try_from(len).map_err(|_| DistError::Failed {
            op: "broadcast",
            detail: format!("rank {root} sent {len} bytes, more than this machine can address"),
        })?;
        bytes.resize(len, 0);
        for chunk in bytes.chunks_mut(MAX_ELEMENTS_PER_CALL) {
            root_process.broadcast_into(chunk);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, message: &str, code: i32) -> ! {
        say_before_abort(self.rank(), message);
        self.world.abort(code)
    }

    fn abort_handle(&self) -> AbortHandle {
        let rank = self.rank();
        AbortHandle::new(move |message, code| {
            say_before_abort(rank, message);
            // SAFETY: MPI_Abort on the world communicator, which lives until MPI_Finalize. Called
            // from the watchdog thread under MPI_THREAD_FUNNELED, which the MPI standard leaves
            // undefined but Open MPI and MPICH implement as a plain job abort (it is what every
            // MPI job does on a fatal signal handler path as well).
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
            }
        })
    }
}

/// Prints `rank R: message` as one write, then gives the launcher's output forwarding a moment
/// before MPI_Abort kills it: printed piecewise, or aborted at once, the message can be cut
/// short (seen: only "rank " arriving from a rank that failed while joining).
fn say_before_abort(rank: usize, message: &str) {
    use std::io::Write;
    let line = format!("rank {rank}: {message}\n");
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
    std::thread::sleep(std::time::Duration::from_millis(300));
}

#[cfg(test)]
mod tests {
    use super::in_place_sentinel;

    #[test]
    fn in_place_sentinel_follows_the_library() {
        assert_eq!(
            in_place_sentinel("Open MPI v4.1.4, package: Debian OpenMPI").map(|p| p as usize),
            Some(1)
        );
        assert_eq!(
            in_place_sentinel("MPICH Version:\t4.0").map(|p| p as usize),
            Some(usize::MAX)
        );
        assert!(in_place_sentinel("Some Other MPI 1.0").is_none());
    }
}
