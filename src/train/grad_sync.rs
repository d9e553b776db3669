//! The fused gradient all-reduce: every step, all gradients (and the batch's loss and the stop
//! flag) are summed across ranks in one buffer, in as few calls as the bucket size allows.

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::dist::{Backend, Communicator};
use crate::optim::Param;

/// The flat gradient buffer and its all-reduce.
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
