//! The backbones (`--arch`): ResNet-50 v1 for large images and CIFAR-style ResNets for small
//! ones. A backbone maps images (N, C, H, W) to pooled features (N, F); the objective's head
//! (the objective module) sits on top.

pub mod cifar;
pub mod layers;
pub mod resnet50;
pub mod sync_bn;
pub mod tiny;

use tch::Tensor;

use tch::nn::{self, ModuleT};

use crate::choice::Choice;
use layers::Pass;

/// The architectures `--arch` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    ResNet50,
    /// CIFAR ResNet of depth 6n+2 (n basic blocks per stage), widths 16/32/64, or 32/64/128
    /// when `wide` (the reference's "wfc" variant).
    Cifar {
        depth: usize,
        wide: bool,
    },
    /// Three convolutions without BatchNorm (`tiny-cnn`).
    Tiny,
}

const fn cifar(depth: usize, wide: bool) -> Arch {
    Arch::Cifar { depth, wide }
}

impl Choice for Arch {
    const WHAT: &'static str = "architecture";
    const ALL: &'static [Arch] = &[
        Arch::ResNet50,
        cifar(8, false),
        cifar(20, false),
        cifar(32, false),
        cifar(56, false),
        cifar(110, false),
        cifar(110, true),
        Arch::Tiny,
    ];
    fn name(self) -> &'static str {
        match self {
            Arch::ResNet50 => "resnet50",
            Arch::Tiny => "tiny-cnn",
            Arch::Cifar {
                depth: 8,
                wide: false,
            } => "resnet8",
            Arch::Cifar {
                depth: 20,
                wide: false,
            } => "resnet20",
            Arch::Cifar {
                depth: 32,
                wide: false,
            } => "resnet32",
            Arch::Cifar {
                depth: 56,
                wide: false,
            } => "resnet56",
            Arch::Cifar {
                depth: 110,
                wide: false,
            } => "resnet110",
            Arch::Cifar {
                depth: 110,
                wide: true,
            } => "resnet110-wfc",
            Arch::Cifar { .. } => "resnet (unnamed depth)",
        }
    }
}

crate::choice_traits!(Arch);

impl Arch {
    /// The reference's L2 coefficient on conv and dense kernels (Keras `l2(lambda)`, gradient
    /// 2 lambda w): none for ResNet-50, 2e-4 for the CIFAR ResNets.
    pub fn kernel_l2(self) -> f64 {
        match self {
            Arch::ResNet50 | Arch::Tiny => 0.0,
            Arch::Cifar { .. } => 2e-4,
        }
    }
}

/// `t` (N, C, H, W) with the same values in channels-last memory order (strides of NHWC).
pub fn channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 || is_channels_last(t) {
        return t.shallow_clone();
    }
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-D tensor is laid out channels-last.
pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4
        && stride[1] == 1
        && stride[3] == size[1]
        && stride[2] == size[1] * size[3]
        && stride[0] == size[1] * size[2] * size[3]
}

/// Re-lays every 4-D variable of `vs` (the convolution kernels) out channels-last, in place:
/// the variables stay the same tensors (optimiser and gradient views keep working).
pub fn to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.dim() == 4 && !is_channels_last(&t) {
                let relaid = channels_last(&t);
                t.set_data(&relaid);
            }
        }
    });
}

/// `--conv-padding`: how the CIFAR ResNets pad their stride-2 3x3 convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPadding {
    /// TensorFlow's `padding='same'`, as the reference's Keras models: the total padding
    /// `max((ceil(n / s) - 1) s + k - n, 0)` is split with the odd pixel after, so an even input
    /// is padded 0 before and 1 after.
    Same,
    /// One pixel on every side (PyTorch's `padding=1`); what runs before this option had.
    Symmetric,
}

impl Choice for ConvPadding {
    const WHAT: &'static str = "convolution padding";
    const ALL: &'static [ConvPadding] = &[ConvPadding::Same, ConvPadding::Symmetric];
    fn name(self) -> &'static str {
        match self {
            ConvPadding::Same => "same",
            ConvPadding::Symmetric => "symmetric",
        }
    }
}

crate::choice_traits!(ConvPadding);

impl ConvPadding {
    /// (before, after) padding of a dimension of `n` for a kernel `k` at `stride`.
    pub fn split(self, n: i64, k: i64, stride: i64) -> (i64, i64) {
        match self {
            ConvPadding::Symmetric => (k / 2, k / 2),
            ConvPadding::Same => {
                let out = (n + stride - 1) / stride;
                let total = ((out - 1) * stride + k - n).max(0);
                (total / 2, total - total / 2)
            }
        }
    }
}

/// A built backbone.
#[derive(Debug)]
pub enum Backbone {
    ResNet50(resnet50::ResNet50),
    Cifar(cifar::CifarResNet),
    Tiny(tiny::TinyCnn),
}

impl Backbone {
    pub fn new(arch: Arch, p: &nn::Path, in_channels: i64, padding: ConvPadding) -> Self {
        match arch {
            Arch::ResNet50 => Backbone::ResNet50(resnet50::ResNet50::new(p, in_channels)),
            Arch::Tiny => Backbone::Tiny(tiny::TinyCnn::new(p, in_channels)),
            Arch::Cifar { depth, wide } => {
                let widths = if wide { [32, 64, 128] } else { [16, 32, 64] };
                Backbone::Cifar(cifar::CifarResNet::new(
                    p,
                    in_channels,
                    (depth - 2) / 6,
                    widths,
                    padding,
                ))
            }
        }
    }

    /// Width of the pooled features.
    pub fn out_dim(&self) -> i64 {
        match self {
            Backbone::ResNet50(_) => resnet50::RESNET50_FEATURES,
            Backbone::Cifar(m) => m.out_dim(),
            Backbone::Tiny(m) => m.out_dim(),
        }
    }
}

impl Backbone {
    /// Pooled features (N, F) of images (N, C, H, W); `pass` says how BatchNorm behaves.
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Tensor {
        match self {
            Backbone::ResNet50(m) => m.forward(xs, pass),
            Backbone::Cifar(m) => m.forward(xs, pass),
            Backbone::Tiny(m) => m.forward(xs),
        }
    }
}

impl ModuleT for Backbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward(xs, Pass::training(train))
    }
}
