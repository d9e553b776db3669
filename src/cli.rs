//! The command line: clap definitions only. Each subcommand's work lives in its own module.

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceChoice;
use crate::dist::Backend;

/// Exit status documented in `--help`.
pub const EXIT_CODES: &str = "\
EXIT STATUS:
    0  success
    1  failure (bad input, failed check, error during a run)
    2  usage error (unknown option or bad value)";

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
