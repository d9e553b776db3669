//! Reading the input files ahead of the decoding workers.
//!
//! Each shard is made durable with `fsync`, which ends in a cache flush of the whole device. On
//! the disks measured here a flush takes 0.1-0.4 s, and every read queued behind it waits as
//! long: workers that read their own input files sat idle, both cores at once, through each
//! flush. A loader thread that keeps a few chunks of input bytes in memory ahead of the workers
//! lets them decode through it. The same read-ahead hides the disk when the inputs are not in
//! the page cache (the usual case the first time a dataset is packed).

use std::fs::File;
use std::path::Path;

use crate::bounded::{self, ReadError};
use crate::sources::{ImageData, Item};

/// Largest image file read: far beyond any photo, well below running out of memory.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// The encoded bytes of one input, or why they could not be read; `None` for an item whose
/// pixels are already in memory (array sources).
pub type Input = Option<Result<Vec<u8>, ReadError>>;

/// Reads the inputs of `items`, in order. All files are opened and announced to the kernel
/// first, so that it can fetch them concurrently, then read one after the other.
pub fn read_chunk<'a>(items: impl IntoIterator<Item = &'a Item>) -> Vec<Input> {
    let opened: Vec<Option<Result<(File, &Path), ReadError>>> = items
        .into_iter()
        .map(|item| match &item.data {
            ImageData::File(path) => Some(open_announced(path)),
            ImageData::Pixels(_) => None,
        })
        .collect();
    opened
        .into_iter()
        .map(|file| {
            file.map(|file| {
                let (file, path) = file?;
                bounded::read_handle_limited(file, path, MAX_IMAGE_FILE_BYTES)
            })
        })
        .collect()
}

/// Opens a regular file (never blocking on a FIFO) and announces the read.
fn open_announced(path: &Path) -> Result<(File, &Path), ReadError> {
    let file = bounded::open_regular(path)?;
    will_need(&file);
    Ok((file, path))
}

/// Asks the kernel to start reading the whole file into the page cache, without waiting.
/// Advisory: errors are ignored (the read that follows reports any).
#[cfg(target_os = "linux")]
fn will_need(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain system call on a file descriptor this process owns; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn will_need(_file: &File) {}
