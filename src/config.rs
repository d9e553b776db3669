//! The run configuration: resolved once from a preset and the command line, written to
//! `config.json`, and the only input of a run besides the data.

use serde::{Deserialize, Serialize};

use crate::data::augment::AugmentConfig;
use crate::model::Arch;
use crate::objective::{LossKind, ObjectiveConfig};
use crate::schedule::Schedule;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub data: String,
    pub arch: Arch,
    pub objective: ObjectiveConfig,
    /// `onehot` or the path of a class-embedding file.
    pub embedding: String,
    pub schedule: Schedule,
    pub epochs: usize,
    /// Global batch size (split across ranks in distributed runs).
    pub batch_size: usize,
    pub momentum: f64,
    pub clip_norm: Option<f64>,
    pub augment: AugmentConfig,
    /// Evaluate on the test split every this many epochs (and after the last).
    pub eval_every: usize,
    /// BatchNorm statistics used for evaluation: `ema` (the reference's bias-corrected moving
    /// average) or `precise` (recomputed over the training images before each evaluation).
    pub bn_stats: String,
    /// A class hierarchy for the hierarchical accuracy (mean of 1 - h(LCS(pred, true)) / H).
    #[serde(default)]
    pub hierarchy: Option<String>,
    #[serde(default)]
    pub hierarchy_is_a: bool,
    pub seed: u64,
    pub device: String,
    pub precision: String,
    /// BatchNorm statistics over the whole job's batch in training (multi-rank runs).
    #[serde(default)]
    pub sync_bn: bool,
}

/// A paper protocol (reference-spec 3.2, 4.2-4.5) for one dataset.
struct PaperDataset {
    name: &'static str,
    arch: Arch,
    crop: Option<u32>,
    batch: usize,
    /// Best max learning rate for ce, ce-ls, cosine, cosine-ce (reference-spec 4.5).
    lr: [f64; 4],
}

const PAPER: [PaperDataset; 6] = [
    PaperDataset {
        name: "cub",
        arch: Arch::ResNet50,
        crop: Some(448),
        batch: 96,
        lr: [0.05, 0.05, 0.5, 0.5],
    },
    PaperDataset {
        name: "nab",
        arch: Arch::ResNet50,
        crop: Some(448),
        batch: 96,
        lr: [0.05, 0.1, 0.5, 0.5],
    },
    PaperDataset {
        name: "cars",
        arch: Arch::ResNet50,
        crop: Some(448),
        batch: 96,
        lr: [1.0, 1.0, 1.0, 0.5],
    },
    PaperDataset {
        name: "flowers",
        arch: Arch::ResNet50,
        crop: Some(448),
        batch: 96,
        lr: [1.0, 0.1, 0.5, 0.5],
    },
    PaperDataset {
        name: "mit67",
        arch: Arch::ResNet50,
        crop: Some(224),
        batch: 96,
        lr: [0.05, 1.0, 2.5, 2.5],
    },
    PaperDataset {
        name: "cifar100",
        arch: Arch::Cifar {
            depth: 110,
            wide: true,
        },
        crop: None,
        batch: 100,
        lr: [0.1, 0.1, 0.05, 0.1],
    },
];

/// Every preset name, for help and errors.
pub fn preset_names() -> Vec<String> {
    PAPER
        .iter()
        .flat_map(|d| {
            ["ce", "ce-ls", "cosine", "cosine-ce"].map(|l| format!("paper-{}-{l}", d.name))
        })
        .collect()
}

/// What a preset sets; every field can be overridden on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub arch: Arch,
    pub loss: LossKind,
    pub lr_max: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub augment: AugmentConfig,
}

pub fn preset(name: &str) -> Result<Preset, String> {
    let unknown = || {
        format!(
            "unknown preset '{name}': expected one of {}",
            preset_names().join(", ")
        )
    };
    let rest = name.strip_prefix("paper-").ok_or_else(unknown)?;
    let (dataset, loss) = rest.split_once('-').ok_or_else(unknown)?;
    let d = PAPER
        .iter()
        .find(|d| d.name == dataset)
        .ok_or_else(unknown)?;
    let loss: LossKind = loss.parse().map_err(|_| unknown())?;
    let k = match loss {
        LossKind::Ce => 0,
        LossKind::CeLs => 1,
        LossKind::Cosine => 2,
        LossKind::CosineCe => 3,
    };
    let augment = match d.crop {
        Some(c) => AugmentConfig {
            crop: Some(c),
            hflip: true,
            erase_prob: 0.5,
            shift: 0.0,
        },
        None => AugmentConfig {
            crop: None,
            hflip: true,
            erase_prob: 0.0,
            shift: 0.15,
        },
    };
    Ok(Preset {
        arch: d.arch,
        loss,
        lr_max: d.lr[k],
        batch_size: d.batch,
        epochs: 372,
        augment,
    })
}

/// The augmentation a dataset gets when neither a preset nor flags say otherwise, from the
/// source it was packed from.
pub fn default_augment(source: &str) -> AugmentConfig {
    let large = |crop| AugmentConfig {
        crop: Some(crop),
        hflip: true,
        erase_prob: 0.5,
        shift: 0.0,
    };
    match source.split(':').next().unwrap_or("") {
        "cub" | "cub-sub" | "nab" | "cars" | "flowers" => large(448),
        "mit67" => large(224),
        "cifar10" | "cifar100" => AugmentConfig {
            crop: None,
            hflip: true,
            erase_prob: 0.0,
            shift: 0.15,
        },
        // Digits and clothes: shifts, but no flips (a flipped digit is another symbol).
        "idx" => AugmentConfig {
            crop: None,
            hflip: false,
            erase_prob: 0.0,
            shift: 0.15,
        },
        _ => AugmentConfig {
            crop: None,
            hflip: true,
            erase_prob: 0.0,
            shift: 0.0,
        },
    }
}

/// Resolves the command line into a configuration: preset first, explicit flags over it.
pub fn resolve(args: &crate::cli::TrainArgs, source: &str) -> anyhow::Result<RunConfig> {
    use anyhow::bail;
    let preset = args
        .preset
        .as_deref()
        .map(preset)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let arch: Arch = match (&args.arch, &preset) {
        (Some(a), _) => a.parse().map_err(anyhow::Error::msg)?,
        (None, Some(p)) => p.arch,
        (None, None) => Arch::Cifar {
            depth: 20,
            wide: false,
        },
    };
    let loss: LossKind = match (&args.loss, &preset) {
        (Some(l), _) => l.parse().map_err(anyhow::Error::msg)?,
        (None, Some(p)) => p.loss,
        (None, None) => LossKind::Cosine,
    };
    let lr_max = args
        .lr_max
        .or(preset.as_ref().map(|p| p.lr_max))
        .unwrap_or(0.1);
    if !(lr_max > 0.0 && lr_max.is_finite()) || args.lr_min < 0.0 || args.lr_min > lr_max {
        bail!(
            "--lr-max {lr_max} / --lr-min {}: expected 0 <= lr-min <= lr-max, lr-max > 0",
            args.lr_min
        );
    }
    let schedule = match args.schedule.as_str() {
        "sgdr" => Schedule::Sgdr {
            max_lr: lr_max,
            min_lr: args.lr_min,
            base: args.sgdr_base.max(1),
            mul: args.sgdr_mul.max(1),
        },
        "cosine-steps" => Schedule::CosineSteps {
            max_lr: lr_max,
            min_lr: args.lr_min,
        },
        other => bail!("unknown --schedule '{other}': expected sgdr or cosine-steps"),
    };
    let epochs = args
        .epochs
        .or(preset.as_ref().map(|p| p.epochs))
        .unwrap_or_else(|| {
            crate::schedule::sgdr_epochs(args.sgdr_base.max(1), args.sgdr_mul.max(1), 2)
        });
    let batch_size = args
        .batch_size
        .or(preset.as_ref().map(|p| p.batch_size))
        .unwrap_or(100);
    if epochs == 0 || batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1");
    }
    if !(0.0..1.0).contains(&args.label_smoothing) {
        bail!(
            "--label-smoothing {}: expected 0 <= ls < 1",
            args.label_smoothing
        );
    }
    let mut augment = preset
        .as_ref()
        .map(|p| p.augment.clone())
        .unwrap_or_else(|| default_augment(source));
    if let Some(c) = args.crop {
        augment.crop = (c > 0).then_some(c);
    }
    if let Some(f) = args.flip {
        augment.hflip = f;
    }
    if let Some(p) = args.erase_prob {
        if !(0.0..=1.0).contains(&p) {
            bail!("--erase-prob {p}: expected a probability in 0..=1");
        }
        augment.erase_prob = p;
    }
    if let Some(s) = args.shift {
        if !(0.0..0.5).contains(&s) {
            bail!("--shift {s}: expected a fraction in 0..0.5");
        }
        augment.shift = s;
    }
    Ok(RunConfig {
        data: args.data.display().to_string(),
        arch,
        objective: ObjectiveConfig {
            loss,
            label_smoothing: args.label_smoothing,
            cls_weight: args.cls_weight,
            keras_ce_clip: args.ce_clip,
        },
        embedding: args.embedding.clone(),
        schedule,
        epochs,
        batch_size,
        momentum: 0.9,
        clip_norm: (args.clip_norm > 0.0).then_some(args.clip_norm),
        augment,
        eval_every: args.eval_every.max(1),
        bn_stats: args.bn_stats.clone(),
        hierarchy: args.hierarchy.as_ref().map(|p| p.display().to_string()),
        hierarchy_is_a: args.hierarchy_is_a,
        seed: args.seed,
        device: args.device.to_string(),
        precision: args.precision.clone(),
        sync_bn: args.sync_bn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_carry_the_papers_best_rates() {
        let p = preset("paper-cub-cosine").unwrap();
        assert_eq!(
            (p.arch, p.loss, p.lr_max, p.batch_size, p.epochs),
            (Arch::ResNet50, LossKind::Cosine, 0.5, 96, 372)
        );
        assert_eq!(p.augment.crop, Some(448));
        assert_eq!(preset("paper-mit67-ce-ls").unwrap().lr_max, 1.0);
        assert_eq!(
            preset("paper-cifar100-cosine").unwrap().arch,
            Arch::Cifar {
                depth: 110,
                wide: true
            }
        );
        let err = preset("paper-imagenet-ce").unwrap_err();
        assert!(err.contains("paper-cub-cosine-ce"), "{err}");
        assert_eq!(preset_names().len(), 24);
    }
}
