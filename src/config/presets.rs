//! The paper's protocols (`--preset paper-DATASET-LOSS`, reference-spec 3.2 and 4.2-4.5): per
//! dataset the architecture, batch and best learning rate of each objective; 372 epochs and the
//! dataset's augmentation for all of them.

use std::fmt;
use std::str::FromStr;

use datasets_prep::sources::Source;

use super::defaults;
use crate::choice::Choice;
use crate::data::augment::AugmentConfig;
use crate::model::Arch;
use crate::objective::LossKind;

/// One dataset of the paper's Table 2.
struct PaperDataset {
    name: &'static str,
    /// The `datasets-prep` source its data is packed from.
    source: Source,
    arch: Arch,
    batch: usize,
    /// Best max learning rate for ce, ce-ls, cosine, cosine-ce (reference-spec 4.5).
    lr: [f64; 4],
}

const PAPER: [PaperDataset; 6] = [
    PaperDataset {
        name: "cub",
        source: Source::Cub,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [0.05, 0.05, 0.5, 0.5],
    },
    PaperDataset {
        name: "nab",
        source: Source::Nab,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [0.05, 0.1, 0.5, 0.5],
    },
    PaperDataset {
        name: "cars",
        source: Source::Cars,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [1.0, 1.0, 1.0, 0.5],
    },
    PaperDataset {
        name: "flowers",
        source: Source::Flowers,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [1.0, 0.1, 0.5, 0.5],
    },
    PaperDataset {
        name: "mit67",
        source: Source::Mit67,
        arch: Arch::ResNet50,
        batch: 96,
        lr: [0.05, 1.0, 2.5, 2.5],
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
    },
];

/// Every preset name, for help and errors.
pub fn preset_names() -> Vec<String> {
    PAPER
        .iter()
        .flat_map(|d| {
            LossKind::ALL
                .iter()
                .map(move |l| format!("paper-{}-{l}", d.name))
        })
        .collect()
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
}

impl Preset {
    /// Whether data packed from `source` is what this preset is for (CUB-subX counts as CUB).
    pub fn fits(&self, source: &Source) -> bool {
        match (&self.source, source) {
            (Source::Cub, Source::CubSub(_)) => true,
            (a, b) => a == b,
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
        let rest = name.strip_prefix("paper-").ok_or_else(unknown)?;
        let (dataset, loss) = rest.split_once('-').ok_or_else(unknown)?;
        let d = PAPER
            .iter()
            .find(|d| d.name == dataset)
            .ok_or_else(unknown)?;
        let loss = LossKind::parse_name(loss).map_err(|_| unknown())?;
        let k = LossKind::ALL
            .iter()
            .position(|&l| l == loss)
            .ok_or_else(unknown)?;
        Ok(Preset {
            name: name.to_string(),
            source: d.source.clone(),
            arch: d.arch,
            loss,
            lr_max: d.lr[k],
            label_smoothing: (loss == LossKind::CeLs).then_some(defaults::LABEL_SMOOTHING),
            batch_size: d.batch,
            epochs: defaults::PAPER_EPOCHS,
            augment: defaults::augment_for(Some(&d.source)),
        })
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
        assert_eq!(preset_names().len(), 24);
        for name in preset_names() {
            assert_eq!(preset(&name).unwrap().name, name);
        }
    }
}
