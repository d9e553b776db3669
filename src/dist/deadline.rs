//! A time limit on a blocking step that no watchdog covers yet: creating the NCCL communicator,
//! which waits for every rank inside `ncclCommInitRank`, before the collective watchdog exists.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs `f`; if it has not returned within `limit`, `on_timeout` runs on a helper thread (to
/// end the job: `f` itself may never return). A zero limit waits forever.
pub fn within<T>(
    limit: Duration,
    on_timeout: impl FnOnce() + Send + 'static,
    f: impl FnOnce() -> T,
) -> T {
    if limit.is_zero() {
        return f();
    }
    let (done, wait) = mpsc::channel::<()>();
    // Set under the lock when `f` has returned: a timeout that races with the return then sees
    // it and does nothing.
    let finished = Arc::new(Mutex::new(false));
    let seen = Arc::clone(&finished);
    let guard = std::thread::Builder::new()
        .name("join-deadline".into())
        .spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                let finished = seen.lock().unwrap_or_else(|e| e.into_inner());
                if !*finished {
                    on_timeout();
                }
            }
        });
    let out = f();
    *finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
    drop(done); // the helper then returns without calling on_timeout
    if let Ok(guard) = guard {
        let _ = guard.join();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn flag() -> (Arc<AtomicBool>, impl FnOnce() + Send + 'static) {
        let fired = Arc::new(AtomicBool::new(false));
        let set = Arc::clone(&fired);
        (fired, move || set.store(true, Ordering::SeqCst))
    }

    #[test]
    fn a_step_past_its_limit_fires_the_timeout_while_it_still_runs() {
        let (fired, on_timeout) = flag();
        let seen_inside = within(Duration::from_millis(50), on_timeout, || {
            let start = std::time::Instant::now();
            while !fired.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            fired.load(Ordering::SeqCst)
        });
        assert!(seen_inside, "the timeout ran while the step was blocked");
    }

    #[test]
    fn a_step_within_its_limit_or_without_one_does_not() {
        let (fired, on_timeout) = flag();
        assert_eq!(within(Duration::from_secs(5), on_timeout, || 7), 7);
        assert!(!fired.load(Ordering::SeqCst));
        let (fired, on_timeout) = flag();
        within(Duration::ZERO, on_timeout, || {
            std::thread::sleep(Duration::from_millis(30))
        });
        assert!(!fired.load(Ordering::SeqCst));
    }
}
