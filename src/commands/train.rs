//! `cosine-train train`: flags into an [`Overrides`], resolved against the data's source into a
//! [`RunConfig`], then one [`Trainer`] on this rank of the job.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use datasets_prep::sources::Source;

use super::{ChannelsLast, JobArgs, UsageError, choice, preset, threads};
use crate::config::{
    BnStats, ConvPadding, EmbeddingSpec, InitFrom, Overrides, Precision, Preset, RunConfig,
    ValSplit, defaults,
};
use crate::dist::Communicator;
use crate::dist::job::Job;
use crate::model::Arch;
use crate::objective::LossKind;
use crate::run_dir::checkpoint::ResumeMode;
use crate::run_dir::{self, records};
use crate::runtime::device::DeviceChoice;
use crate::runtime::signals::Stopped;
use crate::schedule::ScheduleKind;
use crate::train::{RunOptions, RunSummary, Trainer};

/// `train` options. Every option left out comes from `--preset`, then from the data's source,
/// then from the defaults shown.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Shard directory written by `datasets-prep pack` [default with --resume: the run's].
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<PathBuf>,
    /// Run directory to create (config.json, metrics.jsonl, log.txt, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// A protocol that sets every value it depends on: paper-DATASET-LOSS (the paper's),
    /// paper-cub-subX-LOSS (X images per class, 30 // X passes per epoch), gem-DATASET-LOSS (the
    /// tuned cross-entropy baseline's recipe; tune lr/batch/weight decay on validation).
    #[arg(long, value_parser = preset())]
    pub preset: Option<Preset>,
    /// Architecture [default: resnet20].
    #[arg(long, value_parser = choice::<Arch>())]
    pub arch: Option<Arch>,
    /// Objective [default: cosine].
    #[arg(long, value_parser = choice::<LossKind>())]
    pub loss: Option<LossKind>,
    /// Label smoothing of ce-ls (ls on the other classes, spread as ls / (C - 1)).
    #[arg(long, default_value_t = defaults::LABEL_SMOOTHING)]
    pub label_smoothing: f64,
    /// Weight of the cross-entropy head in cosine-ce.
    #[arg(long, default_value_t = defaults::CLS_WEIGHT)]
    pub cls_weight: f64,
    /// Cross-entropy exactly as the reference's Keras: probabilities clipped to [1e-7, 1-1e-7]
    /// before the log (no gradient from samples beyond); default is the log-softmax form.
    #[arg(long)]
    pub ce_clip: bool,
    /// Class embeddings of the cosine losses: onehot, a .npy C x D matrix in class order, or a
    /// reference pickle (embedding + ind2label).
    #[arg(long, default_value = "onehot")]
    pub embedding: EmbeddingSpec,
    /// Maximum learning rate [default: 0.1; 0.5 for cosine-ce].
    #[arg(long, visible_alias = "lr")]
    pub lr_max: Option<f64>,
    /// Minimum learning rate of the schedule.
    #[arg(long, default_value_t = defaults::LR_MIN)]
    pub lr_min: f64,
    /// Learning-rate schedule: sgdr (per epoch, restarts) or cosine-steps (one decay, per step).
    #[arg(long, value_parser = choice::<ScheduleKind>(), default_value = "sgdr")]
    pub schedule: ScheduleKind,
    /// Epochs [default: 372 with a preset; else 2 SGDR cycles].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Length of the first SGDR cycle in epochs.
    #[arg(long, default_value_t = defaults::SGDR_BASE)]
    pub sgdr_base: usize,
    /// Growth factor of SGDR cycle lengths.
    #[arg(long, default_value_t = defaults::SGDR_MUL)]
    pub sgdr_mul: usize,
    /// Global batch size [default: 100].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Global gradient-norm clip; 0 disables.
    #[arg(long, default_value_t = defaults::CLIP_NORM)]
    pub clip_norm: f64,
    /// Square crop size; 0 keeps the stored size [default: from the dataset's source].
    #[arg(long)]
    pub crop: Option<u32>,
    /// Horizontal flips: on or off (true/false also work) [default: from the dataset's source].
    #[arg(long, value_parser = on_off, value_name = "on|off")]
    pub flip: Option<bool>,
    /// Random-erasing probability [default: from the dataset's source].
    #[arg(long)]
    pub erase_prob: Option<f64>,
    /// Random shift as a fraction of the size [default: from the dataset's source].
    #[arg(long)]
    pub shift: Option<f64>,
    /// Training augmentation: crop (a random crop of --crop pixels, or none) or rrc
    /// (random-resized crops of --rrc-scale of the area, resized to --crop) [default: from the
    /// preset or the dataset's source].
    #[arg(long, value_parser = choice::<AugKind>())]
    pub aug: Option<AugKind>,
    /// Area range of random-resized crops, as fractions of the image (implies --aug rrc).
    #[arg(long, value_parser = scale_range, value_name = "MIN,MAX")]
    pub rrc_scale: Option<(f64, f64)>,
    /// PyTorch-style weight decay on every parameter, on top of the architecture's L2 (added
    /// to the gradient before clipping) [default: 0; gem presets: 5e-4].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Train on K images per class of the packed training split (0 = all), chosen by
    /// --subset-seed: one pack serves a whole sub-sampling curve, and smaller subsets are
    /// contained in larger ones.
    #[arg(long, value_name = "K")]
    pub per_class: Option<usize>,
    /// Hold out K images per class (or a fraction, e.g. 0.1) of the training split for
    /// validation: every evaluation then reports val_top1, and the best epoch is chosen on it.
    #[arg(long, value_name = "K|FRACTION")]
    pub val_per_class: Option<ValSplit>,
    /// Seed of the --per-class and --val-per-class choice (independent of --seed).
    #[arg(long, default_value_t = 0)]
    pub subset_seed: u64,
    /// Passes over the training list per epoch, each with its own augmentation draws (the
    /// reference's CUB-subX: 30 // X) [default: 1].
    #[arg(long, value_name = "R")]
    pub train_repeats: Option<usize>,
    /// "Ghost" BatchNorm: training statistics over groups of N images of each rank's share
    /// (ranks with fewer share them over the ranks of a group), so that any number of ranks
    /// normalises as the paper's 4 GPUs x 24 did; 0 = each rank's share [default: 24 with
    /// the ResNet-50 paper presets].
    #[arg(long, value_name = "N")]
    pub bn_batch: Option<usize>,
    /// Padding of the CIFAR ResNets' stride-2 convolutions: same (TensorFlow's, as the
    /// reference: 0 before and 1 after on even sizes) or symmetric (1 on each side).
    #[arg(long, value_parser = choice::<ConvPadding>(), default_value = "same")]
    pub conv_padding: ConvPadding,
    /// Evaluate every N epochs (and after the last).
    #[arg(long, default_value_t = defaults::EVAL_EVERY)]
    pub eval_every: usize,
    /// BatchNorm statistics for evaluation: ema (the reference's bias-corrected moving average)
    /// or precise (recomputed over the un-augmented training images before each evaluation;
    /// the moving average lags a network that changes fast, so short runs evaluate poorly with
    /// it); auto: precise for runs of fewer than 10,000 optimiser steps, else ema (presets:
    /// ema). The log and config.json say which was used.
    #[arg(long, value_parser = bn_stats, value_name = "auto|ema|precise", default_value = "auto")]
    pub bn_stats: BnStatsChoice,
    /// Synchronised BatchNorm: in training, normalise with the statistics of the whole global
    /// batch instead of each rank's share (for tiny per-rank batches; costs one small all-reduce
    /// per BatchNorm per step; no effect on one rank).
    #[arg(long)]
    pub sync_bn: bool,
    /// Class hierarchy (`parent child` lines) for reporting the hierarchical accuracy, the mean of
    /// 1 - h(LCS(prediction, truth)) / H, next to top-1.
    #[arg(long)]
    pub hierarchy: Option<PathBuf>,
    /// The hierarchy file has `child parent` lines (as `embed --is-a`).
    #[arg(long, visible_alias = "is-a")]
    pub hierarchy_is_a: bool,
    /// Seed of initialisation, data order and augmentation.
    #[arg(long, default_value_t = defaults::SEED)]
    pub seed: u64,
    /// Device: cpu, cuda (the local rank's GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision: fp32, or bf16 (autocast on the device: a GPU, or a CPU, fast where it has
    /// bfloat16 instructions such as AVX512-BF16 or AMX). Evaluation stays in fp32.
    #[arg(long, value_parser = choice::<Precision>(), default_value = "fp32")]
    pub precision: Precision,
    /// Loader threads (results do not depend on it).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Memory order of images and convolution kernels: channels-last (NHWC) is what GPU
    /// tensor cores want; auto uses it on CUDA devices only. Results agree up to rounding.
    #[arg(long, value_parser = choice::<ChannelsLast>(), default_value = "auto")]
    pub channels_last: ChannelsLast,
    /// libtorch intra-op threads [default: the cores this rank may use, shared among the ranks
    /// of its node when they are not bound to cores].
    #[arg(long, value_parser = threads())]
    pub threads: Option<i32>,
    /// Start from these weights (a run's model.safetensors or a checkpoint's) instead of the
    /// seed's initialisation; every variable must be there with its shape.
    #[arg(long, value_name = "WEIGHTS")]
    pub init_from: Option<PathBuf>,
    /// With --init-from: keep the head (fc, head.*) freshly initialised, e.g. for a dataset
    /// with other classes.
    #[arg(long, requires = "init_from")]
    pub new_head: bool,
    /// Replace a run already in --out.
    #[arg(long)]
    pub force: bool,
    /// Continue the run in --out from a checkpoint: `last` (the newest valid one; the default
    /// when the flag has no value), `auto` (the newest if there is one, else start fresh: what
    /// a requeued Slurm job wants) or a checkpoint directory. The settings come from the run;
    /// options given anyway must agree with them, except a larger --epochs, which extends the
    /// run (its schedule continues as if planned so).
    #[arg(long, num_args = 0..=1, default_missing_value = "last", value_name = "last|auto|DIR")]
    pub resume: Option<ResumeMode>,
    /// Also write a checkpoint every N optimiser steps (one is always written after each
    /// epoch); 0 = epochs only.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Number of checkpoints kept (the newest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_checkpoints: u32,
    /// Steps between the host's reads of the step totals (the loss, its finiteness check, a
    /// stop request). Until a read a GPU runs the steps without waiting for the host; a
    /// non-finite loss or a preemption signal is acted on at the next read. Each epoch's end
    /// and each --checkpoint-every step are read too. 0 = auto: every step on the CPU, every
    /// 16 on a GPU. Results do not depend on it.
    #[arg(long, default_value_t = 0)]
    pub totals_every: u32,
    /// Largest gradient all-reduce call over MPI in MiB (gradients are packed into one buffer
    /// and reduced in pieces of this size; NCCL reduces the whole buffer in one call).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub bucket_mb: u32,
    #[command(flatten)]
    pub job: JobArgs,
}

/// `--aug`: the kind of training crop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugKind {
    Crop,
    Rrc,
}

impl crate::choice::Choice for AugKind {
    const WHAT: &'static str = "augmentation";
    const ALL: &'static [AugKind] = &[AugKind::Crop, AugKind::Rrc];
    fn name(self) -> &'static str {
        match self {
            AugKind::Crop => "crop",
            AugKind::Rrc => "rrc",
        }
    }
}

crate::choice_traits!(AugKind);

/// `MIN,MAX`.
fn scale_range(text: &str) -> Result<(f64, f64), String> {
    let bad = || format!("'{text}': expected MIN,MAX with 0 < MIN <= MAX <= 1, e.g. 0.4,1");
    let (a, b) = text.split_once(',').ok_or_else(bad)?;
    let (a, b): (f64, f64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a > 0.0 && a <= b && b <= 1.0 {
        Ok((a, b))
    } else {
        Err(bad())
    }
}

/// `--bn-stats`: a statistic, or `None` for auto (chosen from the run's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnStatsChoice(pub Option<BnStats>);

fn bn_stats(text: &str) -> Result<BnStatsChoice, String> {
    if text == "auto" {
        return Ok(BnStatsChoice(None));
    }
    <BnStats as crate::choice::Choice>::parse_name(text)
        .map(|b| BnStatsChoice(Some(b)))
        .map_err(|e| e.to_string())
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`).
fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("'{text}': expected on or off")),
    }
}

impl TrainArgs {
    /// What these flags set of a run's configuration. `given(id)` tells whether an option with
    /// a default was given on the command line; only those override a resumed run's settings.
    pub fn overrides(&self, given: &dyn Fn(&str) -> bool) -> Overrides {
        let pick = |id: &str| given(id);
        Overrides {
            preset: self.preset.clone(),
            arch: self.arch,
            loss: self.loss,
            label_smoothing: pick("label_smoothing").then_some(self.label_smoothing),
            cls_weight: pick("cls_weight").then_some(self.cls_weight),
            ce_clip: self.ce_clip,
            embedding: pick("embedding").then(|| self.embedding.clone()),
            lr_max: self.lr_max,
            lr_min: pick("lr_min").then_some(self.lr_min),
            schedule: pick("schedule").then_some(self.schedule),
            epochs: self.epochs,
            sgdr_base: pick("sgdr_base").then_some(self.sgdr_base),
            sgdr_mul: pick("sgdr_mul").then_some(self.sgdr_mul),
            batch_size: self.batch_size,
            clip_norm: pick("clip_norm").then_some(self.clip_norm),
            crop: self.crop,
            flip: self.flip,
            erase_prob: self.erase_prob,
            shift: self.shift,
            eval_every: pick("eval_every").then_some(self.eval_every),
            bn_stats: self.bn_stats.0,
            sync_bn: self.sync_bn,
            hierarchy: self.hierarchy.clone(),
            hierarchy_is_a: self.hierarchy_is_a,
            seed: pick("seed").then_some(self.seed),
            device: pick("device").then_some(self.device),
            precision: pick("precision").then_some(self.precision),
            // Resolved with its file's hash in `resolve_config`.
            init_from: None,
            per_class: self.per_class,
            val: self.val_per_class,
            subset_seed: pick("subset_seed").then_some(self.subset_seed),
            train_repeats: self.train_repeats,
            bn_batch: self.bn_batch,
            weight_decay: self.weight_decay,
            rrc_scale: match (self.aug, self.rrc_scale) {
                (Some(AugKind::Crop), _) => Some((0.0, 0.0)),
                (_, Some(range)) => Some(range),
                (Some(AugKind::Rrc), None) => Some(crate::config::presets::GEM_RRC_SCALE),
                (None, None) => None,
            },
            conv_padding: pick("conv_padding").then_some(self.conv_padding),
        }
    }
}

/// `given(id)`: whether the option `id` was on the command line (not its default).
pub fn run(args: &TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<ExitCode> {
    let config = resolve_config(args, given)?;
    config.device.ensure_available()?;
    let job = Job::join(&args.job.options(), config.device, args.threads)?;
    let result = train_in(&job, args, config);
    match job.finish(result) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<Stopped>() {
            Some(stopped) => {
                if job.comm.rank() == 0 {
                    eprintln!("cosine-train: {e}");
                }
                Ok(ExitCode::from(stopped.exit_code()))
            }
            None => Err(e),
        },
    }
}

/// Trains the run of `args` (resolved into `config`) on this rank of `job`: what `train` does
/// once the job is joined, and what `sweep` does for each cell.
pub fn train_in(job: &Job, args: &TrainArgs, config: RunConfig) -> anyhow::Result<RunSummary> {
    let opts = RunOptions {
        out: args.out.clone(),
        device: job.device,
        workers: args.workers,
        force: args.force,
        bucket_mb: args.bucket_mb as usize,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints as usize,
        totals_every: crate::train::step_totals::interval(args.totals_every, job.device),
        resume: args.resume.clone(),
        channels_last: args.channels_last.resolve(job.device),
    };
    Trainer::new(config, opts, &job.comm).and_then(Trainer::fit)
}

/// The run's configuration: the flags over the resumed run's settings (with `--resume` on a run
/// directory that has them) or over the preset, the data's source and the defaults. Paths are
/// made absolute, so that the run can be evaluated or resumed from any directory.
pub fn resolve_config(args: &TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<RunConfig> {
    let mut flags = args.overrides(given);
    let stored = match args.resume {
        Some(_) if args.out.join(run_dir::CONFIG).exists() => {
            Some(records::read_record(&args.out)?.config)
        }
        _ => None,
    };
    let data = match (&args.data, &stored) {
        (Some(data), _) => absolute(data, "--data")?,
        (None, Some(stored)) => stored.data.clone(),
        (None, None) => {
            return Err(UsageError(format!(
                "--data is needed: {} holds no run to resume (no {})",
                args.out.display(),
                run_dir::CONFIG
            ))
            .into());
        }
    };
    flags.hierarchy = flags
        .hierarchy
        .map(|h| absolute(&h, "--hierarchy"))
        .transpose()?;
    if let Some(weights) = &args.init_from {
        let weights = absolute(weights, "--init-from")?;
        let xxh3 = crate::run_dir::checkpoint::file_hash(&weights)?;
        flags.init_from = Some(InitFrom {
            weights,
            xxh3,
            new_head: args.new_head,
        });
    }
    if let Some(EmbeddingSpec::File(path)) = &flags.embedding {
        flags.embedding = Some(EmbeddingSpec::File(absolute(path, "--embedding")?));
    }
    // A preset given on resume is resolved as for a new run, and must then agree.
    if let Some(stored) = &stored
        && flags.preset.is_none()
    {
        flags = flags.or(Overrides::from_config(stored));
    }
    let (source, train_images) = {
        let shards = datasets_prep::ShardDir::open(&data).with_context(|| {
            format!(
                "--data {}: not a usable shard directory (pack one with `datasets-prep pack`)",
                data.display()
            )
        })?;
        (
            shards.manifest().source.parse::<Source>().ok(),
            shards.manifest().train.per_class.clone(),
        )
    };
    Ok(RunConfig::resolve_for(
        &data,
        &flags,
        source.as_ref(),
        Some(&train_images),
    )?)
}

/// `path` made absolute and canonical; an error names the option.
fn absolute(path: &Path, option: &str) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{option} {}", path.display()))
}
