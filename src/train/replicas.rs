//! Data parallelism: how work is shared between ranks and how their model replicas are kept one
//! model (initial broadcast, checksums, the fused gradient all-reduce, BatchNorm averaging).

use std::ops::Range;

use anyhow::{Context, bail};
use tch::{Device, Kind, Tensor};

use crate::dist::{Backend, Communicator};
use crate::optim::Param;
use crate::tensors::{bn_buffers, host_bytes, sorted_variables as variables};

/// Part `part` of `0..total` cut into `parts` contiguous pieces whose sizes differ by at most one
/// (the first `total % parts` pieces are one longer; pieces may be empty).
pub fn share(total: usize, parts: usize, part: usize) -> Range<usize> {
    let parts = parts.max(1);
    let (base, extra) = (total / parts, total % parts);
    let start = part * base + part.min(extra);
    start..start + base + usize::from(part < extra)
}

/// Replaces every variable on every rank by rank 0's (parameters and BatchNorm buffers).
pub fn broadcast_model(vs: &tch::nn::VarStore, comm: &dyn Communicator) -> anyhow::Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let named = variables(vs);
    let mut bytes = Vec::new();
    if comm.rank() == 0 {
        for (_, t) in &named {
            bytes.extend_from_slice(&host_bytes(t));
        }
    }
    comm.set_context("broadcast of rank 0's initial model");
    comm.broadcast_bytes(&mut bytes, 0)
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
    crate::model::layers::forget_all_step_counts();
    Ok(())
}

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

/// Checks that every rank holds the same model (`when` says where, for the message), buffers
/// included with `buffers`. Every rank reaches the same verdict, so an error is returned on all
/// of them.
pub fn check_same_model(
    vs: &tch::nn::VarStore,
    comm: &dyn Communicator,
    when: &str,
    buffers: bool,
) -> anyhow::Result<u64> {
    let own = model_checksum(vs, buffers);
    if comm.size() == 1 {
        return Ok(own);
    }
    // f64 holds 52-bit integers exactly; one slot per rank makes the sum an all-gather.
    let mut slots = vec![0f64; comm.size()];
    slots[comm.rank()] = (own >> 12) as f64;
    comm.set_context(&format!("model checksum {when}"));
    comm.all_reduce_sum_f64(&mut slots)
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

/// The fused gradient all-reduce: every step, all gradients (and the batch's loss) are summed
/// across ranks in one buffer, in as few calls as the bucket size allows.
///
/// Where the buffer can live on the gradients' device (CPU with MPI, GPU with NCCL), every
/// parameter's `.grad` is made a view into it once, so backward accumulates straight into the
/// buffer and a step packs nothing (as PyTorch DDP's `gradient_as_bucket_view`). Otherwise, or
/// if a gradient was replaced by another tensor, that gradient is copied in.
pub struct GradSync {
    /// Parameter gradients back to back, then `EXTRA` slots.
    flat: Tensor,
    offsets: Vec<i64>,
    sizes: Vec<i64>,
    /// Views of `flat` shaped like the parameters, on the parameters' device when `flat` is.
    views: Vec<Tensor>,
    /// Whether `views` live on the parameters' device (else they are copied there each step).
    same_device: bool,
    /// Elements per all-reduce call.
    bucket: usize,
    /// Seconds spent in the all-reduce calls since the last `take_seconds`.
    seconds: f64,
}

/// Slots after the gradients: the global-batch loss, and how many ranks want to stop.
const EXTRA: i64 = 2;

/// What a step's all-reduce returns besides the gradients.
pub struct StepTotals {
    /// The global-batch loss.
    pub loss: f64,
    /// Whether any rank asked to stop (a preemption signal) at this step.
    pub stop: bool,
}

impl GradSync {
    pub fn new(
        params: &[Param],
        comm: &dyn Communicator,
        device: Device,
        bucket_mb: usize,
    ) -> Self {
        let sizes: Vec<i64> = params.iter().map(|p| p.tensor.numel() as i64).collect();
        let offsets: Vec<i64> = sizes
            .iter()
            .scan(0i64, |at, &n| {
                let o = *at;
                *at += n;
                Some(o)
            })
            .collect();
        let total: i64 = sizes.iter().sum::<i64>() + EXTRA;
        let place = if comm.backend() == Backend::Nccl || !device.is_cuda() {
            device
        } else {
            Device::Cpu
        };
        let flat = Tensor::zeros([total], (Kind::Float, place));
        let views: Vec<Tensor> = params
            .iter()
            .zip(offsets.iter().zip(&sizes))
            .map(|(p, (&o, &n))| flat.narrow(0, o, n).view(p.tensor.size().as_slice()))
            .collect();
        let sync = GradSync {
            flat,
            offsets,
            sizes,
            views,
            same_device: place == device,
            bucket: (bucket_mb.max(1) << 20) / 4,
            seconds: 0.0,
        };
        if comm.size() > 1 && sync.same_device {
            sync.alias_grads(params);
        }
        sync
    }

    /// Makes every parameter's gradient a view into `flat` (defining zero gradients first).
    fn alias_grads(&self, params: &[Param]) {
        if params.iter().any(|p| !p.tensor.grad().defined()) {
            let zero: Tensor = params
                .iter()
                .map(|p| (&p.tensor * 0.0).sum(Kind::Float))
                .fold(
                    Tensor::zeros([], (Kind::Float, self.flat.device())),
                    |a, b| a + b,
                );
            zero.backward();
        }
        tch::no_grad(|| {
            for ((p, &o), view) in params.iter().zip(&self.offsets).zip(&self.views) {
                let mut g = p.tensor.grad();
                let _ =
                    g.set_source_tensor_storage_offset_(&self.flat, o, view.size(), view.stride());
            }
        });
    }

    /// Whether `param`'s gradient is the view of `flat` at `offset`.
    fn is_aliased(&self, param: &Tensor, offset: i64) -> bool {
        let g = param.grad();
        self.same_device
            && g.defined()
            && g.data_ptr() as usize == self.flat.data_ptr() as usize + 4 * offset as usize
    }

    /// Sums the gradients of `params`, `loss` (this rank's share of the global-batch mean,
    /// `None` for a rank without samples) and `stop` over all ranks. Returns the gradients, in
    /// parameter order, and the totals. With one rank nothing is copied.
    pub fn reduce(
        &mut self,
        params: &[Param],
        loss: Option<&Tensor>,
        stop: bool,
        comm: &dyn Communicator,
    ) -> anyhow::Result<(Vec<Tensor>, StepTotals)> {
        if comm.size() == 1 {
            let grads = params.iter().map(|p| defined_grad(&p.tensor)).collect();
            let loss = loss.map_or(Ok(0.0), f64::try_from)?;
            return Ok((grads, StepTotals { loss, stop }));
        }
        let total = self.flat.numel() as i64;
        tch::no_grad(|| {
            for ((p, &o), &n) in params.iter().zip(&self.offsets).zip(&self.sizes) {
                if self.is_aliased(&p.tensor, o) {
                    continue;
                }
                let g = p.tensor.grad();
                let mut slot = self.flat.narrow(0, o, n);
                if g.defined() {
                    slot.copy_(&g.reshape([-1]));
                } else {
                    let _ = slot.zero_();
                }
            }
            let mut slot = self.flat.narrow(0, total - EXTRA, 1);
            match loss {
                Some(l) => slot.copy_(&l.reshape([1])),
                None => {
                    let _ = slot.zero_();
                }
            }
            let _ = self
                .flat
                .narrow(0, total - EXTRA + 1, 1)
                .fill_(f64::from(u8::from(stop)));
        });
        let start = std::time::Instant::now();
        let mut at = 0i64;
        while at < total {
            let n = (self.bucket as i64).min(total - at);
            let mut piece = self.flat.narrow(0, at, n);
            comm.all_reduce_sum(&mut piece)
                .context("gradient all-reduce")?;
            at += n;
        }
        self.seconds += start.elapsed().as_secs_f64();
        let totals = Vec::<f32>::try_from(
            self.flat
                .narrow(0, total - EXTRA, EXTRA)
                .to_device(Device::Cpu),
        )?;
        let totals = StepTotals {
            loss: f64::from(totals[0]),
            stop: totals[1] > 0.0,
        };
        let grads = if self.same_device {
            self.views.iter().map(Tensor::shallow_clone).collect()
        } else {
            let device = params.first().map_or(Device::Cpu, |p| p.tensor.device());
            self.views.iter().map(|v| v.to_device(device)).collect()
        };
        Ok((grads, totals))
    }

    /// Number of f32 values in one step's all-reduce (gradients and step totals).
    pub fn len(&self) -> usize {
        self.flat.numel()
    }

    /// Whether there is nothing to reduce (never: the step totals are always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Seconds spent in gradient all-reduce calls since the last call.
    pub fn take_seconds(&mut self) -> f64 {
        std::mem::take(&mut self.seconds)
    }
}

fn defined_grad(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() { g } else { t.zeros_like() }
}

/// Makes every rank's BatchNorm running statistics the weighted average over ranks: each rank's
/// statistics count `weight` times (1 for the per-rank moving averages; the number of batches
/// it averaged for precise BN, possibly 0). Step counts become rank 0's.
pub fn average_bn_buffers(
    vs: &tch::nn::VarStore,
    comm: &dyn Communicator,
    weight: f64,
) -> anyhow::Result<()> {
    if comm.size() == 1 {
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
    comm.set_context("averaging BatchNorm statistics");
    comm.all_reduce_sum_f64(&mut total_weight)
        .context("averaging BatchNorm statistics")?;
    comm.all_reduce_sum_f32(&mut host)
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
    if comm.rank() == 0 {
        for t in &ints {
            bytes.extend_from_slice(&host_bytes(t));
        }
    }
    comm.broadcast_bytes(&mut bytes, 0)
        .context("sharing BatchNorm step counts")?;
    let mut offset = 0;
    tch::no_grad(|| {
        for t in &ints {
            let len = t.numel() * t.kind().elt_size_in_bytes();
            if let Some(chunk) = bytes.get(offset..offset + len) {
                let src = Tensor::from_data_size(chunk, &t.size(), t.kind()).to_device(t.device());
                t.shallow_clone().copy_(&src);
            }
            offset += len;
        }
    });
    crate::model::layers::forget_all_step_counts();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::share;

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
