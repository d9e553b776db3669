//! `cosine-train report RUN_DIR...`: the comparison table on stdout, CSV and PNG where asked.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::report::{RunInfo, csv, markdown, plot::plot, read_runs};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories (each with config.json and metrics.jsonl), e.g. `runs/a runs/b`, or one
    /// sweep directory (with sweep.json): then the table has a row per loss and a column per
    /// dataset, at the learning rate chosen on validation, with 95% intervals over seeds.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Also write the table as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw test top-1, training loss and learning rate per epoch into this PNG (1200x900). For
    /// a sweep: test top-1 against the learning rate, and beside it (`NAME-per-class.png`)
    /// against images per class when that is an axis.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    if let [dir] = &args.runs[..]
        && crate::run_dir::sweep::is_sweep(dir)
    {
        return sweep_report(dir, args);
    }
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

/// The report of a sweep directory: the Table-2-shaped markdown, the per-cell CSV, the plots.
fn sweep_report(dir: &std::path::Path, args: &ReportArgs) -> anyhow::Result<ExitCode> {
    use crate::report::{plot::curves, sweep};
    let report = sweep::read(dir)?;
    print!("{}", sweep::markdown(dir, &report));
    if let Some(path) = &args.csv {
        datasets_prep::atomic::write_file(path, sweep::csv(&report).as_bytes())?;
    }
    if let Some(path) = &args.plot {
        let by_rate = sweep::rate_curves(&report);
        if by_rate.is_empty() {
            eprintln!("cosine-train: no finished cell with a learning rate axis; no plot written");
        } else {
            curves(
                path,
                "test top-1 against the learning rate",
                "max learning rate",
                true,
                &by_rate,
            )?;
            eprintln!("cosine-train: plot written to {}", path.display());
        }
        let by_size = sweep::per_class_curves(&report);
        if !by_size.is_empty() {
            let stem = path
                .file_stem()
                .map_or_else(|| "plot".into(), |s| s.to_string_lossy());
            let sized = path.with_file_name(format!("{stem}-per-class.png"));
            curves(
                &sized,
                "test top-1 against images per class",
                "training images per class",
                true,
                &by_size,
            )?;
            eprintln!("cosine-train: plot written to {}", sized.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
