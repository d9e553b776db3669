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

/// Batch normalisation with bias-corrected running statistics.
///
/// libtorch's running averages start at (0, 1) and move by 1% per step, so with the few steps
/// per epoch of a small dataset they never match the network (`shared/docs/findings.md`: 15%
/// instead of 63% accuracy). TensorFlow, which the reference ran on, debiases the average by
/// 1 - decay^t. The same estimate results from updating with momentum (1 - decay) / (1 - decay^t)
/// at update t, which is what `forward_t` passes to libtorch. So `running_mean`/`running_var`
/// always hold the corrected values (torchvision-compatible), and `num_batches_tracked` holds t.
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    /// Host copy of `num_batches_tracked` (reading the tensor every step would synchronise a
    /// GPU); `None` until first read, and after `forget_step_count` (e.g. a checkpoint load).
    steps: std::cell::Cell<Option<i64>>,
    /// Value of `STEP_COUNT_GENERATION` when `steps` was cached.
    steps_generation: std::cell::Cell<u64>,
    /// Precise-BN pass this layer last took part in, and how many batches it has averaged.
    precise: std::cell::Cell<(u64, i64)>,
}

/// Bumped by [`forget_all_step_counts`]: every BatchNorm re-reads its buffer on next use.
static STEP_COUNT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes every BatchNorm re-read `num_batches_tracked` on its next update (after the buffers
/// were replaced wholesale: a checkpoint load, an average across ranks).
pub fn forget_all_step_counts() {
    STEP_COUNT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    /// Non-zero while `with_precise_bn` runs: the pass's number.
    static PRECISE_PASS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static PRECISE_PASSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `f` (forward passes in training mode over training data) with every BatchNorm replacing
/// its running statistics by the plain average of the batch statistics it sees ("precise BN",
/// Wu & Johnson 2021). Parameters and update counts are untouched.
pub fn with_precise_bn<T>(f: impl FnOnce() -> T) -> T {
    let pass = PRECISE_PASSES.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    PRECISE_PASS.with(|p| p.set(pass));
    let out = f();
    PRECISE_PASS.with(|p| p.set(0));
    out
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
                Tensor::zeros([], (Kind::Int64, p.device())),
                false,
            ),
            steps: std::cell::Cell::new(Some(0)),
            steps_generation: std::cell::Cell::new(
                STEP_COUNT_GENERATION.load(std::sync::atomic::Ordering::Relaxed),
            ),
            precise: std::cell::Cell::new((0, 0)),
        }
    }

    /// Re-reads the update count from the buffer on next use (after its value was replaced).
    pub fn forget_step_count(&self) {
        self.steps.set(None);
    }

    /// The momentum that makes update `t` (1-based) produce the debiased average.
    pub fn debiased_momentum(t: i64) -> f64 {
        (1.0 - BN_DECAY) / (1.0 - BN_DECAY.powi(t.clamp(1, i32::MAX as i64) as i32))
    }
}

impl BatchNorm {
    /// Counts one more training update and returns its debiased momentum.
    fn next_update_momentum(&self) -> f64 {
        let generation = STEP_COUNT_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
        if self.steps_generation.get() != generation {
            self.steps_generation.set(generation);
            self.steps.set(None);
        }
        let done = self
            .steps
            .get()
            .unwrap_or_else(|| i64::try_from(&self.num_batches_tracked).unwrap_or(0));
        let t = done + 1;
        self.steps.set(Some(t));
        tch::no_grad(|| {
            let _ = self.num_batches_tracked.shallow_clone().fill_(t);
        });
        Self::debiased_momentum(t)
    }

    /// Training-mode normalisation with statistics over the whole job's batch (`--sync-bn`).
    fn forward_synchronised(&self, xs: &Tensor, sync: &super::sync_bn::SyncContext) -> Tensor {
        let stats = sync.global_statistics(xs);
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
        let pass = PRECISE_PASS.with(|p| p.get());
        if train
            && pass == 0
            && let Some(sync) = super::sync_bn::active()
        {
            return self.forward_synchronised(xs, &sync);
        }
        let channels = xs.size().get(1).copied().unwrap_or(1).max(1);
        if train && xs.numel() as i64 / channels <= 1 {
            // One value per channel (a batch of one sample reaching a BatchNorm over features,
            // e.g. a last batch of 1): the batch variance is undefined, and libtorch would write
            // NaN into the running variance. Normalise with the batch statistics (the output is
            // the bias), and leave running statistics and step count alone.
            return xs.batch_norm(
                Some(&self.weight),
                Some(&self.bias),
                None::<&Tensor>,
                None::<&Tensor>,
                true,
                0.0,
                BN_EPS,
                true,
            );
        }
        let momentum = if train && pass != 0 {
            // The k-th batch of a precise pass enters the average with weight 1 / k.
            let (seen_pass, count) = self.precise.get();
            let k = if seen_pass == pass { count + 1 } else { 1 };
            self.precise.set((pass, k));
            1.0 / k as f64
        } else if train {
            self.next_update_momentum()
        } else {
            0.0
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
}
