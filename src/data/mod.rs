//! Data: the epoch order, per-sample augmentation and the threaded batch loader over a shard
//! directory (`datasets_prep::ShardDir`).

pub mod augment;
pub mod loader;
pub mod selection;

use datasets_prep::rng::SplitMix64;

/// The training order of `epoch`: a permutation of 0..n that depends only on (seed, epoch).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::stream(seed.wrapping_add(0x5EED), epoch).shuffle(&mut order);
    order
}

/// The samples of `epoch` for training on `records` (of a split of `split_len` records) with
/// `repeats` passes per epoch: the passes are shuffled together ([`epoch_order`] over all
/// `repeats * records.len()` positions), and the k-th pass's copy of record r is the loader
/// index `r + k * split_len`, so that its augmentation is drawn anew. With every record and one
/// pass this is exactly [`epoch_order`].
pub fn epoch_samples(
    seed: u64,
    epoch: u64,
    records: &[usize],
    repeats: usize,
    split_len: usize,
) -> Vec<usize> {
    let m = records.len();
    epoch_order(seed, epoch, m * repeats.max(1))
        .into_iter()
        .map(|p| records[p % m] + (p / m) * split_len)
        .collect()
}

/// Part `part` of `0..total` cut into `parts` contiguous pieces whose sizes differ by at most one
/// (the first `total % parts` pieces are one longer; pieces may be empty). How a global batch is
/// shared among ranks, and a batch among ghost-BatchNorm groups.
pub fn share(total: usize, parts: usize, part: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    let (base, extra) = (total / parts, total % parts);
    let start = part * base + part.min(extra);
    start..start + base + usize::from(part < extra)
}

/// Number of batches of `batch` (last partial batch kept).
pub fn batches(n: usize, batch: usize) -> usize {
    n.div_ceil(batch.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_over_every_record_is_the_plain_epoch_order() {
        let all: Vec<usize> = (0..50).collect();
        assert_eq!(epoch_samples(3, 7, &all, 1, 50), epoch_order(3, 7, 50));
    }

    #[test]
    fn repeats_pass_over_each_record_with_distinct_draw_indices() {
        let records = [2usize, 5, 9];
        let samples = epoch_samples(0, 1, &records, 4, 10);
        assert_eq!(samples.len(), 12);
        let mut keys = samples.clone();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 12, "every copy draws its own augmentation");
        for r in records {
            assert_eq!(samples.iter().filter(|&&k| k % 10 == r).count(), 4);
        }
    }
}
