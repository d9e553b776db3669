//! Recycling of pixel buffers between the writer and the decoding workers.
//!
//! Every image passes through two buffers of about 1 MB (decoded and resized pixels). Fresh
//! allocations of that size are zeroed by the allocator and faulted in page by page by the
//! kernel, then handed back to it when freed by another thread: 5-7% of the CPU time of a pack
//! in profiles here. Buffers that go round through this pool are only overwritten.

use std::sync::Mutex;

/// A bounded stack of spare buffers, shared by all threads of a pack.
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` spare buffers (the rest are freed).
    pub fn new(keep: usize) -> Self {
        BufferPool {
            spare: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of exactly `len` bytes; its contents are whatever the last user left, and
    /// zeros where it had to grow.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = spare.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Hands a buffer back for a later `take`.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < self.keep {
            spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_the_length_asked_for() {
        let pool = BufferPool::new(1);
        let a = pool.take(10);
        assert_eq!(a, vec![0; 10]);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(4);
        assert_eq!(
            (b.len(), b.as_ptr()),
            (4, ptr),
            "the spare buffer is reused"
        );
        pool.give(b);
        let c = pool.take(16);
        assert_eq!(c.len(), 16);
        assert_eq!(&c[4..], &[0; 12], "grown bytes are zero");
        pool.give(pool.take(1));
        pool.give(vec![1; 3]); // beyond `keep`: dropped
        assert_eq!(pool.spare.lock().unwrap().len(), 1);
    }
}
