//! Stop signals. SIGTERM and SIGUSR1 (what Slurm and most schedulers send before they stop a
//! job) and SIGINT (Ctrl-C) only record which signal came; the training loop agrees on it across ranks at the
//! next step, writes a checkpoint and exits with [`EXIT_PREEMPTED`] (130 after Ctrl-C, as a shell
//! expects of an interrupted program). A second signal while the
//! first is still being handled ends the process at once (a stuck rank must remain killable).
//!
//! The handlers are signal-hook's: one atomic holds the signal number (0: none), so the flag and
//! the signal's name can never disagree.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Exit status after a signal made the run checkpoint and stop; resume with `--resume auto`.
pub const EXIT_PREEMPTED: i32 = 75;

/// A run stopped early on a preemption signal after writing a checkpoint; the program exits
/// with [`EXIT_PREEMPTED`] and the run resumes later.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped by {signal} after step {step}; checkpoint {checkpoint}; resume with --resume auto"
)]
pub struct Stopped {
    pub signal: &'static str,
    /// The signal this rank got (`None`: another rank's stopped the job).
    pub signal_number: Option<i32>,
    pub step: u64,
    pub checkpoint: String,
}

impl Stopped {
    /// The exit status: 130 (128 + SIGINT) after Ctrl-C, else [`EXIT_PREEMPTED`].
    pub fn exit_code(&self) -> u8 {
        exit_code_after(self.signal_number)
    }
}

/// The exit status after a stop asked for by `signal` (`None`: another rank's): 130 after
/// Ctrl-C, else [`EXIT_PREEMPTED`].
pub fn exit_code_after(signal: Option<i32>) -> u8 {
    match signal {
        Some(libc::SIGINT) => 130,
        _ => EXIT_PREEMPTED as u8,
    }
}

/// The signals that ask for a checkpoint and a stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGUSR1, libc::SIGINT];

/// Set by the first stop signal; arms the immediate exit on the second.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The number of the first stop signal, 0 while none came.
static RECEIVED: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Installs the handlers (once per process; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        for signal in STOP_SIGNALS {
            // Order matters: the exit check runs before the flag that arms it is set.
            let registered =
                signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, &ARMED)
                    .and_then(|_| signal_hook::flag::register(signal, &ARMED))
                    .and_then(|_| {
                        signal_hook::flag::register_usize(signal, &RECEIVED, signal as usize)
                    });
            if let Err(e) = registered {
                tracing::warn!(
                    "cannot handle {}: {e}; it will end the process without a checkpoint",
                    name(signal)
                );
            }
        }
    });
}

/// Whether a stop was requested, and by which signal.
pub fn requested() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal as i32),
    }
}

/// The name of a signal number, for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGINT => "SIGINT",
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
