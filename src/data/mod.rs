//! Data: the epoch order, per-sample augmentation and the threaded batch loader over a shard
//! directory (`datasets_prep::ShardDir`).

pub mod augment;
pub mod loader;

use datasets_prep::rng::SplitMix64;

/// The training order of `epoch`: a permutation of 0..n that depends only on (seed, epoch).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::stream(seed.wrapping_add(0x5EED), epoch).shuffle(&mut order);
    order
}

/// Number of batches of `batch` (last partial batch kept).
pub fn batches(n: usize, batch: usize) -> usize {
    n.div_ceil(batch.max(1))
}
