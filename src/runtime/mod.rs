//! What a process of this program runs on and reacts to: its device, the allocator, bf16
//! autocast, the shared libraries it loaded, preemption signals, and the fault injection of the
//! failure-path tests. Nothing here knows about models, data or runs.

pub mod autocast;
pub mod device;
pub mod fault;
pub mod libraries;
pub mod memory;
pub mod signals;
