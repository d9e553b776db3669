//! Presets, each setting every value its protocol depends on:
//! - `paper-DATASET-LOSS`, the paper's protocols (reference-spec 3.2 and 4.2-4.5): per dataset
//!   the architecture, batch and best learning rate of each objective; 372 epochs, the dataset's
//!   augmentation, and for ResNet-50 BatchNorm statistics over 24 images (4 GPUs x 24).
//! - `paper-cub-subX-LOSS`, the CUB sub-sampling curve (reference-spec 3.5): X training images
//!   per class, `30 // X` passes per epoch, otherwise CUB's protocol.
//! - `gem-DATASET-LOSS`, the tuned cross-entropy baseline's recipe of the data-efficient
//!   benchmark (Brigato, Barz, Iocchi, Denzler 2021): ResNet-50 at 224 pixels, random-resized
//!   crops (scale 0.4-1) and flips, SGD with momentum 0.9 and weight decay, a cosine schedule
//!   over 200 epochs. Learning rate, batch and weight decay are starting points: the recipe
//!   tunes them on a validation split (`--val-per-class`, a sweep over `--lr-max`).

use std::fmt;
use std::str::FromStr;

use datasets_prep::sources::Source;

use super::defaults;
use crate::choice::Choice;
use crate::data::augment::AugmentConfig;
use crate::model::Arch;
use crate::objective::LossKind;
use crate::schedule::ScheduleKind;

/// One dataset of the paper's Table 2.
struct PaperDataset {
    name: &'static str,
    /// The `datasets-prep` source its data is packed from.
    source: Source,
    arch: Arch,
    batch: usize,
    /// Best max learning rate for ce, ce-ls, cosine, cosine-ce (reference-spec 4.5).
    lr: [f64; 4],
    /// The paper's Table 2 test top-1 in % for ce, ce-ls, cosine, cosine-ce.
    top1: [f64; 4],
}

const PAPER: [PaperDataset; 6] = [
    PaperDataset {
        name: "cub",
        source: Source::Cub,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [0.05, 0.05, 0.5, 0.5],
        top1: [51.9, 55.9, 67.6, 68.0],
    },
    PaperDataset {
        name: "nab",
        source: Source::Nab,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [0.05, 0.1, 0.5, 0.5],
        top1: [59.4, 68.3, 71.7, 71.9],
    },
    PaperDataset {
        name: "cars",
        source: Source::Cars,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [1.0, 1.0, 1.0, 0.5],
        top1: [78.2, 78.1, 84.3, 85.0],
    },
    PaperDataset {
        name: "flowers",
        source: Source::Flowers,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [1.0, 0.1, 0.5, 0.5],
        top1: [67.3, 66.8, 71.1, 70.6],
    },
    PaperDataset {
        name: "mit67",
        source: Source::Mit67,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [0.05, 1.0, 2.5, 2.5],
        top1: [44.3, 38.7, 51.5, 52.7],
    },
    PaperDataset {
        name: "cifar100",
        source: Source::Cifar100,
        arch: Arch::Cifar {
            depth: 110,
            wide: true,
        },
        batch: 100,
        lr: [0.1, 0.1, 0.05, 0.1],
        top1: [77.0, 77.5, 75.3, 76.4],
    },
];

/// The test top-1 (in %) the paper's Table 2 reports for `dataset` (a datasets-prep source
/// name: cub, nab, cars, flowers, mit67, cifar100) and `loss`.
pub fn published_top1(dataset: &str, loss: LossKind) -> Option<f64> {
    let d = PAPER
        .iter()
        .find(|d| d.name == dataset || d.source.to_string() == dataset)?;
    let column = match loss {
        LossKind::Ce => 0,
        LossKind::CeLs => 1,
        LossKind::Cosine => 2,
        LossKind::CosineCe => 3,
    };
    Some(d.top1[column])
}

/// The paper's Table 2 datasets in its order, as preset names (`paper-NAME-LOSS`).
pub fn paper_datasets() -> impl Iterator<Item = &'static str> {
    PAPER.iter().map(|d| d.name)
}

/// The Table 2 dataset whose data is packed from `source` (CUB-subX is not one of them).
pub fn paper_dataset_of(source: &Source) -> Option<&'static str> {
    PAPER.iter().find(|d| &d.source == source).map(|d| d.name)
}

/// The CUB-subX sizes of the reference's sub-sampling curve (reference-spec 3.5: the split
/// files were never published; these are the likely values). Any X of 1..=30 is accepted.
pub const CUB_SUB_SIZES: [usize; 6] = [1, 5, 10, 15, 20, 25];

/// The datasets with a `gem-` preset (the ResNet-50 ones).
const GEM_DATASETS: [&str; 5] = ["cub", "nab", "cars", "flowers", "mit67"];

/// The GEM recipe's epochs, batch, weight decay, crop and random-resized-crop scale range.
pub const GEM_EPOCHS: usize = 200;
pub const GEM_BATCH: usize = 64;
pub const GEM_WEIGHT_DECAY: f64 = 5e-4;
pub const GEM_CROP: u32 = 224;
pub const GEM_RRC_SCALE: (f64, f64) = (0.4, 1.0);

/// What the paper's ResNet-50 runs normalised over in training: 24 images per GPU.
pub const PAPER_BN_BATCH: usize = 24;

/// Every preset name, for help and errors.
pub fn preset_names() -> Vec<String> {
    let losses = || LossKind::ALL.iter();
    let paper = PAPER
        .iter()
        .flat_map(move |d| losses().map(move |l| format!("paper-{}-{l}", d.name)));
    let sub = CUB_SUB_SIZES
        .iter()
        .flat_map(move |x| losses().map(move |l| format!("paper-cub-sub{x}-{l}")));
    let gem = GEM_DATASETS
        .iter()
        .flat_map(move |d| losses().map(move |l| format!("gem-{d}-{l}")));
    paper.chain(sub).chain(gem).collect()
}

/// What a preset sets; every field can be overridden on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: String,
    /// The source of the data the preset is meant for.
    pub source: Source,
    pub arch: Arch,
    pub loss: LossKind,
    pub lr_max: f64,
    /// ce-ls: the paper's smoothing, set by the preset itself (not left to a default).
    pub label_smoothing: Option<f64>,
    pub batch_size: usize,
    pub epochs: usize,
    pub augment: AugmentConfig,
    pub schedule: ScheduleKind,
    /// `paper-cub-subX`: X training images per class, taken at train time from data packed from
    /// the whole of CUB (data packed with `cub-sub:X` is already the subset).
    pub per_class: Option<usize>,
    pub train_repeats: usize,
    pub bn_batch: Option<usize>,
    pub weight_decay: f64,
}

impl Preset {
    /// Whether data packed from `source` is what this preset is for (CUB-subX counts as CUB;
    /// a `paper-cub-subX` preset takes the whole of CUB or CUB-subX of its own X).
    pub fn fits(&self, source: &Source) -> bool {
        match (&self.source, source, self.per_class) {
            (Source::Cub, Source::CubSub(x), Some(k)) => x.parse::<usize>() == Ok(k),
            (Source::Cub, Source::CubSub(_), None) => true,
            (a, b, _) => a == b,
        }
    }

    /// The train-time subset for data packed from `source`: none when the pack already is it.
    pub fn per_class_for(&self, source: Option<&Source>) -> Option<usize> {
        match source {
            Some(Source::CubSub(_)) => None,
            _ => self.per_class,
        }
    }

    /// The data source a preset's error messages name (`cub` or `cub-sub:X`).
    pub fn source_name(&self) -> String {
        match self.per_class {
            Some(x) => format!("{} or cub-sub:{x}", self.source),
            None => self.source.to_string(),
        }
    }

    fn paper(name: &str, d: &PaperDataset, loss: LossKind) -> Preset {
        let k = LossKind::ALL.iter().position(|&l| l == loss).unwrap_or(0);
        Preset {
            name: name.to_string(),
            source: d.source.clone(),
            arch: d.arch,
            loss,
            lr_max: d.lr[k],
            label_smoothing: (loss == LossKind::CeLs).then_some(defaults::LABEL_SMOOTHING),
            batch_size: d.batch,
            epochs: defaults::PAPER_EPOCHS,
            augment: defaults::augment_for(Some(&d.source)),
            schedule: ScheduleKind::Sgdr,
            per_class: None,
            train_repeats: 1,
            bn_batch: (d.arch == Arch::ResNet50).then_some(PAPER_BN_BATCH),
            weight_decay: 0.0,
        }
    }

    fn gem(name: &str, d: &PaperDataset, loss: LossKind) -> Preset {
        let paper = Preset::paper(name, d, loss);
        Preset {
            batch_size: GEM_BATCH,
            epochs: GEM_EPOCHS,
            augment: AugmentConfig {
                crop: Some(GEM_CROP),
                hflip: true,
                erase_prob: 0.0,
                shift: 0.0,
                rrc_scale: Some(GEM_RRC_SCALE),
            },
            schedule: ScheduleKind::CosineSteps,
            bn_batch: None,
            weight_decay: GEM_WEIGHT_DECAY,
            ..paper
        }
    }
}

/// A name that is no preset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown preset '{given}': expected one of {}", preset_names().join(", "))]
pub struct UnknownPreset {
    pub given: String,
}

impl FromStr for Preset {
    type Err = UnknownPreset;
    fn from_str(name: &str) -> Result<Self, UnknownPreset> {
        let unknown = || UnknownPreset {
            given: name.to_string(),
        };
        let dataset = |wanted: &str| PAPER.iter().find(|d| d.name == wanted).ok_or_else(unknown);
        let loss = |text: &str| LossKind::parse_name(text).map_err(|_| unknown());
        if let Some(rest) = name.strip_prefix("paper-cub-sub") {
            let (x, l) = rest.split_once('-').ok_or_else(unknown)?;
            let x: usize = x.parse().map_err(|_| unknown())?;
            if !(1..=30).contains(&x) {
                return Err(unknown());
            }
            let full = Preset::paper(name, dataset("cub")?, loss(l)?);
            return Ok(Preset {
                per_class: Some(x),
                train_repeats: 30 / x,
                ..full
            });
        }
        if let Some(rest) = name.strip_prefix("gem-") {
            let (d, l) = rest.split_once('-').ok_or_else(unknown)?;
            if !GEM_DATASETS.contains(&d) {
                return Err(unknown());
            }
            return Ok(Preset::gem(name, dataset(d)?, loss(l)?));
        }
        let rest = name.strip_prefix("paper-").ok_or_else(unknown)?;
        let (d, l) = rest.split_once('-').ok_or_else(unknown)?;
        Ok(Preset::paper(name, dataset(d)?, loss(l)?))
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> Result<Preset, UnknownPreset> {
        name.parse()
    }

    #[test]
    fn presets_carry_the_papers_best_rates() {
        let p = preset("paper-cub-cosine").unwrap();
        assert_eq!(
            (p.arch, p.loss, p.lr_max, p.batch_size, p.epochs),
            (Arch::ResNet50, LossKind::Cosine, 0.5, 96, 372)
        );
        assert_eq!(p.augment.crop, Some(448));
        assert_eq!(preset("paper-mit67-ce-ls").unwrap().lr_max, 1.0);
        assert_eq!(preset("paper-mit67-ce-ls").unwrap().augment.crop, Some(224));
        let cifar = preset("paper-cifar100-cosine").unwrap();
        assert_eq!(
            cifar.arch,
            Arch::Cifar {
                depth: 110,
                wide: true
            }
        );
        assert_eq!(
            (cifar.augment.crop, cifar.augment.hflip, cifar.augment.shift),
            (None, true, 0.15)
        );
        let err = preset("paper-imagenet-ce").unwrap_err().to_string();
        assert!(err.contains("paper-cub-cosine-ce"), "{err}");
        assert_eq!(preset_names().len(), 24 + 24 + 20);
        let sub = preset("paper-cub-sub5-cosine").unwrap();
        assert_eq!(
            (sub.per_class, sub.train_repeats, sub.lr_max),
            (Some(5), 6, 0.5)
        );
        assert!(sub.fits(&Source::Cub) && sub.fits(&Source::CubSub("5".into())));
        assert!(!sub.fits(&Source::CubSub("10".into())));
        assert_eq!(sub.per_class_for(Some(&Source::CubSub("5".into()))), None);
        assert_eq!(preset("paper-cub-sub25-ce").unwrap().train_repeats, 1);
        assert!(preset("paper-cub-sub31-ce").is_err());
        assert_eq!(
            p.bn_batch,
            Some(24),
            "ResNet-50 normalises over 24 images as on 4 GPUs"
        );
        assert_eq!(cifar.bn_batch, None);
        let gem = preset("gem-cub-ce").unwrap();
        assert_eq!(
            (gem.epochs, gem.batch_size, gem.schedule, gem.augment.crop),
            (200, 64, ScheduleKind::CosineSteps, Some(224))
        );
        assert_eq!(
            (gem.augment.rrc_scale, gem.weight_decay),
            (Some((0.4, 1.0)), 5e-4)
        );
        assert!(preset("gem-cifar100-ce").is_err());
        for name in preset_names() {
            assert_eq!(preset(&name).unwrap().name, name);
        }
    }
}
