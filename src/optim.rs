//! SGD in the reference's (Keras) form, with per-parameter L2 and a global-norm gradient clip.
//!
//! Keras keeps an lr-scaled velocity: `v = 0.9 v - lr g; p = p + v`. This differs from PyTorch's
//! `buf = 0.9 buf + g; p = p - lr buf` whenever the learning rate changes, which SGDR does every
//! epoch and most of all at restarts. L2 enters the gradient (2 lambda w, Keras' regulariser
//! inside the loss) before the clip, as in the reference.

use tch::{Kind, Tensor};

use crate::libtorch_shim::{self as foreach, ShimError};

/// One optimised tensor.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub velocity: Tensor,
    /// Keras L2 coefficient lambda (the gradient gains 2 lambda w).
    pub l2: f64,
}

#[derive(Debug)]
pub struct Sgd {
    pub params: Vec<Param>,
    pub momentum: f64,
    /// Global L2-norm limit of the gradient; `None` disables clipping.
    pub clip_norm: Option<f64>,
    /// Where the clip factor is computed: on the host from the norm read back (exact in f64,
    /// one synchronisation per step) or on the parameters' device (on CUDA: no wait).
    pub clip_on_device: bool,
}

impl Sgd {
    /// Optimises the trainable variables of `vs`, sorted by name; `l2_of(name, tensor)` gives
    /// each one's L2 coefficient.
    pub fn new(
        vs: &tch::nn::VarStore,
        momentum: f64,
        clip_norm: Option<f64>,
        l2_of: impl Fn(&str, &Tensor) -> f64,
    ) -> Self {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params: Vec<Param> = named
            .into_iter()
            .map(|(name, tensor)| Param {
                l2: l2_of(&name, &tensor),
                velocity: tensor.zeros_like(),
                name,
                tensor,
            })
            .collect();
        let clip_on_device = params.first().is_some_and(|p| p.tensor.device().is_cuda());
        Sgd {
            params,
            momentum,
            clip_norm,
            clip_on_device,
        }
    }

    /// Zeroes every defined gradient, in one multi-tensor op. (Gradients here never have a
    /// graph of their own, so unlike PyTorch's `zero_grad` nothing is detached first: that
    /// would be one more dispatched operator per parameter.)
    pub fn zero_grad(&mut self) -> Result<(), ShimError> {
        let grads: Vec<Tensor> = (self.params.iter())
            .map(|p| p.tensor.grad())
            .filter(Tensor::defined)
            .collect();
        foreach::zero_(&grads)
    }

    /// Leaves every parameter without a gradient: backward then stores the next gradients
    /// instead of adding them to zeros (one operator fewer per parameter, and no zeroing). Only
    /// where nothing holds the gradients' memory: not with gradients aliased into an
    /// all-reduce buffer.
    pub fn clear_grads(&mut self) -> Result<(), ShimError> {
        let params: Vec<Tensor> = (self.params.iter())
            .map(|p| p.tensor.shallow_clone())
            .collect();
        foreach::clear_grads(&params)
    }

    /// The parameters' own gradients (undefined ones as zeros).
    fn own_grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                if g.defined() {
                    g
                } else {
                    p.tensor.zeros_like()
                }
            })
            .collect()
    }

    /// One update at learning rate `lr` from the parameters' own gradients. Returns the global
    /// gradient norm before clipping (a 0-dim tensor on the parameters' device) when clipping.
    pub fn step(&mut self, lr: f64) -> Result<Option<Tensor>, ShimError> {
        let grads = self.own_grads();
        self.step_with(lr, grads)
    }

    /// One update at learning rate `lr` from `grads` (one per parameter, in order; e.g. summed
    /// across ranks), which it consumes: they are scaled in place. L2 is added, then the
    /// global norm is clipped. Returns the norm before clipping (not computed without a
    /// limit), as a 0-dim tensor on the parameters' device (reading it is a synchronisation
    /// only where the caller wants the number). Each phase is one multi-tensor op over all
    /// parameters (a handful of kernel launches per step on CUDA instead of four per
    /// parameter), computing exactly what the per-parameter expressions in the comments
    /// compute.
    pub fn step_with(&mut self, lr: f64, grads: Vec<Tensor>) -> Result<Option<Tensor>, ShimError> {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        tch::no_grad(|| {
            let mut grads = grads;
            // g = g + w * (2 lambda), for the parameters with L2.
            let decayed: Vec<usize> = (0..self.params.len())
                .filter(|&i| self.params[i].l2 > 0.0)
                .collect();
            if !decayed.is_empty() {
                let weights: Vec<Tensor> = (decayed.iter())
                    .map(|&i| self.params[i].tensor.shallow_clone())
                    .collect();
                let coefficients: Vec<f64> =
                    (decayed.iter()).map(|&i| 2.0 * self.params[i].l2).collect();
                let own: Vec<Tensor> = decayed.iter().map(|&i| grads[i].shallow_clone()).collect();
                let sums = foreach::add(&own, &foreach::mul_scalars(&weights, &coefficients)?)?;
                for (&i, g) in decayed.iter().zip(sums) {
                    grads[i] = g;
                }
            }
            // The global norm, only where it is clipped: on the device one multi-tensor norm
            // (a launch per group of tensors), on the host a sum of each tensor's squares.
            let norm = match self.clip_norm {
                None => None,
                Some(_) if self.clip_on_device => {
                    Some(Tensor::stack(&foreach::norms(&grads)?, 0).norm())
                }
                Some(_) => {
                    let squares: Vec<Tensor> = (grads.iter())
                        .map(|g| g.pow_tensor_scalar(2).sum(Kind::Float))
                        .collect();
                    Some(Tensor::stack(&squares, 0).sum(Kind::Float).sqrt())
                }
            };
            // g = g * (lr scale), in place: one pass over the gradients, no copy of them.
            match (&norm, self.clip_norm) {
                (Some(norm), Some(limit)) if self.clip_on_device => {
                    // scale = limit / max(norm, limit): exactly 1 below the limit (limit /
                    // limit), and 1 for a NaN norm, as on the host.
                    let limit_t = Tensor::full([] as [i64; 0], limit, (Kind::Float, norm.device()));
                    let scale = (limit_t / norm.clamp_min(limit)).nan_to_num(1.0, None, None);
                    foreach::mul_tensor_(&grads, &(scale * lr))?;
                }
                (Some(norm), Some(limit)) => {
                    let host_norm = f64::try_from(norm).unwrap_or(f64::NAN);
                    let scale = if host_norm >= limit {
                        limit / host_norm
                    } else {
                        1.0
                    };
                    foreach::mul_scalar_(&grads, lr * scale)?;
                }
                _ => foreach::mul_scalar_(&grads, lr)?,
            }
            // v = v * momentum; v = v - g; w = w + v.
            let velocities: Vec<Tensor> = (self.params.iter())
                .map(|p| p.velocity.shallow_clone())
                .collect();
            let weights: Vec<Tensor> = (self.params.iter())
                .map(|p| p.tensor.shallow_clone())
                .collect();
            foreach::mul_scalar_(&velocities, self.momentum)?;
            foreach::sub_(&velocities, &grads)?;
            foreach::add_(&weights, &velocities)?;
            Ok(norm)
        })
    }
}
