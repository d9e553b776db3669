//! Data parallelism: the one part of training that talks to the other ranks. It owns the
//! communicator for a run and keeps the ranks' replicas one model: the initial broadcast, model
//! checksums, the fused gradient all-reduce, BatchNorm averaging and gathering, synchronised
//! BatchNorm statistics, and the sums and broadcasts that evaluation and checkpoints need.
//!
//! Every rank executes the same sequence of collectives whatever its data: a rank whose share of
//! a batch is empty still joins the gradient all-reduce.

use std::ops::Range;

use anyhow::{Context, bail};
use tch::{Device, Tensor};

use super::grad_sync::GradSync;
use crate::dist::{Backend, Communicator};
use crate::model::layers::BatchStatsReducer;
use crate::optim::Param;
use crate::tensors::{bn_buffers, host_bytes, sorted_variables as variables};

pub use crate::data::share;

/// A 64-bit hash of the name, shape and bytes of every parameter and, with `buffers`, every
/// buffer (BatchNorm statistics, which legitimately differ between ranks during an epoch).
pub fn model_checksum(vs: &tch::nn::VarStore, buffers: bool) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, t) in variables(vs) {
        if !buffers && !t.requires_grad() {
            continue;
        }
        h.update(name.as_bytes());
        for d in t.size() {
            h.update(&d.to_le_bytes());
        }
        h.update(&host_bytes(&t));
    }
    h.digest()
}

/// One rank's view of its data-parallel job.
pub struct DataParallel<'c> {
    comm: &'c dyn Communicator,
    /// The gradient buffer, once [`DataParallel::attach`] has seen the parameters.
    grads: Option<GradSync>,
}

impl<'c> DataParallel<'c> {
    pub fn new(comm: &'c dyn Communicator) -> Self {
        DataParallel { comm, grads: None }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.size()
    }

    /// Whether this rank writes the run's files (rank 0).
    pub fn is_lead(&self) -> bool {
        self.comm.rank() == 0
    }

    pub fn backend(&self) -> Backend {
        self.comm.backend()
    }

    /// This rank's contiguous share of `0..total`.
    pub fn my_share(&self, total: usize) -> Range<usize> {
        share(total, self.world(), self.rank())
    }

    /// Names what the next collectives are for, for the message of one that times out.
    pub fn set_context(&self, context: &str) {
        self.comm.set_context(context);
    }

    /// Names the step whose gradients are reduced next (formatted only with several ranks).
    pub fn note_step(&self, epoch: usize, step: usize) {
        if self.world() > 1 {
            self.comm.set_context(&format!(
                "gradient all-reduce, epoch {} step {}",
                epoch + 1,
                step + 1
            ));
        }
    }

    /// Replaces every variable on every rank by rank 0's (parameters and BatchNorm buffers).
    pub fn broadcast_model(&self, vs: &tch::nn::VarStore) -> anyhow::Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let named = variables(vs);
        let mut bytes = Vec::new();
        if self.comm.rank() == 0 {
            for (_, t) in &named {
                bytes.extend_from_slice(&host_bytes(t));
            }
        }
        self.comm.set_context("broadcast of rank 0's initial model");
        self.comm
            .broadcast_bytes(&mut bytes, 0)
            .context("broadcasting the initial model")?;
        let mut offset = 0;
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, t) in &named {
                let len = t.numel() * t.kind().elt_size_in_bytes();
                let Some(chunk) = bytes.get(offset..offset + len) else {
                    bail!(
                        "rank 0's model is smaller than this rank's (at {name}): ranks built different models"
                    );
                };
                let src = Tensor::from_data_size(chunk, &t.size(), t.kind());
                t.shallow_clone().copy_(&src);
                offset += len;
            }
            Ok(())
        })?;
        if offset != bytes.len() {
            bail!("rank 0's model is larger than this rank's: ranks built different models");
        }
        Ok(())
    }

    /// Checks that every rank holds the same model (`when` says where, for the message), buffers
    /// included with `buffers`. Every rank reaches the same verdict, so an error is returned on all
    /// of them.
    pub fn check_same_model(
        &self,
        vs: &tch::nn::VarStore,
        when: &str,
        buffers: bool,
    ) -> anyhow::Result<u64> {
        let own = model_checksum(vs, buffers);
        if self.comm.size() == 1 {
            return Ok(own);
        }
        // f64 holds 52-bit integers exactly; one slot per rank makes the sum an all-gather.
        let mut slots = vec![0f64; self.comm.size()];
        slots[self.comm.rank()] = (own >> 12) as f64;
        self.comm.set_context(&format!("model checksum {when}"));
        self.comm
            .all_reduce_sum_f64(&mut slots)
            .context("comparing model checksums")?;
        let differing: Vec<usize> = (1..slots.len()).filter(|&r| slots[r] != slots[0]).collect();
        if !differing.is_empty() {
            bail!(
                "the model replicas differ {when}: ranks {differing:?} hold a different model than \
                 rank 0 (checksums {:?}); this is a bug or a hardware fault, not a usage error",
                slots
                    .iter()
                    .map(|&s| format!("{:013x}", s as u64))
                    .collect::<Vec<_>>()
            );
        }
        Ok(own)
    }

    /// Prepares the gradient all-reduce for `params` (calls of at most `bucket_mb` MiB).
    pub fn attach(&mut self, params: &[Param], device: Device, bucket_mb: usize) {
        self.grads = Some(GradSync::new(params, self.comm, device, bucket_mb));
    }

    /// Sums the gradients of `params`, `loss` (this rank's share of the global-batch mean,
    /// `None` for a rank without samples) and `stop` over all ranks. Returns the gradients, in
    /// parameter order, and the step totals on the device ([`GradSync::reduce`]).
    pub fn reduce_gradients(
        &mut self,
        params: &[Param],
        loss: Option<&Tensor>,
        stop: bool,
    ) -> anyhow::Result<(Vec<Tensor>, Tensor)> {
        let comm = self.comm;
        let grads = self
            .grads
            .as_mut()
            .context("internal: gradients reduced before DataParallel::attach")?;
        grads.reduce(params, loss, stop, comm)
    }

    /// Prepares `opt`'s gradients for the next backward pass: zeroed where they are views into
    /// the all-reduce buffer (several ranks), else cleared, so that backward stores them.
    pub fn reset_gradients(&self, opt: &mut crate::optim::Sgd) -> anyhow::Result<()> {
        if self.world() > 1 {
            opt.zero_grad()?;
        } else {
            opt.clear_grads()?;
        }
        Ok(())
    }

    /// Waits for the gradient all-reduces queued so far (`steps` names them, for the message of
    /// one that does not complete).
    pub fn wait_for_reduces(&mut self, steps: &str) -> anyhow::Result<()> {
        let comm = self.comm;
        let Some(grads) = self.grads.as_mut() else {
            return Ok(());
        };
        if comm.size() > 1 && comm.backend() == Backend::Nccl {
            comm.set_context(steps);
        }
        grads.wait(comm)
    }

    /// Number of f32 values in one step's all-reduce (gradients and step totals).
    pub fn reduced_floats(&self) -> usize {
        self.grads.as_ref().map_or(0, GradSync::len)
    }

    /// Seconds spent in gradient all-reduce calls since the last call.
    pub fn take_sync_seconds(&mut self) -> f64 {
        self.grads.as_mut().map_or(0.0, GradSync::take_seconds)
    }

    /// Makes every rank's BatchNorm running statistics the weighted average over ranks: each rank's
    /// statistics count `weight` times (1 for the per-rank moving averages; the number of batches
    /// it averaged for precise BN, possibly 0). Step counts become rank 0's.
    pub fn average_bn_buffers(&self, vs: &tch::nn::VarStore, weight: f64) -> anyhow::Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let (floats, ints) = bn_buffers(vs);
        let floats: Vec<Tensor> = floats.into_iter().map(|(_, t)| t).collect();
        let ints: Vec<Tensor> = ints.into_iter().map(|(_, t)| t).collect();
        let mut host: Vec<f32> = Vec::new();
        for t in &floats {
            let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).reshape([-1]))?;
            host.extend(v.iter().map(|&x| x * weight as f32));
        }
        let mut total_weight = [weight];
        self.comm.set_context("averaging BatchNorm statistics");
        self.comm
            .all_reduce_sum_f64(&mut total_weight)
            .context("averaging BatchNorm statistics")?;
        self.comm
            .all_reduce_sum_f32(&mut host)
            .context("averaging BatchNorm statistics")?;
        if total_weight[0] <= 0.0 {
            bail!("averaging BatchNorm statistics: no rank saw any batch");
        }
        let scale = 1.0 / total_weight[0] as f32;
        let mut offset = 0;
        tch::no_grad(|| {
            for t in &floats {
                let n = t.numel();
                let values: Vec<f32> = host[offset..offset + n]
                    .iter()
                    .map(|&x| x * scale)
                    .collect();
                let src = Tensor::from_slice(&values)
                    .view(t.size().as_slice())
                    .to_device(t.device());
                t.shallow_clone().copy_(&src);
                offset += n;
            }
        });
        let mut bytes = Vec::new();
        if self.comm.rank() == 0 {
            for t in &ints {
                bytes.extend_from_slice(&host_bytes(t));
            }
        }
        self.comm
            .broadcast_bytes(&mut bytes, 0)
            .context("sharing BatchNorm step counts")?;
        let mut offset = 0;
        tch::no_grad(|| {
            for t in &ints {
                let len = t.numel() * t.kind().elt_size_in_bytes();
                if let Some(chunk) = bytes.get(offset..offset + len) {
                    let src =
                        Tensor::from_data_size(chunk, &t.size(), t.kind()).to_device(t.device());
                    t.shallow_clone().copy_(&src);
                }
                offset += len;
            }
        });
        Ok(())
    }

    /// Every rank's BatchNorm running statistics, flattened in `bn_buffers` order: one
    /// all-reduce over a (world x buffers) array in which each rank fills its own row.
    pub fn gather_bn(&self, vs: &tch::nn::VarStore) -> anyhow::Result<Vec<Vec<f32>>> {
        let own: Vec<f32> = bn_buffers(vs)
            .0
            .iter()
            .map(|(_, t)| Vec::<f32>::try_from(t.to_device(Device::Cpu).reshape([-1])))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let (w, n) = (self.world(), own.len());
        if w == 1 || n == 0 {
            // One rank, or a model without BatchNorm: nothing to exchange.
            return Ok(vec![own; w]);
        }
        let mut all = vec![0f32; w * n];
        all[self.rank() * n..(self.rank() + 1) * n].copy_from_slice(&own);
        self.comm
            .set_context("gathering BatchNorm statistics for a checkpoint");
        self.comm
            .all_reduce_sum_f32(&mut all)
            .context("gathering BatchNorm statistics")?;
        Ok(all.chunks(n).map(<[f32]>::to_vec).collect())
    }

    /// Sums `values` over all ranks (counts, metrics); `what` names them in errors.
    pub fn sum_f64(&self, values: &mut [f64], what: &str) -> anyhow::Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.comm.set_context(what);
        self.comm
            .all_reduce_sum_f64(values)
            .with_context(|| what.to_string())
    }

    /// Replaces `bytes` on every rank by rank 0's; `what` names them in errors.
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>, what: &str) -> anyhow::Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.comm.set_context(what);
        self.comm
            .broadcast_bytes(bytes, 0)
            .with_context(|| what.to_string())
    }

    /// Waits for every rank; `what` says what for (the message of a timeout).
    pub fn barrier(&self, what: &str) -> anyhow::Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.comm.set_context(what);
        self.comm.barrier().with_context(|| what.to_string())
    }
}

/// Synchronised BatchNorm over groups of `ranks_per_group` consecutive ranks (all of them for
/// `--sync-bn`; fewer for `--bn-batch` larger than a rank's share): with several groups each
/// rank's statistics go into its group's slot of one world-wide all-reduce, so that no
/// sub-communicator is needed.
pub struct GroupedStats<'a, 'c> {
    pub dp: &'a DataParallel<'c>,
    pub ranks_per_group: usize,
    /// The step's global batch, split over the ranks by [`share`].
    pub global_images: usize,
}

impl GroupedStats<'_, '_> {
    fn groups(&self) -> usize {
        (self.dp.world() / self.ranks_per_group.max(1)).max(1)
    }
}

impl BatchStatsReducer for GroupedStats<'_, '_> {
    fn sum_over_ranks(&self, packed: &Tensor) -> Tensor {
        let groups = self.groups() as i64;
        if groups == 1 {
            return self.dp.sum_over_ranks(packed);
        }
        let mine = (self.dp.rank() / self.ranks_per_group.max(1)) as i64;
        let len = packed.numel() as i64;
        let slots = Tensor::zeros([groups * len], (packed.kind(), packed.device()));
        slots.narrow(0, mine * len, len).copy_(packed);
        self.dp.sum_over_ranks(&slots).narrow(0, mine * len, len)
    }

    fn pooled_images(&self) -> usize {
        pooled_images(
            self.global_images,
            self.dp.world(),
            self.dp.rank(),
            self.ranks_per_group,
        )
    }
}

/// The images of `global` (split over `world` ranks by [`share`]) held by the group of
/// `per_group` consecutive ranks that `rank` belongs to.
fn pooled_images(global: usize, world: usize, rank: usize, per_group: usize) -> usize {
    let world = world.max(1);
    let per = per_group.clamp(1, world);
    let first = (rank / per) * per;
    let last = (first + per).min(world) - 1;
    share(global, world, last).end - share(global, world, first).start
}

impl DataParallel<'_> {
    /// `packed` summed over every rank, on its own device (MPI reduces a host copy).
    fn sum_over_ranks(&self, packed: &Tensor) -> Tensor {
        let mut reduced = if self.backend() == Backend::Nccl {
            packed.contiguous()
        } else {
            packed.to_device(Device::Cpu).contiguous()
        };
        // Queued: the layer's next kernels are ordered after the sum on the device.
        if let Err(e) = self.comm.all_reduce_sum_queued(&mut reduced) {
            self.comm.abort(&format!("synchronised BatchNorm: {e}"), 1);
        }
        reduced.to_device(packed.device())
    }
}

#[cfg(test)]
mod tests {
    use super::{pooled_images, share};

    #[test]
    fn a_group_pools_the_shares_of_its_ranks() {
        // 10 images on 4 ranks: shares 3, 3, 2, 2.
        assert_eq!(pooled_images(10, 4, 0, 4), 10);
        assert_eq!(pooled_images(10, 4, 3, 4), 10);
        assert_eq!(pooled_images(10, 4, 1, 2), 6);
        assert_eq!(pooled_images(10, 4, 2, 2), 4);
        assert_eq!(pooled_images(10, 4, 3, 1), 2);
        // A last, short batch can leave a rank with nothing; its group still pools the rest.
        assert_eq!(pooled_images(1, 2, 1, 2), 1);
        assert_eq!(pooled_images(1, 2, 1, 1), 0);
    }

    #[test]
    fn shares_are_contiguous_cover_everything_and_differ_by_at_most_one() {
        for total in 0..40 {
            for parts in 1..9 {
                let pieces: Vec<_> = (0..parts).map(|p| share(total, parts, p)).collect();
                assert_eq!(pieces[0].start, 0);
                assert_eq!(pieces[parts - 1].end, total);
                for w in pieces.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = pieces.iter().map(|r| r.len()).collect();
                let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(max - min <= 1, "{total} in {parts}: {lens:?}");
            }
        }
        assert_eq!(share(1, 2, 1), 1..1);
        assert_eq!(share(5, 2, 0), 0..3);
    }
}
