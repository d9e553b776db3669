//! Early write-back of freshly written file ranges.
//!
//! A shard is made durable with `fsync` when it is closed. Left alone, the kernel holds the
//! whole shard (256 MiB by default) as dirty pages until then, and the fsync stalls the pack for
//! as long as the disk needs to take it all. Starting the write-back of each range as soon as it
//! is written lets the disk work while the next images are decoded, so the final fsync has
//! little left to wait for.

use std::fs::File;

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk, without waiting.
/// Advisory: errors are ignored here, the fsync on close reports them.
#[cfg(target_os = "linux")]
pub fn start(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: plain system call on a file descriptor this process owns; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn start(_file: &File, _offset: u64, _len: u64) {}
