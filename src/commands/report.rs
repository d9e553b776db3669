//! `cosine-train report RUN_DIR...`: the comparison table on stdout, CSV and PNG where asked.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::report::{RunInfo, csv, markdown, plot::plot, read_runs};

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

pub fn run(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let runs: Vec<RunInfo> = read_runs(&args.runs);
    print!("{}", markdown(&runs));
    if let Some(path) = &args.csv {
        datasets_prep::atomic::write_file(path, csv(&runs).as_bytes())?;
    }
    if let Some(path) = &args.plot {
        if runs.iter().all(|r| r.points.is_empty()) {
            eprintln!("cosine-train: no run has an epoch yet; no plot written");
        } else {
            plot(&runs, path)?;
            eprintln!("cosine-train: plot written to {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
