//! Every default of a run, defined once: the values a run gets when neither the command line nor
//! a preset sets them, and the augmentation each dataset source gets (reference-spec 3.1, 3.4).

use datasets_prep::sources::Source;

use crate::data::augment::AugmentConfig;
use crate::model::Arch;
use crate::objective::LossKind;
use crate::schedule::sgdr_epochs;

pub const ARCH: Arch = Arch::Cifar {
    depth: 20,
    wide: false,
};
pub const LOSS: LossKind = LossKind::Cosine;
/// Label smoothing of `ce-ls` (the reference's 0.1, spread as ls / (C - 1)).
pub const LABEL_SMOOTHING: f64 = 0.1;
/// Weight of the cross-entropy head in `cosine-ce` (the reference's 0.1).
pub const CLS_WEIGHT: f64 = 0.1;
/// SGD momentum (the reference's 0.9, Keras form).
pub const MOMENTUM: f64 = 0.9;
/// Maximum learning rate without a preset or `--lr-max`: 0.1, and 0.5 for cosine-ce, whose
/// cross-entropy head enters the loss with weight 0.1 (the paper's and the demo's best rates for
/// cosine-ce are 5 to 10 times cross-entropy's). Measured, 3 epochs of Fashion-MNIST with 100
/// images per class, resnet20, otherwise defaults: ce 66.8%, ce-ls 66.2%, cosine 52.7%,
/// cosine-ce 60.0% (42.7% at 0.1).
pub fn lr_max_for(loss: LossKind) -> f64 {
    match loss {
        LossKind::CosineCe => 0.5,
        _ => 0.1,
    }
}
pub const LR_MIN: f64 = 1e-6;
/// SGDR: the first cycle's length in epochs and the growth factor (reference-spec 4.3).
pub const SGDR_BASE: usize = 12;
pub const SGDR_MUL: usize = 2;
/// SGDR cycles of a run without a preset or `--epochs` (12 + 24 = 36 epochs).
pub const CYCLES: usize = 2;
/// The paper's runs: 5 SGDR cycles, 12 + 24 + 48 + 96 + 192 = 372 epochs.
pub const PAPER_CYCLES: usize = 5;
pub const PAPER_EPOCHS: usize = sgdr_epochs(SGDR_BASE, SGDR_MUL, PAPER_CYCLES);
/// Global batch size.
pub const BATCH_SIZE: usize = 100;
/// Global gradient-norm clip (the reference's 10).
pub const CLIP_NORM: f64 = 10.0;
pub const SEED: u64 = 0;
pub const EVAL_EVERY: usize = 1;

/// The augmentation of training images for data packed from `source` (`None`: a source this
/// program does not know, treated as a folder of photos).
pub fn augment_for(source: Option<&Source>) -> AugmentConfig {
    let large = |crop| AugmentConfig {
        crop: Some(crop),
        hflip: true,
        erase_prob: 0.5,
        shift: 0.0,
        rrc_scale: None,
    };
    match source {
        Some(Source::Cub | Source::CubSub(_) | Source::Nab | Source::Cars | Source::Flowers) => {
            large(448)
        }
        Some(Source::Mit67) => large(224),
        Some(Source::Cifar10 | Source::Cifar100) => AugmentConfig {
            crop: None,
            hflip: true,
            erase_prob: 0.0,
            shift: 0.15,
            rrc_scale: None,
        },
        // Digits and clothes: shifts, but no flips (a flipped digit is another symbol).
        Some(Source::Idx | Source::Mnist | Source::FashionMnist | Source::Kmnist) => {
            AugmentConfig {
                crop: None,
                hflip: false,
                erase_prob: 0.0,
                shift: 0.15,
                rrc_scale: None,
            }
        }
        Some(Source::Folder) | None => AugmentConfig {
            crop: None,
            hflip: true,
            erase_prob: 0.0,
            shift: 0.0,
            rrc_scale: None,
        },
    }
}

/// The most passes over the training list per epoch (`--train-repeats`).
pub const MAX_TRAIN_REPEATS: usize = 1000;

/// The largest `--crop` (libtorch would fail deep inside on absurd sizes).
pub const MAX_CROP: u32 = 4096;

/// Below this many optimiser steps a run evaluates with precise BatchNorm statistics by
/// default: the moving average (momentum 0.01, bias-corrected) lags a network that is still
/// changing fast. Measured on Fashion-MNIST: 20 images per class, 36 epochs (72 steps), resnet20:
/// 53.3% with ema, 60.5% precise; 10 per class, 400 steps, cosine: 61.0% vs 69.5%. The paper's
/// protocols (CUB: ~23,000 steps; CIFAR-100: ~186,000) stay on the reference's ema.
pub const PRECISE_BN_BELOW_STEPS: u64 = 10_000;

/// The default BatchNorm statistics for a run of `steps` optimiser steps.
pub fn bn_stats_for(steps: u64) -> super::BnStats {
    if steps < PRECISE_BN_BELOW_STEPS {
        super::BnStats::Precise
    } else {
        super::BnStats::Ema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_trains_372_epochs() {
        assert_eq!(PAPER_EPOCHS, 372);
        assert_eq!(sgdr_epochs(SGDR_BASE, SGDR_MUL, CYCLES), 36);
    }
}
