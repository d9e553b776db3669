//! The fused gradient all-reduce: every step, all gradients (and the batch's loss and the stop
//! flag) are summed across ranks in one buffer, in as few calls as the bucket size allows. On
//! NCCL the sum is only queued on the GPU: the host waits for it when it reads the step totals
//! ([`super::step_totals`]), not every step.

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
    /// Views of `flat` shaped like the parameters, on the parameters' device when `flat` is.
    views: Vec<Tensor>,
    /// Whether `views` live on the parameters' device (else they are copied there each step).
    same_device: bool,
    /// Elements per all-reduce call.
    bucket: i64,
    /// Seconds spent in the all-reduce calls since the last `take_seconds`.
    seconds: f64,
}

/// Slots after the gradients: the global-batch loss, and how many ranks want to stop.
const EXTRA: i64 = 2;

impl GradSync {
    pub fn new(
        params: &[Param],
        comm: &dyn Communicator,
        device: Device,
        bucket_mb: usize,
    ) -> Self {
        let alone = comm.size() == 1;
        let place = if alone || comm.backend() == Backend::Nccl || !device.is_cuda() {
            device
        } else {
            Device::Cpu
        };
        // Alone, nothing is reduced: the buffer holds only the step totals.
        let sync = GradSync::laid_out(
            if alone { &[] } else { params },
            place,
            bucket_elements(comm.backend(), bucket_mb, i64::MAX),
        );
        let sync = GradSync {
            same_device: place == device,
            ..sync
        };
        if !alone && sync.same_device {
            sync.alias_grads(params);
        }
        sync
    }

    /// The buffer for the gradients of `params` and the step totals, on `place`.
    fn laid_out(params: &[Param], place: Device, bucket: i64) -> Self {
        let sizes: Vec<i64> = params.iter().map(|p| p.tensor.numel() as i64).collect();
        let offsets: Vec<i64> = sizes
            .iter()
            .scan(0i64, |at, &n| {
                let o = *at;
                *at += n;
                Some(o)
            })
            .collect();
        let total = sizes.iter().sum::<i64>() + EXTRA;
        let flat = Tensor::zeros([total], (Kind::Float, place));
        // Each view has its parameter's strides (channels-last kernels included), so that an
        // aliased gradient has the layout backward would give it.
        let views: Vec<Tensor> = params
            .iter()
            .zip(&offsets)
            .map(|(p, &o)| {
                let size = p.tensor.size();
                let stride = dense_strides(&size, &p.tensor.stride());
                flat.as_strided(size.as_slice(), stride.as_slice(), o)
            })
            .collect();
        GradSync {
            flat,
            offsets,
            views,
            same_device: true,
            bucket: bucket.clamp(1, total),
            seconds: 0.0,
        }
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
    /// parameter order, and the step totals: 2 values on the device, the global-batch loss and
    /// how many ranks asked to stop, valid until the next call. With one rank nothing is copied.
    /// On NCCL both may still be being summed: the device orders every later use after the sum,
    /// and [`GradSync::wait`] waits for it on the host.
    pub fn reduce(
        &mut self,
        params: &[Param],
        loss: Option<&Tensor>,
        stop: bool,
        comm: &dyn Communicator,
    ) -> anyhow::Result<(Vec<Tensor>, Tensor)> {
        let total = self.flat.numel() as i64;
        let totals = self.flat.narrow(0, total - EXTRA, EXTRA);
        tch::no_grad(|| {
            let mut slot = totals.narrow(0, 0, 1);
            match loss {
                Some(l) => slot.copy_(&l.reshape([1])),
                None => {
                    let _ = slot.zero_();
                }
            }
            let _ = totals.narrow(0, 1, 1).fill_(f64::from(u8::from(stop)));
        });
        if comm.size() == 1 {
            let grads = params.iter().map(|p| defined_grad(&p.tensor)).collect();
            return Ok((grads, totals));
        }
        tch::no_grad(|| {
            for ((p, &o), view) in params.iter().zip(&self.offsets).zip(&self.views) {
                if self.is_aliased(&p.tensor, o) {
                    continue;
                }
                let g = p.tensor.grad();
                let mut slot = view.shallow_clone();
                if g.defined() {
                    slot.copy_(&g);
                } else {
                    let _ = slot.zero_();
                }
            }
        });
        let start = std::time::Instant::now();
        let mut at = 0i64;
        while at < total {
            let n = self.bucket.min(total - at);
            let mut piece = self.flat.narrow(0, at, n);
            comm.all_reduce_sum_queued(&mut piece)
                .context("gradient all-reduce")?;
            at += n;
        }
        self.seconds += start.elapsed().as_secs_f64();
        let grads = if self.same_device {
            self.views.iter().map(Tensor::shallow_clone).collect()
        } else {
            let device = params.first().map_or(Device::Cpu, |p| p.tensor.device());
            self.views.iter().map(|v| v.to_device(device)).collect()
        };
        Ok((grads, totals))
    }

    /// Waits until the queued all-reduces are done (counted in the all-reduce seconds).
    pub fn wait(&mut self, comm: &dyn Communicator) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        comm.wait_queued().context("gradient all-reduce")?;
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
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

/// Elements per all-reduce call: MPI counts are C ints, so large buffers go in pieces of
/// `--bucket-mb`; NCCL counts are size_t, so it takes the whole buffer in one call (each call
/// is a launch).
fn bucket_elements(backend: Backend, bucket_mb: usize, total: i64) -> i64 {
    match backend {
        Backend::Nccl => total.max(1),
        _ => ((bucket_mb.max(1) << 20) / 4) as i64,
    }
}

/// `stride` when a tensor of `size` laid out so covers exactly `size`'s element count without
/// gaps or overlaps (contiguous, channels-last or any permutation of them); else the contiguous
/// strides.
fn dense_strides(size: &[i64], stride: &[i64]) -> Vec<i64> {
    let mut dims: Vec<(i64, i64)> = stride.iter().copied().zip(size.iter().copied()).collect();
    dims.sort_unstable();
    let mut expected = 1i64;
    let mut dense = stride.len() == size.len();
    for &(st, n) in &dims {
        if n == 1 {
            continue;
        }
        dense &= st == expected;
        expected *= n;
    }
    if dense {
        return stride.to_vec();
    }
    let mut contiguous = vec![1i64; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        contiguous[d] = contiguous[d + 1] * size[d + 1].max(1);
    }
    contiguous
}

fn defined_grad(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() { g } else { t.zeros_like() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_strides_keep_permuted_layouts_and_fix_gapped_ones() {
        // Contiguous and channels-last (N, C, H, W) = (4, 3, 2, 5).
        assert_eq!(
            dense_strides(&[4, 3, 2, 5], &[30, 10, 5, 1]),
            [30, 10, 5, 1]
        );
        assert_eq!(
            dense_strides(&[4, 3, 2, 5], &[30, 1, 15, 3]),
            [30, 1, 15, 3]
        );
        // Size-1 dimensions may have any stride.
        assert_eq!(dense_strides(&[4, 1, 1, 1], &[1, 1, 1, 1]), [1, 1, 1, 1]);
        // A gap (a slice of a wider tensor) or an overlap (a broadcast) falls back.
        assert_eq!(dense_strides(&[4, 3], &[6, 1]), [3, 1]);
        assert_eq!(dense_strides(&[4, 3], &[0, 1]), [3, 1]);
    }

    #[test]
    fn nccl_reduces_in_one_call_mpi_in_int_sized_pieces() {
        assert_eq!(bucket_elements(Backend::Nccl, 64, 25_000_000), 25_000_000);
        assert_eq!(bucket_elements(Backend::Mpi, 64, 25_000_000), 16 << 20);
        assert_eq!(bucket_elements(Backend::Mpi, 0, 10), 1 << 18);
    }

    /// A channels-last kernel's gradient, aliased into the flat buffer, keeps the kernel's
    /// strides, and backward writes it there in the kernel's memory order.
    #[test]
    fn aliased_gradients_have_their_parameters_strides() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let conv = tch::nn::conv2d(vs.root() / "conv", 3, 4, 3, Default::default());
        crate::model::to_channels_last(&vs);
        let sgd = crate::optim::Sgd::new(&vs, 0.9, None, |_, _| 0.0);
        let sync = GradSync::laid_out(&sgd.params, Device::Cpu, 1 << 20);
        sync.alias_grads(&sgd.params);
        let input = Tensor::randn([2, 3, 6, 6], (Kind::Float, Device::Cpu));
        tch::nn::Module::forward(&conv, &input)
            .pow_tensor_scalar(2)
            .sum(Kind::Float)
            .backward();
        for (p, &o) in sgd.params.iter().zip(&sync.offsets) {
            let g = p.tensor.grad();
            assert_eq!(g.stride(), p.tensor.stride(), "{}", p.name);
            assert!(sync.is_aliased(&p.tensor, o), "{}", p.name);
            let in_flat = sync.flat.narrow(0, o, p.tensor.numel() as i64);
            let expected = g.permute(memory_order(&g.stride())).reshape([-1]);
            assert!(in_flat.equal(&expected), "{}", p.name);
        }
        let kernel = sgd.params.iter().find(|p| p.tensor.dim() == 4).unwrap();
        assert!(crate::model::is_channels_last(&kernel.tensor.grad()));
    }

    /// The dimensions from the largest stride to the smallest.
    fn memory_order(stride: &[i64]) -> Vec<i64> {
        let mut dims: Vec<i64> = (0..stride.len() as i64).collect();
        dims.sort_by_key(|&d| std::cmp::Reverse(stride[d as usize]));
        dims
    }
}
