//! Building blocks shared by the models: initialisers as the reference uses them, and a
//! BatchNorm whose running statistics are bias-corrected like TensorFlow's (see `BatchNorm`).

use tch::nn::{self, Init, ModuleT};
use tch::{Kind, Tensor};

/// Keras' BatchNormalization defaults: decay 0.99 (libtorch momentum 0.01), epsilon 1e-3.
pub const BN_DECAY: f64 = 0.99;
pub const BN_EPS: f64 = 1e-3;

/// Glorot (Xavier) uniform for a kernel of `fan_in` inputs and `fan_out` outputs.
pub fn glorot_uniform(fan_in: i64, fan_out: i64) -> Init {
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -limit,
        up: limit,
    }
}

/// Fills `t` with Keras' truncated he-normal: a normal cut at two standard deviations, drawn with
/// sigma sqrt(2 / fan_in) / 0.8796 so that the realised std is sqrt(2 / fan_in).
pub fn truncated_he_normal_(t: &mut Tensor, fan_in: i64) {
    let sigma = (2.0 / fan_in as f64).sqrt() / 0.879_625_8;
    tch::no_grad(|| {
        let mut z = Tensor::randn(t.size(), (Kind::Float, t.device()));
        // Redraw the values outside [-2, 2] until none is left (each round keeps 95%).
        loop {
            let outside = z.abs().gt(2.0);
            if !bool::try_from(outside.any()).unwrap_or(false) {
                break;
            }
            let fresh = Tensor::randn(t.size(), (Kind::Float, t.device()));
            z = z.where_self(&outside.logical_not(), &fresh);
        }
        t.copy_(&(z * sigma));
    });
}

/// How convolution kernels are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInit {
    /// Keras' truncated he-normal (ResNet-50 of keras-applications).
    TruncatedHeNormal,
    /// Glorot uniform (the CIFAR ResNets).
    GlorotUniform,
}

/// A bias-free conv (every conv here feeds a BatchNorm, which makes a bias inert).
pub fn conv2d(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    padding: i64,
    init: ConvInit,
) -> nn::Conv2D {
    let fan_in = c_in * k * k;
    let ws_init = match init {
        ConvInit::GlorotUniform => glorot_uniform(fan_in, c_out * k * k),
        ConvInit::TruncatedHeNormal => Init::Const(0.0),
    };
    let config = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init,
        ..Default::default()
    };
    let mut conv = nn::conv2d(p, c_in, c_out, k, config);
    if init == ConvInit::TruncatedHeNormal {
        truncated_he_normal_(&mut conv.ws, fan_in);
    }
    conv
}

/// A dense layer as Keras builds it: glorot-uniform kernel, zero bias.
pub fn linear(p: nn::Path, d_in: i64, d_out: i64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: glorot_uniform(d_in, d_out),
        bs_init: Some(Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, d_in, d_out, config)
}

/// How BatchNorm layers behave in one forward pass. Every forward takes one explicitly, so no
/// layer depends on state outside the network.
#[derive(Clone, Copy)]
pub enum Pass<'a> {
    /// Inference: normalise with the running statistics.
    Eval,
    /// Training: normalise with the batch's statistics and update the running ones.
    Train,
    /// Training with statistics over every rank's batch (`--sync-bn`), summed by `reducer`.
    TrainSynced(&'a dyn BatchStatsReducer),
    /// Training with statistics over `groups` contiguous groups of the batch, cut as ranks cut a
    /// global batch ("ghost" BatchNorm, `--bn-batch`). The running statistics move towards the
    /// mean of the groups' statistics: what averaging the running statistics of `groups` ranks
    /// gives, since the update is linear.
    TrainGhost { groups: usize },
    /// The `batch`-th batch (1-based) of a precise-BN pass ("precise BN", Wu & Johnson 2021):
    /// the running statistics become the plain average of the pass's batch statistics;
    /// parameters and update counts are untouched.
    PreciseStats { batch: i64 },
}

impl Pass<'_> {
    /// `Train` or `Eval`.
    pub fn training(train: bool) -> Pass<'static> {
        if train { Pass::Train } else { Pass::Eval }
    }

    /// Whether the layers use batch statistics (every pass but `Eval`).
    pub fn uses_batch_statistics(&self) -> bool {
        !matches!(self, Pass::Eval)
    }
}

/// Sums per-channel statistics over the ranks of a job, for synchronised BatchNorm. The
/// data-parallel part of training implements it over its communicator.
pub trait BatchStatsReducer {
    /// `packed` (a 1-D f32 tensor on the model's device) summed over all ranks, on the same
    /// device. A failure ends the job (a rank left out would hang every other rank).
    fn sum_over_ranks(&self, packed: &Tensor) -> Tensor;
    /// Images this rank's statistics are pooled over at this step (its group's shares of the
    /// global batch): known on the host, so the statistics need no count read back.
    fn pooled_images(&self) -> usize;
}

/// Batch normalisation with bias-corrected running statistics.
///
/// libtorch's running averages start at (0, 1) and move by 1% per step, so with the few steps
/// per epoch of a small dataset they never match the network (`docs/findings.md`: 15% instead of
/// 63% accuracy). TensorFlow, which the reference ran on, debiases the average by 1 - decay^t.
/// The same estimate results from updating with momentum (1 - decay) / (1 - decay^t) at update
/// t, which is what `forward` passes to libtorch. So `running_mean`/`running_var` always hold the
/// corrected values (torchvision-compatible), and `num_batches_tracked` holds t.
///
/// `num_batches_tracked` lives in host memory whatever the model's device: reading it for the
/// next momentum never waits for a GPU, and a checkpoint load or an average across ranks that
/// replaces it is seen at the next update without any cache to invalidate.
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNorm {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        BatchNorm {
            weight: p.var("weight", &[channels], Init::Const(1.0)),
            bias: p.var("bias", &[channels], Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            num_batches_tracked: p.add(
                "num_batches_tracked",
                Tensor::zeros([], (Kind::Int64, tch::Device::Cpu)),
                false,
            ),
        }
    }

    /// The momentum that makes update `t` (1-based) produce the debiased average.
    pub fn debiased_momentum(t: i64) -> f64 {
        (1.0 - BN_DECAY) / (1.0 - BN_DECAY.powi(t.clamp(1, i32::MAX as i64) as i32))
    }

    /// Counts one more training update and returns its debiased momentum.
    fn next_update_momentum(&self) -> f64 {
        let t = i64::try_from(&self.num_batches_tracked).unwrap_or(0).max(0) + 1;
        tch::no_grad(|| {
            let _ = self.num_batches_tracked.shallow_clone().fill_(t);
        });
        Self::debiased_momentum(t)
    }

    /// Normalises `xs` (N, C, ...) as `pass` says.
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Tensor {
        match pass {
            Pass::TrainSynced(reducer) => return self.forward_synchronised(xs, reducer),
            Pass::TrainGhost { groups } if groups > 1 => return self.forward_ghost(xs, groups),
            _ => {}
        }
        let train = pass.uses_batch_statistics();
        let channels = xs.size().get(1).copied().unwrap_or(1).max(1);
        if train && xs.numel() as i64 / channels <= 1 {
            // One value per channel (a batch of one sample reaching a BatchNorm over features,
            // e.g. a last batch of 1): the batch variance is undefined, and libtorch would write
            // NaN into the running variance. Normalise with the batch statistics (the output is
            // the bias), and leave running statistics and step count alone.
            return self.batch_statistics_only(xs);
        }
        let momentum = match pass {
            // The k-th batch of a precise pass enters the average with weight 1 / k.
            Pass::PreciseStats { batch } => 1.0 / batch.max(1) as f64,
            Pass::Train | Pass::TrainGhost { .. } => self.next_update_momentum(),
            Pass::Eval | Pass::TrainSynced(_) => 0.0,
        };
        xs.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            momentum,
            BN_EPS,
            true,
        )
    }

    /// Normalises with the batch's own statistics, leaving running statistics alone.
    fn batch_statistics_only(&self, xs: &Tensor) -> Tensor {
        xs.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.0,
            BN_EPS,
            true,
        )
    }

    /// Training-mode normalisation of each of `groups` parts of the batch with its own
    /// statistics; one running-statistics update with their mean.
    fn forward_ghost(&self, xs: &Tensor, groups: usize) -> Tensor {
        let n = xs.size().first().copied().unwrap_or(0).max(0) as usize;
        let sizes: Vec<i64> = (0..groups)
            .map(|g| crate::data::share(n, groups, g).len() as i64)
            .filter(|&len| len > 0)
            .collect();
        let channels = xs.size().get(1).copied().unwrap_or(1).max(1);
        let dims: Vec<i64> = (0..xs.dim() as i64).filter(|&d| d != 1).collect();
        let mut outputs = Vec::with_capacity(sizes.len());
        let mut stats: Option<(Tensor, Tensor)> = None;
        let mut counted = 0usize;
        for part in xs.split_with_sizes(sizes.as_slice(), 0) {
            outputs.push(self.batch_statistics_only(&part));
            // A part of one value per channel has no variance (as in `forward`).
            if part.numel() as i64 / channels <= 1 {
                continue;
            }
            let (mean, var) = tch::no_grad(|| {
                let x = part.detach().to_kind(Kind::Float);
                (
                    x.mean_dim(dims.as_slice(), false, Kind::Float),
                    x.var_dim(dims.as_slice(), true, false),
                )
            });
            stats = Some(match stats {
                None => (mean, var),
                Some((m, v)) => (m + mean, v + var),
            });
            counted += 1;
        }
        if let Some((mean_sum, var_sum)) = stats {
            let m = self.next_update_momentum();
            let k = counted as f64;
            tch::no_grad(|| {
                let mut mean = self.running_mean.shallow_clone();
                let mut var = self.running_var.shallow_clone();
                let _ = mean.g_mul_scalar_(1.0 - m);
                let _ = mean.g_add_(&(mean_sum * (m / k)).to_kind(mean.kind()));
                let _ = var.g_mul_scalar_(1.0 - m);
                let _ = var.g_add_(&(var_sum * (m / k)).to_kind(var.kind()));
            });
        }
        Tensor::cat(&outputs, 0)
    }

    /// Training-mode normalisation with statistics over the whole job's batch (`--sync-bn`).
    fn forward_synchronised(&self, xs: &Tensor, reducer: &dyn BatchStatsReducer) -> Tensor {
        let stats = super::sync_bn::global_statistics(xs, reducer);
        if stats.count > 1.0 {
            let m = self.next_update_momentum();
            let unbiased = stats.count / (stats.count - 1.0);
            tch::no_grad(|| {
                let mut mean = self.running_mean.shallow_clone();
                let mut var = self.running_var.shallow_clone();
                let _ = mean.g_mul_scalar_(1.0 - m);
                let _ = mean.g_add_(&(stats.mean.detach() * m));
                let _ = var.g_mul_scalar_(1.0 - m);
                let _ = var.g_add_(&(stats.var.detach() * (m * unbiased)));
            });
        }
        let shape = super::sync_bn::channel_shape(xs);
        let inv_std = (&stats.var + BN_EPS).rsqrt();
        (xs - stats.mean.view(shape.as_slice())) * (inv_std * &self.weight).view(shape.as_slice())
            + self.bias.view(shape.as_slice())
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward(xs, Pass::training(train))
    }
}
