//! Synchronised BatchNorm (`--sync-bn`): in training, every BatchNorm normalises with the mean and
//! variance of the whole job's batch instead of its rank's share, for per-rank batches too small
//! for stable statistics.
//!
//! Each BatchNorm sums its inputs and their squares per channel, and one all-reduce gives the
//! global sums. The forward pass, the running statistics and the normalisation the loss sees are
//! exact. The backward pass is not: the true gradient through the shared mean and variance needs
//! the other ranks' output gradients, which would take an all-reduce in the middle of the
//! backward pass (tch has no custom autograd functions to hook one in). Each rank instead
//! estimates the other ranks' part by its own (see `global_statistics`). Every rank runs every
//! BatchNorm, also with an empty share.

use tch::{Kind, Tensor};

use super::layers::BatchStatsReducer;

/// Global per-channel statistics of one BatchNorm input.
pub struct GlobalStatistics {
    /// Differentiable with respect to this rank's input.
    pub mean: Tensor,
    /// Biased (population) variance, differentiable with respect to this rank's input.
    pub var: Tensor,
    /// Values per channel over all ranks.
    pub count: f64,
}

/// The shape that broadcasts a per-channel vector over `xs` (N, C, ...).
pub fn channel_shape(xs: &Tensor) -> Vec<i64> {
    let mut shape = vec![1i64; xs.dim().max(2)];
    shape[1] = xs.size().get(1).copied().unwrap_or(1);
    shape
}

/// Per-channel mean and variance of `xs` (N, C, ...) over every rank's batch.
pub fn global_statistics(xs: &Tensor, reducer: &dyn BatchStatsReducer) -> GlobalStatistics {
    let size = xs.size();
    let channels = size.get(1).copied().unwrap_or(1);
    let dims: Vec<i64> = (0..xs.dim() as i64).filter(|&d| d != 1).collect();
    // Values per channel and image; the counts follow from the images pooled, so nothing is
    // read back from the device.
    let per_image: i64 = size.iter().skip(2).product();
    let count_local = size.first().copied().unwrap_or(0) * per_image;
    let total = (reducer.pooled_images() as i64 * per_image) as f64;
    let x = xs.to_kind(Kind::Float);
    let sum = x.sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    let sum_sq = (&x * &x).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    let packed = Tensor::cat(&[sum.detach(), sum_sq.detach()], 0);
    let reduced = reducer.sum_over_ranks(&packed);
    let n = total.max(1.0);
    // The values are the global sums. Their gradient is this rank's part scaled up to the
    // whole batch (total / local): the other ranks' part of the true gradient is estimated by
    // this rank's, which keeps the centring of the backward pass consistent (as in a per-rank
    // BatchNorm, evaluated at the global statistics). Letting only this rank's part through
    // unscaled centres by a fraction 1/W of what it should, and trains worse than per-rank
    // statistics.
    let scale = if count_local > 0 {
        total / count_local as f64
    } else {
        1.0
    };
    let global_sum = &sum * scale + (reduced.narrow(0, 0, channels) - &sum * scale).detach();
    let global_sq =
        &sum_sq * scale + (reduced.narrow(0, channels, channels) - &sum_sq * scale).detach();
    let mean = global_sum / n;
    let var = (global_sq / n - &mean * &mean).clamp_min(0.0);
    GlobalStatistics {
        mean,
        var,
        count: total,
    }
}
