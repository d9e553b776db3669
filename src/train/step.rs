//! One optimiser step of data-parallel training: forward and backward on this rank's share of
//! the global batch, the gradient all-reduce (with the step's loss and stop flag), the update.
//! `train` runs [`train_step`] for every step and `bench-step` times the same functions.

use anyhow::bail;
use tch::{Device, Tensor};

use super::data_parallel::DataParallel;
use super::grad_sync::StepTotals;
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
    /// BatchNorm statistics over the whole job's batch (has no effect on one rank).
    pub sync_bn: bool,
}

/// Where a step is in the run (0-based), for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepAt {
    pub epoch: usize,
    pub step: usize,
}

/// Runs one step: `batch` is this rank's share of a global batch of `global_size` images,
/// `lr` the step's learning rate, `stop` whether this rank was asked to stop. Returns the
/// totals over all ranks (the global-batch loss, whether any rank asked to stop). A
/// non-finite loss is an error naming the step; the update is then not applied.
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
) -> anyhow::Result<StepTotals> {
    opt.zero_grad();
    let loss = forward_backward(net, dp, batch, global_size, settings);
    dp.note_step(at.epoch, at.step);
    let (grads, totals) = dp.reduce_gradients(&opt.params, loss.as_ref(), stop)?;
    if !totals.loss.is_finite() {
        bail!(
            "the loss became {} at epoch {} step {} (lr {lr}); stopping (metrics so far are kept)",
            totals.loss,
            at.epoch + 1,
            at.step + 1
        );
    }
    opt.step_with(lr, grads);
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
    let sync_bn = settings.sync_bn && dp.world() > 1;
    // An empty share still runs the forward pass when the BatchNorms are synchronised (every
    // rank joins their all-reduces), but has no loss.
    if batch.is_empty() && !sync_bn {
        return None;
    }
    let (images, labels) = batch.to_device(settings.device);
    let pass = if sync_bn {
        Pass::TrainSynced(dp)
    } else {
        Pass::Train
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
