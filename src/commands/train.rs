//! `cosine-train train`: flags into an [`Overrides`], resolved against the data's source into a
//! [`RunConfig`], then one [`Trainer`] on this rank of the job.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use datasets_prep::sources::Source;

use super::{ChannelsLast, JobArgs, choice, preset, threads};
use crate::config::{BnStats, EmbeddingSpec, Overrides, Precision, Preset, RunConfig, defaults};
use crate::dist::Communicator;
use crate::dist::job::Job;
use crate::model::Arch;
use crate::objective::LossKind;
use crate::run_dir::checkpoint::ResumeMode;
use crate::runtime::device::DeviceChoice;
use crate::runtime::signals::{EXIT_PREEMPTED, Stopped};
use crate::schedule::ScheduleKind;
use crate::train::{RunOptions, Trainer};

/// `train` options. Every option left out comes from `--preset`, then from the data's source,
/// then from the defaults shown.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Shard directory written by `datasets-prep pack`.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory to create (config.json, metrics.jsonl, log.txt, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// A paper protocol (sets arch, loss, batch, epochs, lr and augmentation).
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
    /// Maximum learning rate [default: 0.1].
    #[arg(long)]
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
    /// Horizontal flips: true or false [default: from the dataset's source].
    #[arg(long)]
    pub flip: Option<bool>,
    /// Random-erasing probability [default: from the dataset's source].
    #[arg(long)]
    pub erase_prob: Option<f64>,
    /// Random shift as a fraction of the size [default: from the dataset's source].
    #[arg(long)]
    pub shift: Option<f64>,
    /// Evaluate every N epochs (and after the last).
    #[arg(long, default_value_t = defaults::EVAL_EVERY)]
    pub eval_every: usize,
    /// BatchNorm statistics for evaluation: ema (the reference's bias-corrected moving average)
    /// or precise (recomputed over the un-augmented training images before each evaluation;
    /// better when a run has few steps, cheap on small datasets).
    #[arg(long, value_parser = choice::<BnStats>(), default_value = "ema")]
    pub bn_stats: BnStats,
    /// Synchronised BatchNorm: in training, normalise with the statistics of the whole global
    /// batch instead of each rank's share (for tiny per-rank batches; costs one small all-reduce
    /// per BatchNorm per step; no effect on one rank).
    #[arg(long)]
    pub sync_bn: bool,
    /// Class hierarchy (`parent child` lines) for reporting the hierarchical accuracy, the mean of
    /// 1 - h(LCS(prediction, truth)) / H, next to top-1.
    #[arg(long)]
    pub hierarchy: Option<PathBuf>,
    /// The hierarchy file has `child parent` lines.
    #[arg(long)]
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
    /// Replace a run already in --out.
    #[arg(long)]
    pub force: bool,
    /// Continue the run in --out from a checkpoint: `last` (the newest valid one; the default
    /// when the flag has no value), `auto` (the newest if there is one, else start fresh: what
    /// a requeued Slurm job wants) or a checkpoint directory. Settings that change the result
    /// must be the same as the checkpoint's.
    #[arg(long, num_args = 0..=1, default_missing_value = "last", value_name = "last|auto|DIR")]
    pub resume: Option<ResumeMode>,
    /// Also write a checkpoint every N optimiser steps (one is always written after each
    /// epoch); 0 = epochs only.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Number of checkpoints kept (the newest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_checkpoints: u32,
    #[command(flatten)]
    pub job: JobArgs,
}

impl TrainArgs {
    /// What these flags set of a run's configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            preset: self.preset.clone(),
            arch: self.arch,
            loss: self.loss,
            label_smoothing: Some(self.label_smoothing),
            cls_weight: Some(self.cls_weight),
            ce_clip: self.ce_clip,
            embedding: Some(self.embedding.clone()),
            lr_max: self.lr_max,
            lr_min: Some(self.lr_min),
            schedule: Some(self.schedule),
            epochs: self.epochs,
            sgdr_base: Some(self.sgdr_base),
            sgdr_mul: Some(self.sgdr_mul),
            batch_size: self.batch_size,
            clip_norm: Some(self.clip_norm),
            crop: self.crop,
            flip: self.flip,
            erase_prob: self.erase_prob,
            shift: self.shift,
            eval_every: Some(self.eval_every),
            bn_stats: Some(self.bn_stats),
            sync_bn: self.sync_bn,
            hierarchy: self.hierarchy.clone(),
            hierarchy_is_a: self.hierarchy_is_a,
            seed: Some(self.seed),
            device: Some(self.device),
            precision: Some(self.precision),
        }
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    args.device.ensure_available()?;
    let source = {
        let shards = datasets_prep::ShardDir::open(&args.data).with_context(|| {
            format!(
                "--data {}: not a usable shard directory",
                args.data.display()
            )
        })?;
        shards.manifest().source.parse::<Source>().ok()
    };
    let config = RunConfig::resolve(&args.data, &args.overrides(), source.as_ref())?;
    let job = Job::join(&args.job.options(), args.device, args.threads)?;
    let opts = RunOptions {
        out: args.out.clone(),
        device: job.device,
        workers: args.workers,
        force: args.force,
        bucket_mb: args.job.bucket_mb as usize,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints as usize,
        resume: args.resume.clone(),
        channels_last: args.channels_last.resolve(job.device),
    };
    let result = Trainer::new(config, opts, &job.comm).and_then(Trainer::fit);
    match job.finish(result) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is::<Stopped>() => {
            if job.comm.rank() == 0 {
                eprintln!("cosine-train: {e}");
            }
            Ok(ExitCode::from(EXIT_PREEMPTED as u8))
        }
        Err(e) => Err(e),
    }
}
