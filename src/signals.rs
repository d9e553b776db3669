//! Preemption signals. SIGTERM and SIGUSR1 (what Slurm and most schedulers send before they
//! stop a job) only set a flag; the training loop agrees on it across ranks at the next step,
//! writes a checkpoint and exits with [`EXIT_PREEMPTED`]. A second signal while the first is
//! still being handled ends the process at once (a stuck rank must remain killable).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Exit status after a signal made the run checkpoint and stop; resume with `--resume auto`.
pub const EXIT_PREEMPTED: i32 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// Installs the handlers for SIGTERM and SIGUSR1.
pub fn install() {
    for signal in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches atomics (and _exit), which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was requested, and by which signal.
pub fn requested() -> Option<i32> {
    REQUESTED
        .load(Ordering::SeqCst)
        .then(|| SIGNAL.load(Ordering::SeqCst))
}

/// The name of a signal number, for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// Raised by the fault injection of the tests: as if the scheduler had signalled this rank.
pub fn raise_term() {
    // SAFETY: raising a signal whose handler is installed (or whose default ends the process).
    unsafe {
        libc::raise(libc::SIGTERM);
    }
}
