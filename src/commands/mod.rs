//! The command layer: clap's definitions, the turning of every flag into its type, and one
//! function per subcommand. The library below never sees clap; `main.rs` only calls [`run`].

pub mod bench_loader;
pub mod bench_step;
pub mod check_dist;
pub mod doctor;
pub mod embed;
pub mod eval;
pub mod predict;
pub mod report;
pub mod sweep;
pub mod train;

use std::process::ExitCode;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::choice::{Choice, UnknownChoice};
use crate::config::{ConfigError, Preset, UnknownPreset, preset_names};
use crate::dist::Backend;
use crate::dist::job::JobOptions;

/// Exit status documented in `--help`.
pub const EXIT_CODES: &str = "\
EXIT STATUS:
    0  success
    1  failure (bad input, failed check, error during a run; in a multi-rank job the failing
       rank's message is printed and every rank is ended)
    2  usage error (unknown option, bad value, or values no run can have)
    3  a collective did not complete within --collective-timeout (another rank died or hangs)
   75  stopped by SIGTERM or SIGUSR1 after writing a checkpoint: resume with --resume
  130  stopped by Ctrl-C (SIGINT) after writing a checkpoint (a second Ctrl-C exits at once)";

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
    Doctor(doctor::DoctorArgs),
    /// Check collectives across the ranks of this job (run under mpirun/srun): all-reduce,
    /// byte broadcast, barrier. Prints one JSON line per rank.
    CheckDist(check_dist::CheckDistArgs),
    /// Train a model on a shard directory and write a run directory.
    Train(Box<train::TrainArgs>),
    /// Evaluate saved weights (a run's model.safetensors) on the test split, exactly, with any
    /// number of ranks. Prints one JSON object.
    Eval(Box<eval::EvalArgs>),
    /// Classify image files (or folders of them) with a trained run: the top classes and
    /// their scores per image, as a table, JSON lines or CSV.
    Predict(predict::PredictArgs),
    /// Time the training step (synthetic batch on the device, no data loading) and, under
    /// mpirun, the gradient all-reduce. Prints one JSON object (rank 0).
    BenchStep(bench_step::BenchStepArgs),
    /// Time the data loader alone: ready training batches per second from a shard directory.
    BenchLoader(bench_loader::BenchLoaderArgs),
    /// Compare runs: a markdown table of best and last accuracy, balanced accuracy, epochs,
    /// speed and wall time per run, optionally as CSV, and a PNG of test accuracy, training loss
    /// and learning rate per epoch. Missing or unfinished runs are reported, not fatal.
    Report(report::ReportArgs),
    /// Compute the unit-sphere class embedding of a class hierarchy (rows = leaves by id).
    Embed(embed::EmbedArgs),
    /// Train a grid of runs (every combination of --axis values, a --grid file, or the paper's
    /// Table 2) as one job: one run directory per cell and OUT/sweep.json; the same command
    /// again continues an interrupted grid.
    Sweep(Box<sweep::SweepArgs>),
}

/// Runs the parsed command line.
/// Runs the parsed command line; `matches` is what it was parsed from (to tell options given
/// from defaults).
pub fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    let sub = matches.subcommand().map(|(_, m)| m);
    let given = |id: &str| {
        sub.and_then(|m| m.value_source(id)) == Some(clap::parser::ValueSource::CommandLine)
    };
    match cli.command {
        Command::Doctor(args) => doctor::run(&args),
        Command::CheckDist(args) => check_dist::run(&args),
        Command::Train(args) => train::run(&args, &given),
        Command::Eval(args) => eval::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::BenchStep(args) => bench_step::run(&args),
        Command::BenchLoader(args) => bench_loader::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Embed(args) => embed::run(&args),
        Command::Sweep(args) => sweep::run(&args),
    }
}

/// A bad value or combination of options found after parsing (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit status for an error: 2 for usage errors, 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    let usage = err.chain().any(|c| {
        c.is::<UsageError>()
            || c.is::<ConfigError>()
            || c.is::<UnknownChoice>()
            || c.is::<UnknownPreset>()
    });
    if usage {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// The value parser of a [`Choice`]: clap lists the accepted words in `--help` and in the
/// error for any other word (exit status 2).
pub fn choice<T: Choice + Clone + Send + Sync>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::names())
        .map(|word| T::parse_name(&word).expect("clap accepted one of the possible values"))
}

/// The value parser of `--preset`.
pub fn preset() -> impl TypedValueParser<Value = Preset> {
    PossibleValuesParser::new(preset_names())
        .map(|name| name.parse().expect("clap accepted one of the preset names"))
}

/// Seconds >= 0.
pub(crate) fn seconds(text: &str) -> Result<Duration, String> {
    let s: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(s).map_err(|_| format!("'{text}': expected seconds >= 0"))
}

/// `--channels-last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelsLast {
    /// On for CUDA devices, off on CPUs.
    Auto,
    On,
    Off,
}

impl Choice for ChannelsLast {
    const WHAT: &'static str = "memory order";
    const ALL: &'static [ChannelsLast] = &[ChannelsLast::Auto, ChannelsLast::On, ChannelsLast::Off];
    fn name(self) -> &'static str {
        match self {
            ChannelsLast::Auto => "auto",
            ChannelsLast::On => "on",
            ChannelsLast::Off => "off",
        }
    }
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

/// How a process joins its job (every subcommand that runs on several ranks).
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Communication backend: auto is NCCL with --device cuda and MPI otherwise; single runs
    /// one process without MPI. Rank, world size and local rank always come from MPI itself.
    #[arg(long, value_parser = choice::<Backend>(), default_value = "auto")]
    pub dist: Backend,
    /// Seconds a collective may wait for the other ranks before the whole job is ended (exit
    /// status 3) with a message naming the collective; 0 waits forever. On NCCL, whose
    /// gradient all-reduces are queued on the GPU, it also bounds the steps queued between two
    /// reads of the step totals (--totals-every).
    #[arg(long, value_parser = seconds, default_value = "300")]
    pub collective_timeout: Duration,
}

impl JobArgs {
    pub fn options(&self) -> JobOptions {
        JobOptions {
            backend: self.dist,
            collective_timeout: self.collective_timeout,
        }
    }
}

/// libtorch intra-op threads: at least 1.
pub fn threads() -> clap::builder::RangedI64ValueParser<i32> {
    clap::value_parser!(i32).range(1..=4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::device::DeviceChoice;
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
    fn rejects_unknown_values_listing_valid_ones() {
        let err =
            Cli::try_parse_from(["cosine-train", "check-dist", "--dist", "gloo"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("mpi") && text.contains("nccl"), "{text}");
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from([
            "cosine-train",
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--loss",
            "hinge",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("cosine-ce"), "{err}");
    }
}
