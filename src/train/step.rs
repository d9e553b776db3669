//! One optimiser step of data-parallel training: forward and backward on this rank's share of
//! the global batch, the gradient all-reduce (with the step's loss and stop flag), the update.
//! `train` runs [`train_step`] for every step and `bench-step` times the same functions.

use tch::{Device, Tensor};

use super::data_parallel::{DataParallel, GroupedStats};
use crate::data::loader::Batch;
use crate::model::layers::Pass;
use crate::network::Network;
use crate::optim::Sgd;
use crate::runtime::autocast;

/// How every step of a run computes.
#[derive(Clone, Copy, Debug)]
pub struct StepSettings {
    pub device: Device,
    /// bfloat16 autocast in forward and backward.
    pub bf16: bool,
    /// What training BatchNorm statistics are computed over.
    pub bn: BnGroups,
}

/// What the training statistics of every BatchNorm are computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnGroups {
    /// This rank's share of the batch.
    PerRank,
    /// `groups` parts of this rank's share (`--bn-batch` smaller than the share).
    Ghost { groups: usize },
    /// The shares of `ranks` consecutive ranks together (`--sync-bn`: all of them; `--bn-batch`
    /// larger than a share: as many as make the group).
    Synced { ranks: usize },
}

impl BnGroups {
    /// The grouping of a run with global batch `batch` on `world` ranks: `bn_batch` images per
    /// group, or the whole global batch with `sync_bn`. A group size that does not divide the
    /// shares evenly is refused (the statistics would silently be over another size).
    pub fn for_run(
        bn_batch: Option<usize>,
        sync_bn: bool,
        batch: usize,
        world: usize,
    ) -> anyhow::Result<BnGroups> {
        let world = world.max(1);
        if sync_bn {
            return Ok(if world > 1 {
                BnGroups::Synced { ranks: world }
            } else {
                BnGroups::PerRank
            });
        }
        let Some(n) = bn_batch else {
            return Ok(BnGroups::PerRank);
        };
        let share = batch / world;
        let even = batch.is_multiple_of(world);
        if even && share >= n && share.is_multiple_of(n) {
            let groups = share / n;
            return Ok(if groups > 1 {
                BnGroups::Ghost { groups }
            } else {
                BnGroups::PerRank
            });
        }
        if even
            && share > 0
            && share < n
            && n.is_multiple_of(share)
            && world.is_multiple_of(n / share)
        {
            return Ok(BnGroups::Synced { ranks: n / share });
        }
        anyhow::bail!(
            "--bn-batch {n}: the global batch of {batch} on {world} rank(s) gives {} images per \
             rank, which groups of {n} do not divide (or {n} / that must divide the ranks); \
             choose a batch, rank count or --bn-batch that fit, or --bn-batch 0",
            batch as f64 / world as f64
        )
    }
}

/// Where a step is in the run (0-based), for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepAt {
    pub epoch: usize,
    pub step: usize,
}

/// The loss of a step was not finite. Every rank sees the same all-reduced loss, so every rank
/// of the run fails alike (a sweep records the cell as failed and goes on).
#[derive(Debug, thiserror::Error)]
#[error(
    "the loss became {loss} at epoch {epoch} step {step} (lr {lr}){}; stopping (metrics so far are \
     kept)",
    read_at.map_or(String::new(), |r| format!(
        ", seen when the step totals were read after step {r} (--totals-every)"
    ))
)]
pub struct Diverged {
    pub loss: f64,
    pub epoch: usize,
    pub step: usize,
    pub lr: f64,
    /// The (1-based) step after which the loss was read, when later than `step`.
    pub read_at: Option<usize>,
}

/// Runs one step: `batch` is this rank's share of a global batch of `global_size` images,
/// `lr` the step's learning rate, `stop` whether this rank was asked to stop. Returns the step
/// totals on the device (the global-batch loss, the number of ranks that asked to stop), valid
/// until the next step: the host reads them later ([`super::step_totals`]), so on a GPU the
/// step queues its work without waiting for it.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    net: &Network,
    opt: &mut Sgd,
    dp: &mut DataParallel,
    batch: &Batch,
    global_size: usize,
    lr: f64,
    settings: &StepSettings,
    stop: bool,
    at: StepAt,
) -> anyhow::Result<Tensor> {
    dp.reset_gradients(opt)?;
    let loss = forward_backward(net, dp, batch, global_size, settings);
    dp.note_step(at.epoch, at.step);
    let (grads, totals) = dp.reduce_gradients(&opt.params, loss.as_ref(), stop)?;
    let _norm = opt.step_with(lr, grads)?;
    Ok(totals)
}

/// The forward and backward pass of this rank's share: gradients accumulate into the
/// parameters' `.grad`; returns the (detached) loss, scaled to this rank's share of the
/// global-batch mean so that the all-reduce's sum is that mean. `None` for an empty share.
pub fn forward_backward(
    net: &Network,
    dp: &DataParallel,
    batch: &Batch,
    global_size: usize,
    settings: &StepSettings,
) -> Option<Tensor> {
    let synced = match settings.bn {
        BnGroups::Synced { ranks } if dp.world() > 1 => Some(ranks),
        _ => None,
    };
    // An empty share still runs the forward pass when the BatchNorms are synchronised (every
    // rank joins their all-reduces), but has no loss.
    if batch.is_empty() && synced.is_none() {
        return None;
    }
    let (images, labels) = batch.to_device(settings.device);
    let grouped = GroupedStats {
        dp,
        ranks_per_group: synced.unwrap_or(1),
        global_images: global_size,
    };
    let pass = match (settings.bn, synced) {
        (_, Some(_)) => Pass::TrainSynced(&grouped),
        (BnGroups::Ghost { groups }, None) => Pass::TrainGhost { groups },
        _ => Pass::Train,
    };
    let loss = autocast::bf16(settings.bf16, settings.device, || {
        let out = net.forward(&images, pass);
        (!batch.is_empty()).then(|| net.head.loss(&out, &labels))
    })?;
    let loss = if dp.world() == 1 {
        loss
    } else {
        loss * (batch.len() as f64 / global_size as f64)
    };
    loss.backward();
    Some(loss.detach())
}

#[cfg(test)]
mod tests {
    use super::BnGroups;

    #[test]
    fn bn_groups_reproduce_four_by_24_on_any_rank_count() {
        let g = |world| BnGroups::for_run(Some(24), false, 96, world).unwrap();
        assert_eq!(g(1), BnGroups::Ghost { groups: 4 });
        assert_eq!(g(2), BnGroups::Ghost { groups: 2 });
        assert_eq!(g(4), BnGroups::PerRank);
        assert_eq!(g(8), BnGroups::Synced { ranks: 2 });
        let err = BnGroups::for_run(Some(24), false, 96, 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--bn-batch 24") && err.contains("32 images per rank"),
            "{err}"
        );
        assert_eq!(
            BnGroups::for_run(None, true, 96, 4).unwrap(),
            BnGroups::Synced { ranks: 4 }
        );
        assert_eq!(
            BnGroups::for_run(None, false, 96, 4).unwrap(),
            BnGroups::PerRank
        );
    }
}
