//! A collective timeout: [`Watched`] wraps any communicator and a thread aborts the whole job when
//! one collective has not returned within the limit (`--collective-timeout`).
//!
//! Collectives in this program are rank-symmetric by construction, so a collective that does not
//! finish means another rank died, hangs or lost its link. Waiting longer cannot help; the job is
//! ended with a message naming the collective and what it was for, the ranks that did not reach
//! it and what each was last doing (from the [`super::heartbeat`] side channel), and mpirun/srun
//! exit non-zero. Rank 0's message comes first: the other ranks wait a moment before they end
//! the job.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;

use super::heartbeat::{Heartbeats, Report};
use super::{AbortHandle, Backend, Communicator, Result};

/// The exit status of a job ended by a collective timeout.
pub const EXIT_COLLECTIVE_TIMEOUT: i32 = 3;

struct State {
    /// Milliseconds since `origin` at which the pending collective started, 0 when none is.
    started_ms: AtomicU64,
    /// Milliseconds since `origin` at which the oldest collective still queued on the device
    /// (NCCL) was queued, 0 when none is: the host waits for it only later, and a GPU stuck in
    /// it can block the host anywhere (a full launch queue), so the limit bounds the queue's age.
    queued_ms: AtomicU64,
    /// Collectives entered so far, and when the last one returned (ms since `origin`).
    seq: AtomicU64,
    returned_ms: AtomicU64,
    operation: Mutex<&'static str>,
    context: Mutex<String>,
    stop: AtomicBool,
    origin: Instant,
}

/// A communicator whose collectives are timed by a watchdog thread.
pub struct Watched {
    inner: Box<dyn Communicator>,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl Watched {
    /// Wraps `inner`; a collective pending for longer than `timeout` aborts the job. A zero
    /// timeout disables the watchdog.
    pub fn new(inner: Box<dyn Communicator>, timeout: Duration) -> Self {
        let state = Arc::new(State {
            started_ms: AtomicU64::new(0),
            queued_ms: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            returned_ms: AtomicU64::new(0),
            operation: Mutex::new(""),
            context: Mutex::new(String::new()),
            stop: AtomicBool::new(false),
            origin: Instant::now(),
        });
        let thread = (!timeout.is_zero() && inner.size() > 1).then(|| {
            let own = {
                let state = Arc::clone(&state);
                Arc::new(move || state.report()) as Arc<dyn Fn() -> Report + Send + Sync>
            };
            let heartbeats = Heartbeats::start(inner.as_ref(), own);
            let state = Arc::clone(&state);
            let abort = inner.abort_handle();
            let rank = inner.rank();
            std::thread::Builder::new()
                .name("collective-watchdog".into())
                .spawn(move || watch(&state, timeout, &abort, &heartbeats, rank))
                .expect("spawning the watchdog thread")
        });
        Watched {
            inner,
            state,
            thread,
        }
    }

    fn guarded<T>(&self, operation: &'static str, f: impl FnOnce() -> T) -> T {
        if let Ok(mut op) = self.state.operation.lock() {
            *op = operation;
        }
        let now = self.state.origin.elapsed().as_millis() as u64;
        self.state.seq.fetch_add(1, Ordering::SeqCst);
        self.state.started_ms.store(now.max(1), Ordering::SeqCst);
        let out = f();
        self.state.started_ms.store(0, Ordering::SeqCst);
        let now = self.state.origin.elapsed().as_millis() as u64;
        self.state.returned_ms.store(now, Ordering::SeqCst);
        out
    }
}

/// Which limit a rank has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Overdue {
    /// A collective the host is inside.
    Pending,
    /// A collective queued on the device and not yet waited for.
    Queued,
}

impl State {
    /// Whether a collective has been pending, or queued, for more than `limit_ms` at `now`.
    fn overdue(&self, now: u64, limit_ms: u64) -> Option<Overdue> {
        let late = |since: u64| since != 0 && now.saturating_sub(since) > limit_ms;
        if late(self.started_ms.load(Ordering::SeqCst)) {
            Some(Overdue::Pending)
        } else if late(self.queued_ms.load(Ordering::SeqCst)) {
            Some(Overdue::Queued)
        } else {
            None
        }
    }

    /// Notes that a collective was queued on the device (the oldest one counts).
    fn queued(&self) {
        let now = (self.origin.elapsed().as_millis() as u64).max(1);
        let _ = (self.queued_ms).compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// This rank's heartbeat report.
    fn report(&self) -> Report {
        let now = self.origin.elapsed().as_millis() as u64;
        let started = self.started_ms.load(Ordering::SeqCst);
        let inside = started != 0;
        let since = if inside {
            started
        } else {
            self.returned_ms.load(Ordering::SeqCst)
        };
        Report {
            seq: self.seq.load(Ordering::SeqCst),
            inside,
            idle_ms: now.saturating_sub(since),
            operation: self
                .operation
                .lock()
                .map(|o| o.to_string())
                .unwrap_or_default(),
            context: self.context.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }
}

fn watch(
    state: &State,
    timeout: Duration,
    abort: &AbortHandle,
    heartbeats: &Heartbeats,
    rank: usize,
) {
    let limit_ms = timeout.as_millis() as u64;
    let tick = Duration::from_millis((limit_ms / 10).clamp(10, 1000));
    while !state.stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        let now = state.origin.elapsed().as_millis() as u64;
        if let Some(overdue) = state.overdue(now, limit_ms) {
            let op = match overdue {
                Overdue::Pending => state.operation.lock().map(|o| *o).unwrap_or("collective"),
                Overdue::Queued => "a queued all-reduce (the steps since the last read)",
            };
            let context = state.context.lock().map(|c| c.clone()).unwrap_or_default();
            let seq = state.seq.load(Ordering::SeqCst);
            let message = format!(
                "collective timeout: {op}{} did not complete within {} s (--collective-timeout; \
                 collective #{seq} of this job): {}; ending the job",
                if context.is_empty() {
                    String::new()
                } else {
                    format!(" ({context})")
                },
                timeout.as_secs_f64(),
                heartbeats.late_ranks(seq)
            );
            if rank != 0 {
                // Rank 0's message first: it sees every rank's heartbeat directly.
                std::thread::sleep(Duration::from_secs(1));
            }
            abort.abort(&message, EXIT_COLLECTIVE_TIMEOUT);
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Communicator for Watched {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn local_rank(&self) -> usize {
        self.inner.local_rank()
    }
    fn local_size(&self) -> usize {
        self.inner.local_size()
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.guarded("all-reduce", || self.inner.all_reduce_sum_f32(buf))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.guarded("all-reduce", || self.inner.all_reduce_sum_f64(buf))
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.guarded("all-reduce", || self.inner.all_reduce_sum(tensor))?;
        if self.inner.backend() == Backend::Nccl {
            // NCCL's blocking sum waits for the whole stream, the queued sums included.
            self.state.queued_ms.store(0, Ordering::SeqCst);
        }
        Ok(())
    }
    fn all_reduce_sum_queued(&self, tensor: &mut Tensor) -> Result<()> {
        self.guarded("all-reduce", || self.inner.all_reduce_sum_queued(tensor))?;
        // Only NCCL leaves the sum queued; the others have finished it.
        if self.inner.backend() == Backend::Nccl {
            self.state.queued();
        }
        Ok(())
    }
    fn wait_queued(&self) -> Result<()> {
        // A queued collective that never completes keeps the device busy: this wait is where
        // the host sees it (or the queue's age, if the host blocks before it).
        // Only NCCL has anything to wait for; elsewhere the wait is not counted as a collective.
        if self.inner.backend() == Backend::Nccl {
            self.guarded("queued all-reduces", || self.inner.wait_queued())?;
        } else {
            self.inner.wait_queued()?;
        }
        self.state.queued_ms.store(0, Ordering::SeqCst);
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.guarded("broadcast", || self.inner.broadcast_bytes(bytes, root))
    }
    fn barrier(&self) -> Result<()> {
        self.guarded("barrier", || self.inner.barrier())
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        self.inner.abort(message, code)
    }
    fn abort_handle(&self) -> AbortHandle {
        self.inner.abort_handle()
    }
    fn set_context(&self, context: &str) {
        if let Ok(mut c) = self.state.context.lock() {
            c.clear();
            c.push_str(context);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collective_is_overdue_once_pending_or_queued_past_the_limit() {
        let comm = Watched::new(
            Box::new(crate::dist::single::SingleProcess),
            Duration::from_secs(1),
        );
        let state = &comm.state;
        assert_eq!(state.overdue(10_000, 1000), None);
        state.started_ms.store(500, Ordering::SeqCst);
        assert_eq!(state.overdue(1400, 1000), None);
        assert_eq!(state.overdue(1600, 1000), Some(Overdue::Pending));
        state.started_ms.store(0, Ordering::SeqCst);
        // The oldest queued collective counts; a wait clears it.
        state.queued();
        let first = state.queued_ms.load(Ordering::SeqCst);
        assert!(first > 0);
        std::thread::sleep(Duration::from_millis(5));
        state.queued();
        assert_eq!(state.queued_ms.load(Ordering::SeqCst), first);
        assert_eq!(state.overdue(first + 1001, 1000), Some(Overdue::Queued));
        comm.wait_queued().unwrap();
        assert_eq!(state.overdue(first + 1001, 1000), None);
        // One process finishes its sums in the call: nothing stays queued.
        let mut t = Tensor::from_slice(&[1.0f32]);
        comm.all_reduce_sum_queued(&mut t).unwrap();
        assert_eq!(state.queued_ms.load(Ordering::SeqCst), 0);
    }
}
