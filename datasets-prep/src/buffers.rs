//! Recycling of pixel buffers between the writer and the decoding workers.
//!
//! Every image passes through two buffers of about 1 MB (decoded and resized pixels). Fresh
//! allocations of that size are zeroed by the allocator and faulted in page by page by the
//! kernel, then handed back to it when freed by another thread: 5-7% of the CPU time of a pack
//! in profiles here. Buffers that go round through this pool keep their pages.

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
    /// zeros where it had to grow. It is the smallest spare buffer that holds `len` bytes
    /// without wasting more than as much again, so that decoded and resized images (whose sizes
    /// can differ widely) each keep buffers of their own size; a new one if none fits.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let fitting = {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            let best = (spare.iter().enumerate())
                .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| spare.swap_remove(i))
        };
        let mut buf = fitting.unwrap_or_default();
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
        let pool = BufferPool::new(2);
        let a = pool.take(10);
        assert_eq!(a, vec![0; 10]);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(6);
        assert_eq!(
            (b.len(), b.as_ptr()),
            (6, ptr),
            "a spare buffer that fits is reused"
        );
        pool.give(b);
        let c = pool.take(16);
        assert_eq!(c, vec![0; 16], "none fits: a new, zeroed buffer");
        pool.give(c);
        pool.give(vec![1; 3]);
        pool.give(vec![2; 3]); // beyond `keep`: dropped
        assert_eq!(pool.spare.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_much_larger_buffer_is_not_spent_on_a_small_image() {
        let pool = BufferPool::new(4);
        pool.give(vec![7; 1000]);
        pool.give(vec![7; 12]);
        let small = pool.take(10);
        assert_eq!(small.capacity(), 12, "the best fit");
        let smaller = pool.take(4);
        assert!(
            smaller.capacity() < 1000,
            "the 1000-byte buffer stays for large images"
        );
        assert_eq!(pool.take(900).capacity(), 1000);
    }
}
