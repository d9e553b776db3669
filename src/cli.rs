//! The command line: clap definitions only. Each subcommand's work lives in its own module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::runtime::device::DeviceChoice;
use crate::dist::Backend;

/// Exit status documented in `--help`.
pub const EXIT_CODES: &str = "\
EXIT STATUS:
    0  success
    1  failure (bad input, failed check, error during a run; in a multi-rank job the failing
       rank's message is printed and every rank is ended)
    2  usage error (unknown option or bad value)
    3  a collective did not complete within --collective-timeout (another rank died or hangs)
   75  stopped by SIGTERM or SIGUSR1 after writing a checkpoint: resume with --resume auto";

/// `--channels-last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelsLast {
    /// On for CUDA devices, off on CPUs.
    Auto,
    On,
    Off,
}

impl ChannelsLast {
    /// Whether to use channels-last memory order on `device`.
    pub fn resolve(self, device: tch::Device) -> bool {
        match self {
            ChannelsLast::Auto => device.is_cuda(),
            ChannelsLast::On => true,
            ChannelsLast::Off => false,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cosine-train",
    version,
    about = "Train image classifiers from scratch on small datasets (cosine loss and friends), \
             from one CPU to many GPU nodes under mpirun or Slurm.",
    after_help = EXIT_CODES,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what this binary runs on: libtorch, CUDA, MPI, NCCL, threads.
    Doctor(DoctorArgs),
    /// Check collectives across the ranks of this job (run under mpirun/srun): all-reduce,
    /// byte broadcast, barrier. Prints one JSON line per rank.
    CheckDist(CheckDistArgs),
    /// Train a model on a shard directory and write a run directory.
    Train(Box<TrainArgs>),
    /// Evaluate saved weights (a run's model.safetensors) on the test split, exactly, with any
    /// number of ranks. Prints one JSON object.
    Eval(Box<EvalArgs>),
    /// Time the compute-only training step (synthetic batch on the device, no data loading) and,
    /// under mpirun, the gradient all-reduce. Prints one JSON object (rank 0).
    BenchStep(BenchStepArgs),
    /// Time the data loader alone: ready training batches per second from a shard directory.
    BenchLoader(BenchLoaderArgs),
    /// Compare runs: a markdown table of best and last accuracy, balanced accuracy, epochs,
    /// speed and wall time per run, optionally as CSV, and a PNG of test accuracy, training loss
    /// and learning rate per epoch. Missing or unfinished runs are reported, not fatal.
    Report(ReportArgs),
    /// Compute the unit-sphere class embedding of a class hierarchy (rows = leaves by id).
    Embed(EmbedArgs),
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Hierarchy file: one `parent child` pair of integer ids per line.
    #[arg(long)]
    pub hierarchy: PathBuf,
    /// The file has `child parent` lines instead (as NABirds' hierarchy.txt).
    #[arg(long)]
    pub is_a: bool,
    /// Output .npy (float64, C x C); the class ids of its rows go to the same name with
    /// `.ids.txt` instead of `.npy`.
    #[arg(long)]
    pub out: PathBuf,
}

/// `train` options. Every option left out comes from `--preset`, then from the defaults shown.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Shard directory written by `datasets-prep pack`.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory to create (config.json, metrics.jsonl, log.txt).
    #[arg(long)]
    pub out: PathBuf,
    /// A paper protocol, e.g. paper-cub-cosine (sets arch, loss, crop, batch, schedule, lr).
    #[arg(long)]
    pub preset: Option<String>,
    /// Architecture [default: resnet20]: resnet50, resnet8, resnet20, resnet32, resnet56, resnet110, resnet110-wfc.
    #[arg(long)]
    pub arch: Option<String>,
    /// Objective [default: cosine]: ce, ce-ls, cosine, cosine-ce.
    #[arg(long)]
    pub loss: Option<String>,
    /// Label smoothing of ce-ls.
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Weight of the cross-entropy head in cosine-ce.
    #[arg(long, default_value_t = 0.1)]
    pub cls_weight: f64,
    /// Cross-entropy exactly as the reference's Keras: probabilities clipped to [1e-7, 1-1e-7]
    /// before the log (no gradient from samples beyond); default is the log-softmax form.
    #[arg(long)]
    pub ce_clip: bool,
    /// Class embeddings of the cosine losses: onehot, a .npy C x D matrix in class order, or a
    /// reference pickle (embedding + ind2label).
    #[arg(long, default_value = "onehot")]
    pub embedding: String,
    /// Maximum learning rate [default: 0.1].
    #[arg(long)]
    pub lr_max: Option<f64>,
    /// Minimum learning rate of the schedule.
    #[arg(long, default_value_t = 1e-6)]
    pub lr_min: f64,
    /// Learning-rate schedule: sgdr (per epoch, restarts) or cosine-steps (one decay, per step).
    #[arg(long, default_value = "sgdr")]
    pub schedule: String,
    /// Epochs [default: 372 with a preset; else 2 SGDR cycles].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Length of the first SGDR cycle in epochs.
    #[arg(long, default_value_t = 12)]
    pub sgdr_base: usize,
    /// Growth factor of SGDR cycle lengths.
    #[arg(long, default_value_t = 2)]
    pub sgdr_mul: usize,
    /// Global batch size [default: 100].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Global gradient-norm clip; 0 disables.
    #[arg(long, default_value_t = 10.0)]
    pub clip_norm: f64,
    /// Square crop size; 0 keeps the stored size [default: from the dataset's source].
    #[arg(long)]
    pub crop: Option<u32>,
    /// Horizontal flips: on or off [default: from the dataset's source].
    #[arg(long)]
    pub flip: Option<bool>,
    /// Random-erasing probability [default: from the dataset's source].
    #[arg(long)]
    pub erase_prob: Option<f64>,
    /// Random shift as a fraction of the size [default: from the dataset's source].
    #[arg(long)]
    pub shift: Option<f64>,
    /// Evaluate every N epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    pub eval_every: usize,
    /// BatchNorm statistics for evaluation: ema (the reference's bias-corrected moving average)
    /// or precise (recomputed over the un-augmented training images before each evaluation;
    /// better when a run has few steps, cheap on small datasets).
    #[arg(long, default_value = "ema", value_parser = ["ema", "precise"])]
    pub bn_stats: String,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda (the local rank's GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision: fp32, or bf16 (autocast on the device: a GPU, or a CPU, fast where it has
    /// bfloat16 instructions such as AVX512-BF16 or AMX). Evaluation stays in fp32.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    pub precision: String,
    /// Loader threads (results do not depend on it).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Memory order of images and convolution kernels: channels-last (NHWC) is what GPU
    /// tensor cores want; auto uses it on CUDA devices only. Results agree up to rounding.
    #[arg(long, value_enum, default_value_t = ChannelsLast::Auto)]
    pub channels_last: ChannelsLast,
    /// libtorch intra-op threads [default: the cores this rank may use, shared among the ranks
    /// of its node when they are not bound to cores].
    #[arg(long)]
    pub threads: Option<i32>,
    /// Replace a run already in --out.
    #[arg(long)]
    pub force: bool,
    /// Continue the run in --out from a checkpoint: `last` (the newest valid one; the default
    /// when the flag has no value), `auto` (the newest if there is one, else start fresh: what
    /// a requeued Slurm job wants) or a checkpoint directory. Settings that change the result
    /// must be the same as the checkpoint's.
    #[arg(long, num_args = 0..=1, default_missing_value = "last", value_name = "last|auto|DIR")]
    pub resume: Option<crate::train::resume::ResumeMode>,
    /// Also write a checkpoint every N optimiser steps (one is always written after each
    /// epoch); 0 = epochs only.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Number of checkpoints kept (the newest).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    #[command(flatten)]
    pub job: JobArgs,
}

/// How a process joins its job (every subcommand that runs on several ranks).
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Communication backend: auto is NCCL with --device cuda and MPI otherwise; single runs
    /// one process without MPI. Rank, world size and local rank always come from MPI itself.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub dist: Backend,
    /// Seconds a collective may wait for the other ranks before the whole job is ended (exit
    /// status 3) with a message naming the collective; 0 waits forever.
    #[arg(long, default_value_t = 300.0)]
    pub collective_timeout: f64,
    /// Largest gradient all-reduce call in MiB (gradients are packed into one buffer and
    /// reduced in pieces of this size).
    #[arg(long, default_value_t = 64)]
    pub bucket_mb: usize,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory written by `train` (its config.json says how to build the model).
    #[arg(long)]
    pub run: PathBuf,
    /// Weights to evaluate [default: RUN/model.safetensors].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Shard directory [default: the run's --data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Images per forward pass on each rank [default: the run's batch size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Device: cpu, cuda (the local rank's GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// libtorch intra-op threads [default: the cores this rank may use].
    #[arg(long)]
    pub threads: Option<i32>,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Args)]
pub struct BenchLoaderArgs {
    /// Shard directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Timed passes over the training split (after one untimed pass).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Square random crop (with flips and random erasing, as for the fine-grained datasets);
    /// 0 keeps the stored size.
    #[arg(long, default_value_t = 448)]
    pub crop: u32,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories (each with config.json and metrics.jsonl), e.g. `runs/sweep/lr-*`.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Also write the table as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw test top-1, training loss and learning rate per epoch into this PNG (1200x900).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchStepArgs {
    /// Architecture (as `train --arch`).
    #[arg(long, default_value = "resnet20")]
    pub arch: String,
    /// Objective (as `train --loss`).
    #[arg(long, default_value = "ce")]
    pub loss: String,
    /// Images per step.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: i64,
    /// Image channels.
    #[arg(long, default_value_t = 3)]
    pub channels: i64,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// libtorch intra-op threads [default: the cores this rank may use].
    #[arg(long)]
    pub threads: Option<i32>,
    /// Precision: fp32, or bf16 (autocast, as `train --precision`).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    pub precision: String,
    /// Memory order (as `train --channels-last`).
    #[arg(long, value_enum, default_value_t = ChannelsLast::Auto)]
    pub channels_last: ChannelsLast,
    /// With several ranks, time whole steps (compute and gradient all-reduce, no barrier
    /// between them), as a training job sees them.
    #[arg(long)]
    pub whole_step: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckDistArgs {
    /// Communication backend: auto picks NCCL for CUDA devices and MPI otherwise.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub dist: Backend,
    /// Device of the tensors: cpu, cuda (the local rank's GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Number of f32 elements in the all-reduce.
    #[arg(long, default_value_t = 1 << 20)]
    pub elements: usize,
    /// Number of bytes broadcast from rank 0.
    #[arg(long, default_value_t = (1 << 20) + 3)]
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_check_dist_options() {
        let cli = Cli::try_parse_from([
            "cosine-train",
            "check-dist",
            "--dist",
            "nccl",
            "--device",
            "cuda:1",
            "--elements",
            "10",
        ])
        .unwrap();
        let Command::CheckDist(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.dist, Backend::Nccl);
        assert_eq!(args.device, DeviceChoice::Cuda(Some(1)));
        assert_eq!(args.elements, 10);
    }

    #[test]
    fn rejects_unknown_backend_listing_valid_ones() {
        let err =
            Cli::try_parse_from(["cosine-train", "check-dist", "--dist", "gloo"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("mpi") && text.contains("nccl"), "{text}");
    }
}
