//! The run configuration: resolved once from a preset, the command line and the data's source,
//! written to `config.json` and into every checkpoint, and the only input of a run besides the
//! data. Nothing here knows about the command-line parser: the command layer turns flags into
//! [`Overrides`], and [`RunConfig::resolve`] does the rest.

pub mod defaults;
pub mod presets;

use std::path::{Path, PathBuf};

use datasets_prep::sources::Source;
use serde::{Deserialize, Serialize};

pub use presets::{Preset, UnknownPreset, preset_names};

use crate::choice::Choice;
use crate::data::augment::AugmentConfig;
pub use crate::data::selection::{TrainSubset, ValSplit};
pub use crate::embedding::EmbeddingSpec;
use crate::model::Arch;
pub use crate::model::ConvPadding;
use crate::objective::{LossKind, ObjectiveConfig};
use crate::runtime::device::DeviceChoice;
use crate::schedule::{Schedule, ScheduleKind, sgdr_epochs};

/// `--bn-stats`: the BatchNorm statistics evaluation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnStats {
    /// The reference's bias-corrected moving average of the training batches' statistics.
    Ema,
    /// Recomputed over the un-augmented training images before each evaluation.
    Precise,
}

impl Choice for BnStats {
    const WHAT: &'static str = "BatchNorm statistics";
    const ALL: &'static [BnStats] = &[BnStats::Ema, BnStats::Precise];
    fn name(self) -> &'static str {
        match self {
            BnStats::Ema => "ema",
            BnStats::Precise => "precise",
        }
    }
}

crate::choice_traits!(BnStats);

/// `--precision`: the arithmetic of the training forward and backward passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    /// bfloat16 autocast on the device (evaluation stays in fp32).
    Bf16,
}

impl Choice for Precision {
    const WHAT: &'static str = "precision";
    const ALL: &'static [Precision] = &[Precision::Fp32, Precision::Bf16];
    fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

crate::choice_traits!(Precision);

/// What a `config.json` without `conv_padding` was trained with.
fn padding_before_the_option() -> ConvPadding {
    ConvPadding::Symmetric
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn one() -> usize {
    1
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Everything that decides a run's result. Serialised as `config.json`'s `config` object; the
/// key names and value spellings are a file format (old run directories must keep reading).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The shard directory.
    pub data: PathBuf,
    pub arch: Arch,
    pub objective: ObjectiveConfig,
    pub embedding: EmbeddingSpec,
    pub schedule: Schedule,
    pub epochs: usize,
    /// Global batch size (split across ranks in distributed runs).
    pub batch_size: usize,
    pub momentum: f64,
    pub clip_norm: Option<f64>,
    pub augment: AugmentConfig,
    /// Evaluate on the test split every this many epochs (and after the last).
    pub eval_every: usize,
    pub bn_stats: BnStats,
    /// A class hierarchy for the hierarchical accuracy (mean of 1 - h(LCS(pred, true)) / H).
    #[serde(default)]
    pub hierarchy: Option<PathBuf>,
    #[serde(default)]
    pub hierarchy_is_a: bool,
    pub seed: u64,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// BatchNorm statistics over the whole job's batch in training (multi-rank runs).
    #[serde(default)]
    pub sync_bn: bool,
    /// Weights the run starts from instead of the seed's initialisation (`--init-from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
    /// The training images used and held out (`--per-class`, `--val-per-class`).
    #[serde(default, skip_serializing_if = "TrainSubset::is_all")]
    pub subset: TrainSubset,
    /// Passes over the training list per epoch (`--train-repeats`; the reference's CUB-subX).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub train_repeats: usize,
    /// Training BatchNorm statistics over groups of this many images (`--bn-batch`, "ghost"
    /// BatchNorm); `None`: over each rank's share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_batch: Option<usize>,
    /// PyTorch-style coupled weight decay on every parameter (`--weight-decay`), on top of the
    /// architecture's L2.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight_decay: f64,
    #[serde(default = "padding_before_the_option")]
    pub conv_padding: ConvPadding,
}

/// `--init-from FILE [--new-head]`: start from saved weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitFrom {
    /// A `.safetensors` file (a run's `model.safetensors` or a checkpoint's).
    pub weights: PathBuf,
    /// xxh3 of the file: a resume must start from the same weights.
    pub xxh3: String,
    /// Keep the seed's initialisation for the head (`fc`, `head.*`), e.g. for other classes.
    pub new_head: bool,
}

/// What the user set for a run; `None` leaves a value to the preset, then to the data's source,
/// then to [`defaults`].
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub preset: Option<Preset>,
    pub arch: Option<Arch>,
    pub loss: Option<LossKind>,
    pub label_smoothing: Option<f64>,
    pub cls_weight: Option<f64>,
    pub ce_clip: bool,
    pub embedding: Option<EmbeddingSpec>,
    pub lr_max: Option<f64>,
    pub lr_min: Option<f64>,
    pub schedule: Option<ScheduleKind>,
    pub epochs: Option<usize>,
    pub sgdr_base: Option<usize>,
    pub sgdr_mul: Option<usize>,
    pub batch_size: Option<usize>,
    /// 0 disables clipping.
    pub clip_norm: Option<f64>,
    /// 0 keeps the stored size.
    pub crop: Option<u32>,
    pub flip: Option<bool>,
    pub erase_prob: Option<f64>,
    pub shift: Option<f64>,
    pub eval_every: Option<usize>,
    pub bn_stats: Option<BnStats>,
    pub sync_bn: bool,
    pub hierarchy: Option<PathBuf>,
    pub hierarchy_is_a: bool,
    pub seed: Option<u64>,
    pub device: Option<DeviceChoice>,
    pub precision: Option<Precision>,
    pub init_from: Option<InitFrom>,
    pub per_class: Option<usize>,
    pub val: Option<ValSplit>,
    pub subset_seed: Option<u64>,
    pub train_repeats: Option<usize>,
    /// 0: per-rank statistics.
    pub bn_batch: Option<usize>,
    pub weight_decay: Option<f64>,
    pub rrc_scale: Option<(f64, f64)>,
    pub conv_padding: Option<ConvPadding>,
}

impl Overrides {
    /// Every setting of `config` as given values, so that resolving them gives `config` back:
    /// what a resumed run starts from before the options given on its command line.
    pub fn from_config(config: &RunConfig) -> Overrides {
        let (max, min, kind, base, mul) = match config.schedule {
            Schedule::Sgdr {
                max_lr,
                min_lr,
                base,
                mul,
            } => (max_lr, min_lr, ScheduleKind::Sgdr, Some(base), Some(mul)),
            Schedule::CosineSteps { max_lr, min_lr } => {
                (max_lr, min_lr, ScheduleKind::CosineSteps, None, None)
            }
        };
        let o = &config.objective;
        let a = &config.augment;
        Overrides {
            preset: None,
            arch: Some(config.arch),
            loss: Some(o.loss),
            label_smoothing: Some(o.label_smoothing),
            cls_weight: Some(o.cls_weight),
            ce_clip: o.keras_ce_clip,
            embedding: Some(config.embedding.clone()),
            lr_max: Some(max),
            lr_min: Some(min),
            schedule: Some(kind),
            epochs: Some(config.epochs),
            sgdr_base: base,
            sgdr_mul: mul,
            batch_size: Some(config.batch_size),
            clip_norm: Some(config.clip_norm.unwrap_or(0.0)),
            crop: Some(a.crop.unwrap_or(0)),
            flip: Some(a.hflip),
            erase_prob: Some(a.erase_prob),
            shift: Some(a.shift),
            eval_every: Some(config.eval_every),
            bn_stats: Some(config.bn_stats),
            sync_bn: config.sync_bn,
            hierarchy: config.hierarchy.clone(),
            hierarchy_is_a: config.hierarchy_is_a,
            seed: Some(config.seed),
            device: Some(config.device),
            precision: Some(config.precision),
            init_from: config.init_from.clone(),
            // `Some(0)` is "all" / "none" where 0 cannot be a value.
            per_class: Some(config.subset.per_class.unwrap_or(0)),
            val: config.subset.val,
            subset_seed: Some(config.subset.seed),
            train_repeats: Some(config.train_repeats),
            bn_batch: Some(config.bn_batch.unwrap_or(0)),
            weight_decay: Some(config.weight_decay),
            rrc_scale: Some(a.rrc_scale.unwrap_or((0.0, 0.0))),
            conv_padding: Some(config.conv_padding),
        }
    }

    /// These values, and `lower`'s where these leave one open (flags: set in either).
    pub fn or(self, lower: Overrides) -> Overrides {
        Overrides {
            preset: self.preset.or(lower.preset),
            arch: self.arch.or(lower.arch),
            loss: self.loss.or(lower.loss),
            label_smoothing: self.label_smoothing.or(lower.label_smoothing),
            cls_weight: self.cls_weight.or(lower.cls_weight),
            ce_clip: self.ce_clip || lower.ce_clip,
            embedding: self.embedding.or(lower.embedding),
            lr_max: self.lr_max.or(lower.lr_max),
            lr_min: self.lr_min.or(lower.lr_min),
            schedule: self.schedule.or(lower.schedule),
            epochs: self.epochs.or(lower.epochs),
            sgdr_base: self.sgdr_base.or(lower.sgdr_base),
            sgdr_mul: self.sgdr_mul.or(lower.sgdr_mul),
            batch_size: self.batch_size.or(lower.batch_size),
            clip_norm: self.clip_norm.or(lower.clip_norm),
            crop: self.crop.or(lower.crop),
            flip: self.flip.or(lower.flip),
            erase_prob: self.erase_prob.or(lower.erase_prob),
            shift: self.shift.or(lower.shift),
            eval_every: self.eval_every.or(lower.eval_every),
            bn_stats: self.bn_stats.or(lower.bn_stats),
            sync_bn: self.sync_bn || lower.sync_bn,
            hierarchy: self.hierarchy.or(lower.hierarchy),
            hierarchy_is_a: self.hierarchy_is_a || lower.hierarchy_is_a,
            seed: self.seed.or(lower.seed),
            device: self.device.or(lower.device),
            precision: self.precision.or(lower.precision),
            init_from: self.init_from.or(lower.init_from),
            per_class: self.per_class.or(lower.per_class),
            val: self.val.or(lower.val),
            subset_seed: self.subset_seed.or(lower.subset_seed),
            train_repeats: self.train_repeats.or(lower.train_repeats),
            bn_batch: self.bn_batch.or(lower.bn_batch),
            weight_decay: self.weight_decay.or(lower.weight_decay),
            rrc_scale: self.rrc_scale.or(lower.rrc_scale),
            conv_padding: self.conv_padding.or(lower.conv_padding),
        }
    }
}

/// A value or a combination of values no run can have. The command line reports these as
/// usage errors (exit status 2).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("--lr-max {max} / --lr-min {min}: expected 0 <= lr-min <= lr-max and lr-max > 0")]
    LearningRates { max: f64, min: f64 },
    #[error(
        "--preset {preset} is for data packed from source {wanted}, but this data was packed \
         from {found}"
    )]
    WrongData {
        preset: String,
        wanted: String,
        found: String,
    },
    #[error("--{option} {value}: expected {expected}")]
    OutOfRange {
        option: &'static str,
        value: String,
        expected: &'static str,
    },
}

fn check(
    ok: bool,
    option: &'static str,
    value: impl ToString,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            option,
            value: value.to_string(),
            expected,
        })
    }
}

impl RunConfig {
    /// The configuration of a run on the shard directory `data`, packed from `source` (`None`:
    /// a source this program does not know): every value from `given`, else the preset, else the
    /// source's augmentation and the [`defaults`].
    pub fn resolve(
        data: &Path,
        given: &Overrides,
        source: Option<&Source>,
    ) -> Result<RunConfig, ConfigError> {
        Self::resolve_for(data, given, source, None)
    }

    /// [`RunConfig::resolve`] for data of `train_per_class` training images per class, which
    /// chooses the BatchNorm statistics when none are given: precise for short runs (see
    /// [`defaults::bn_stats_for`]); without the counts, or with a preset, the reference's ema.
    pub fn resolve_for(
        data: &Path,
        given: &Overrides,
        source: Option<&Source>,
        train_per_class: Option<&[u64]>,
    ) -> Result<RunConfig, ConfigError> {
        let preset = given.preset.as_ref();
        if let (Some(p), Some(s)) = (preset, source)
            && !p.fits(s)
        {
            return Err(ConfigError::WrongData {
                preset: p.name.clone(),
                wanted: p.source_name(),
                found: s.to_string(),
            });
        }
        let arch = given
            .arch
            .or(preset.map(|p| p.arch))
            .unwrap_or(defaults::ARCH);
        let loss = given
            .loss
            .or(preset.map(|p| p.loss))
            .unwrap_or(defaults::LOSS);
        let (schedule, planned_epochs) = resolve_schedule(given, preset, loss)?;
        let epochs = given
            .epochs
            .or(preset.map(|p| p.epochs))
            .unwrap_or(planned_epochs);
        check(epochs >= 1, "epochs", epochs, "at least 1")?;
        let batch_size = given
            .batch_size
            .or(preset.map(|p| p.batch_size))
            .unwrap_or(defaults::BATCH_SIZE);
        check(batch_size >= 1, "batch-size", batch_size, "at least 1")?;
        let objective = resolve_objective(given, preset, loss)?;
        let clip_norm = given.clip_norm.unwrap_or(defaults::CLIP_NORM);
        check(
            clip_norm >= 0.0 && !clip_norm.is_nan(),
            "clip-norm",
            clip_norm,
            "a norm >= 0 (0 disables clipping)",
        )?;
        let eval_every = given.eval_every.unwrap_or(defaults::EVAL_EVERY);
        check(
            eval_every >= 1,
            "eval-every",
            eval_every,
            "at least 1 epoch",
        )?;
        let subset = TrainSubset {
            per_class: given
                .per_class
                .or(preset.and_then(|p| p.per_class_for(source)))
                .filter(|&k| k > 0),
            val: given.val,
            seed: given.subset_seed.unwrap_or(0),
        };
        let train_repeats = given
            .train_repeats
            .or(preset.map(|p| p.train_repeats))
            .unwrap_or(1);
        check(
            (1..=defaults::MAX_TRAIN_REPEATS).contains(&train_repeats),
            "train-repeats",
            train_repeats,
            "1 to 1000 passes per epoch",
        )?;
        let bn_batch = resolve_bn_batch(given, preset)?;
        let weight_decay = given
            .weight_decay
            .or(preset.map(|p| p.weight_decay))
            .unwrap_or(0.0);
        check(
            weight_decay >= 0.0 && weight_decay.is_finite(),
            "weight-decay",
            weight_decay,
            "a decay >= 0",
        )?;
        let train_images = train_per_class
            .and_then(|counts| crate::data::selection::counts_after(counts, &subset).ok())
            .map(|counts| counts.iter().sum::<u64>() * train_repeats as u64);
        Ok(RunConfig {
            data: data.to_path_buf(),
            arch,
            objective,
            embedding: given.embedding.clone().unwrap_or(EmbeddingSpec::OneHot),
            schedule,
            epochs,
            batch_size,
            momentum: defaults::MOMENTUM,
            clip_norm: (clip_norm > 0.0).then_some(clip_norm),
            augment: resolve_augment(given, preset, source)?,
            eval_every,
            bn_stats: given
                .bn_stats
                .unwrap_or_else(|| match (preset, train_images) {
                    (None, Some(n)) => {
                        defaults::bn_stats_for(epochs as u64 * (n.div_ceil(batch_size as u64)))
                    }
                    _ => BnStats::Ema,
                }),
            hierarchy: given.hierarchy.clone(),
            hierarchy_is_a: given.hierarchy_is_a,
            seed: given.seed.unwrap_or(defaults::SEED),
            device: given.device.unwrap_or(DeviceChoice::Cpu),
            precision: given.precision.unwrap_or(Precision::Fp32),
            sync_bn: given.sync_bn,
            init_from: given.init_from.clone(),
            subset,
            train_repeats,
            bn_batch,
            weight_decay,
            conv_padding: given.conv_padding.unwrap_or(ConvPadding::Same),
        })
    }
}

/// The learning-rate schedule, and the epochs it plans (whole SGDR cycles) when none are given.
fn resolve_schedule(
    given: &Overrides,
    preset: Option<&Preset>,
    loss: LossKind,
) -> Result<(Schedule, usize), ConfigError> {
    let lr_max = given
        .lr_max
        .or(preset.map(|p| p.lr_max))
        .unwrap_or_else(|| defaults::lr_max_for(loss));
    let lr_min = given.lr_min.unwrap_or(defaults::LR_MIN);
    if !(lr_max > 0.0 && lr_max.is_finite() && lr_min >= 0.0 && lr_min <= lr_max) {
        return Err(ConfigError::LearningRates {
            max: lr_max,
            min: lr_min,
        });
    }
    let base = given.sgdr_base.unwrap_or(defaults::SGDR_BASE);
    let mul = given.sgdr_mul.unwrap_or(defaults::SGDR_MUL);
    check(base >= 1, "sgdr-base", base, "at least 1 epoch")?;
    check(mul >= 1, "sgdr-mul", mul, "a factor of at least 1")?;
    let schedule_kind = given
        .schedule
        .or(preset.map(|p| p.schedule))
        .unwrap_or(ScheduleKind::Sgdr);
    let schedule = match schedule_kind {
        ScheduleKind::Sgdr => Schedule::Sgdr {
            max_lr: lr_max,
            min_lr: lr_min,
            base,
            mul,
        },
        ScheduleKind::CosineSteps => Schedule::CosineSteps {
            max_lr: lr_max,
            min_lr: lr_min,
        },
    };
    Ok((schedule, sgdr_epochs(base, mul, defaults::CYCLES)))
}

/// The objective: the loss with its label smoothing and classification weight.
fn resolve_objective(
    given: &Overrides,
    preset: Option<&Preset>,
    loss: LossKind,
) -> Result<ObjectiveConfig, ConfigError> {
    let label_smoothing = given
        .label_smoothing
        .or(preset.and_then(|p| p.label_smoothing))
        .unwrap_or(defaults::LABEL_SMOOTHING);
    check(
        (0.0..1.0).contains(&label_smoothing),
        "label-smoothing",
        label_smoothing,
        "0 <= ls < 1",
    )?;
    let cls_weight = given.cls_weight.unwrap_or(defaults::CLS_WEIGHT);
    check(
        cls_weight >= 0.0 && cls_weight.is_finite(),
        "cls-weight",
        cls_weight,
        "a weight >= 0",
    )?;
    Ok(ObjectiveConfig {
        loss,
        label_smoothing,
        cls_weight,
        keras_ce_clip: given.ce_clip,
    })
}

/// Images per BatchNorm group (`--bn-batch`, else the preset's unless `--sync-bn`).
fn resolve_bn_batch(
    given: &Overrides,
    preset: Option<&Preset>,
) -> Result<Option<usize>, ConfigError> {
    // --sync-bn replaces a preset's group size; given together they contradict.
    let preset_bn_batch = preset.and_then(|p| p.bn_batch).filter(|_| !given.sync_bn);
    let bn_batch = given.bn_batch.or(preset_bn_batch).filter(|&n| n > 0);
    if let Some(n) = bn_batch {
        check(
            !given.sync_bn,
            "bn-batch",
            n,
            "either --bn-batch or --sync-bn, not both (--bn-batch 0 turns it off)",
        )?;
        check(
            n >= 2,
            "bn-batch",
            n,
            "at least 2 images per BatchNorm group",
        )?;
    }
    Ok(bn_batch)
}

/// The preset's augmentation (or the source's), with the flags given over it.
fn resolve_augment(
    given: &Overrides,
    preset: Option<&Preset>,
    source: Option<&Source>,
) -> Result<AugmentConfig, ConfigError> {
    let mut augment = preset.map_or_else(|| defaults::augment_for(source), |p| p.augment.clone());
    if let Some(c) = given.crop {
        check(
            c <= defaults::MAX_CROP,
            "crop",
            c,
            "at most 4096 pixels (0 keeps the stored size)",
        )?;
        augment.crop = (c > 0).then_some(c);
    }
    if let Some(f) = given.flip {
        augment.hflip = f;
    }
    if let Some(p) = given.erase_prob {
        check(
            (0.0..=1.0).contains(&p),
            "erase-prob",
            p,
            "a probability in 0..=1",
        )?;
        augment.erase_prob = p;
    }
    if let Some(s) = given.shift {
        check((0.0..0.5).contains(&s), "shift", s, "a fraction in 0..0.5")?;
        augment.shift = s;
    }
    if let Some((lo, hi)) = given.rrc_scale {
        augment.rrc_scale = (hi > 0.0).then_some((lo, hi));
    }
    if let Some((lo, hi)) = augment.rrc_scale {
        check(
            lo > 0.0 && lo <= hi && hi <= 1.0,
            "rrc-scale",
            format!("{lo},{hi}"),
            "MIN,MAX with 0 < MIN <= MAX <= 1 (fractions of the image's area)",
        )?;
        check(
            augment.crop.is_some(),
            "aug",
            "rrc",
            "a --crop size for the random-resized crops to be resized to",
        )?;
    }
    Ok(augment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_preset_and_flags_resolve_in_that_order() {
        let data = Path::new("d");
        let plain = RunConfig::resolve(data, &Overrides::default(), Some(&Source::Idx)).unwrap();
        assert_eq!(
            (plain.arch, plain.epochs, plain.batch_size),
            (defaults::ARCH, 36, 100)
        );
        assert!(!plain.augment.hflip, "IDX images are not flipped");
        let given = Overrides {
            preset: Some("paper-cub-ce".parse().unwrap()),
            batch_size: Some(32),
            ..Default::default()
        };
        let c = RunConfig::resolve(data, &given, Some(&Source::Cub)).unwrap();
        assert_eq!((c.arch, c.epochs, c.batch_size), (Arch::ResNet50, 372, 32));
        assert_eq!(c.schedule.max_lr(), 0.05);
        assert_eq!(c.augment.crop, Some(448));
    }

    #[test]
    fn short_runs_default_to_precise_batchnorm_statistics() {
        let d = Path::new("d");
        let plain = Overrides::default();
        let short = RunConfig::resolve_for(d, &plain, None, Some(&[100, 100])).unwrap();
        assert_eq!(short.bn_stats, BnStats::Precise, "36 epochs x 2 steps");
        let long = RunConfig::resolve_for(d, &plain, None, Some(&[1_000_000])).unwrap();
        assert_eq!(long.bn_stats, BnStats::Ema, "36 x 10,000 steps");
        let paper = Overrides {
            preset: Some("paper-cub-ce".parse().unwrap()),
            ..Default::default()
        };
        let p = RunConfig::resolve_for(d, &paper, Some(&Source::Cub), Some(&[200])).unwrap();
        assert_eq!(p.bn_stats, BnStats::Ema, "presets keep the reference's");
        let chosen = Overrides {
            bn_stats: Some(BnStats::Ema),
            ..Default::default()
        };
        let c = RunConfig::resolve_for(d, &chosen, None, Some(&[200])).unwrap();
        assert_eq!(c.bn_stats, BnStats::Ema);
    }

    #[test]
    fn a_preset_refuses_data_of_another_source() {
        let given = Overrides {
            preset: Some("paper-cub-ce-ls".parse().unwrap()),
            ..Default::default()
        };
        let err = RunConfig::resolve(Path::new("d"), &given, Some(&Source::Cifar100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("for data packed from source cub"), "{err}");
        let sub = Source::CubSub("5".into());
        let c = RunConfig::resolve(Path::new("d"), &given, Some(&sub)).unwrap();
        assert_eq!(c.objective.label_smoothing, defaults::LABEL_SMOOTHING);
    }

    #[test]
    fn impossible_values_name_the_option() {
        let bad = |o: Overrides| {
            RunConfig::resolve(Path::new("d"), &o, None)
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(Overrides {
                lr_min: Some(1.0),
                ..Default::default()
            })
            .contains("--lr-min")
        );
        assert!(
            bad(Overrides {
                epochs: Some(0),
                ..Default::default()
            })
            .contains("--epochs 0")
        );
        assert!(
            bad(Overrides {
                shift: Some(0.7),
                ..Default::default()
            })
            .contains("--shift")
        );
    }

    #[test]
    fn a_config_resolves_back_from_its_own_values() {
        for (preset, source) in [
            ("paper-cub-cosine", Source::Cub),
            ("paper-cifar100-ce-ls", Source::Cifar100),
        ] {
            let given = Overrides {
                preset: Some(preset.parse().unwrap()),
                sync_bn: true,
                clip_norm: Some(2.0),
                ..Default::default()
            };
            let c = RunConfig::resolve(Path::new("d"), &given, Some(&source)).unwrap();
            let back =
                RunConfig::resolve(Path::new("d"), &Overrides::from_config(&c), None).unwrap();
            assert_eq!(back, c, "{preset}");
            let steps = Overrides {
                schedule: Some(ScheduleKind::CosineSteps),
                ..Default::default()
            };
            let c = RunConfig::resolve(Path::new("d"), &steps, None).unwrap();
            let longer = Overrides {
                epochs: Some(99),
                ..Default::default()
            }
            .or(Overrides::from_config(&c));
            let back = RunConfig::resolve(Path::new("d"), &longer, None).unwrap();
            assert_eq!((back.epochs, back.schedule), (99, c.schedule));
        }
    }

    #[test]
    fn typed_values_keep_their_config_json_spelling() {
        let c = RunConfig::resolve(Path::new("d"), &Overrides::default(), None).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["bn_stats"], "ema");
        assert_eq!(v["precision"], "fp32");
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["embedding"], "onehot");
        assert_eq!(v["arch"], "resnet20");
        let back: RunConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }
}
