//! `cosine-train sweep`: a grid of training runs (losses x learning rates x seeds x subsets ...)
//! as one job. Every cell is an ordinary run directory `OUT/<cell>/`, trained exactly as
//! `cosine-train train` with the same options and ranks would (all ranks of the job train each
//! cell in turn, data-parallel), and `OUT/sweep.json` records the grid and each cell's state.
//! Running the same command again continues: finished cells whose configuration still matches
//! are kept, unfinished ones resume from their checkpoints, and a cell whose configuration
//! changed is refused with the difference (or trained anew with `--rerun-changed`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches};
use serde::{Deserialize, Serialize};

use super::train::{TrainArgs, resolve_config, train_in};
use super::{Cli, Command, UsageError};
use crate::config::RunConfig;
use crate::dist::Communicator;
use crate::dist::job::Job;
use crate::run_dir::checkpoint::ResumeMode;
use crate::run_dir::records;
use crate::runtime::signals::Stopped;

/// The reference's learning-rate grid (`--axis lr-max=paper`, reference-spec 4.5).
pub const PAPER_RATES: [&str; 8] = ["2.5", "1.0", "0.5", "0.1", "0.05", "0.01", "0.005", "0.001"];

/// `sweep` options.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Directory of the sweep: sweep.json and one run directory per cell.
    #[arg(long)]
    pub out: PathBuf,
    /// A grid axis: a `train` option and its values, e.g. loss=ce,cosine or seed=0,1,2;
    /// lr-max=paper is the paper's 8 rates, per-class=all the whole split. Repeat for more
    /// axes: the grid is every combination.
    #[arg(long = "axis", value_name = "OPTION=V1,V2,...", required = true)]
    pub axes: Vec<String>,
    /// Train a cell anew when its stored configuration differs from the grid's (default:
    /// refuse, naming the difference).
    #[arg(long)]
    pub rerun_changed: bool,
    /// Options every cell gets, after `--` (as for `train`; not --out).
    #[arg(last = true, value_name = "TRAIN OPTIONS")]
    pub train: Vec<String>,
}

/// One grid axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub option: String,
    pub values: Vec<String>,
}

/// Where a cell stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellState {
    Pending,
    Running,
    Finished,
    Failed,
}

/// One cell of `sweep.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub name: String,
    /// The cell's own options (the axes' values), as given to `train`.
    pub args: Vec<String>,
    pub state: CellState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_top1: Option<f64>,
}

/// `sweep.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub axes: Vec<Axis>,
    /// The options every cell gets.
    pub common: Vec<String>,
    pub cells: Vec<Cell>,
}

/// The file name of the sweep's record.
pub const SWEEP: &str = "sweep.json";

/// Parses `OPTION=V1,V2`.
pub fn parse_axis(text: &str) -> Result<Axis, UsageError> {
    let bad = |why: &str| UsageError(format!("--axis {text}: {why}"));
    let (option, values) = text
        .split_once('=')
        .ok_or_else(|| bad("expected OPTION=V1,V2,... (e.g. loss=ce,cosine)"))?;
    let option = option.trim().trim_start_matches("--").to_string();
    if option.is_empty() || option == "out" || option == "resume" || option == "force" {
        return Err(bad("not an option a grid can vary"));
    }
    let mut values: Vec<String> = values
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if option == "lr-max" && values == ["paper"] {
        values = PAPER_RATES.iter().map(|v| v.to_string()).collect();
    }
    if option == "per-class" {
        for v in &mut values {
            if v == "all" {
                *v = "0".into();
            }
        }
    }
    if values.is_empty() {
        return Err(bad("no values"));
    }
    Ok(Axis { option, values })
}

/// Every combination of the axes' values (the first axis varies slowest), with its name.
pub fn cells(axes: &[Axis]) -> Vec<Cell> {
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for axis in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                axis.values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((axis.option.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    combos
        .into_iter()
        .map(|pairs| Cell {
            name: pairs
                .iter()
                .map(|(o, v)| format!("{o}-{}", file_safe(v)))
                .collect::<Vec<_>>()
                .join("_"),
            args: pairs
                .iter()
                .flat_map(|(o, v)| [format!("--{o}"), v.clone()])
                .collect(),
            state: CellState::Pending,
            error: None,
            best_top1: None,
        })
        .collect()
}

/// A value as part of a directory name (paths become their last component).
fn file_safe(value: &str) -> String {
    let last = Path::new(value)
        .file_name()
        .map_or(value.to_string(), |n| n.to_string_lossy().into_owned());
    last.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-+".contains(c) {
                c
            } else {
                '+'
            }
        })
        .collect()
}

/// The `train` arguments of a cell, parsed as the command line would be, with `given`.
fn parse_cell(
    out: &Path,
    common: &[String],
    cell: &Cell,
) -> anyhow::Result<(TrainArgs, Vec<String>)> {
    let mut argv: Vec<String> = vec!["cosine-train".into(), "train".into(), "--out".into()];
    argv.push(out.join(&cell.name).display().to_string());
    argv.extend(common.iter().cloned());
    argv.extend(cell.args.iter().cloned());
    let matches = Cli::command().try_get_matches_from(&argv).map_err(|e| {
        UsageError(format!(
            "cell {}: {}",
            cell.name,
            e.render().to_string().trim()
        ))
    })?;
    let given: Vec<String> = matches
        .subcommand()
        .map(|(_, m)| {
            m.ids()
                .filter(|id| {
                    m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    match Cli::from_arg_matches(&matches)?.command {
        Command::Train(args) => Ok((*args, given)),
        _ => unreachable!("the argument vector names the train command"),
    }
}

/// How the resolved configurations of a stored run and the grid's differ, as `key: a -> b`.
fn difference(stored: &RunConfig, wanted: &RunConfig) -> String {
    let (a, b) = (
        serde_json::to_value(stored).unwrap_or_default(),
        serde_json::to_value(wanted).unwrap_or_default(),
    );
    let keys: std::collections::BTreeSet<&String> = a
        .as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|o| o.keys())
        .collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".into(), |v| v.to_string());
            format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the sweep; exit status 0 when every cell finished, 1 when some failed, 75 when stopped.
pub fn run(args: &SweepArgs) -> anyhow::Result<ExitCode> {
    let axes = args
        .axes
        .iter()
        .map(|a| parse_axis(a))
        .collect::<Result<Vec<_>, _>>()?;
    if args
        .train
        .iter()
        .any(|a| a == "--out" || a.starts_with("--out="))
    {
        return Err(UsageError(
            "sweep: --out goes before --, the cells' directories are made inside it".into(),
        )
        .into());
    }
    let mut record = SweepRecord {
        axes: axes.clone(),
        common: args.train.clone(),
        cells: cells(&axes),
    };
    let mut parsed = Vec::with_capacity(record.cells.len());
    for cell in &record.cells {
        parsed.push(parse_cell(&args.out, &args.train, cell)?);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create", args.out.display()))?;
    let (first, _) = &parsed[0];
    let device = resolve_config(first, &|id| parsed[0].1.iter().any(|g| g == id))?.device;
    device.ensure_available()?;
    let job = Job::join(&first.job.options(), device, first.threads)?;
    let lead = job.comm.rank() == 0;
    let write = |record: &SweepRecord| -> anyhow::Result<()> {
        if lead {
            datasets_prep::atomic::write_file(
                &args.out.join(SWEEP),
                serde_json::to_string_pretty(record)?.as_bytes(),
            )?;
        }
        Ok(())
    };
    write(&record)?;
    let mut failed = 0;
    for (k, (mut train, given)) in parsed.into_iter().enumerate() {
        let given_fn = |id: &str| given.iter().any(|g| g == id);
        let dir = train.out.clone();
        let name = record.cells[k].name.clone();
        let config = match resolve_config(&train, &given_fn) {
            Ok(c) => c,
            Err(e) => {
                // Resolution is the same on every rank and touches no collective.
                record.cells[k].state = CellState::Failed;
                record.cells[k].error = Some(format!("{e:#}"));
                failed += 1;
                if lead {
                    eprintln!("sweep: cell {name} failed: {e:#}");
                }
                write(&record)?;
                continue;
            }
        };
        if dir.join(crate::run_dir::CONFIG).exists() {
            let stored = records::read_record(&dir)?.config;
            let finished = records::read_metrics(&dir)
                .ok()
                .and_then(|m| m.summary)
                .map(|s| s.best_top1);
            if stored != config {
                if !args.rerun_changed {
                    return Err(UsageError(format!(
                        "sweep: cell {name} ({}) was run with other settings ({}); rerun \
                         with --rerun-changed to train it anew",
                        dir.display(),
                        difference(&stored, &config)
                    ))
                    .into());
                }
                train.force = true;
            } else if let Some(best) = finished {
                record.cells[k].state = CellState::Finished;
                record.cells[k].best_top1 = best;
                if lead {
                    eprintln!("sweep: cell {name} finished earlier with the same settings: kept");
                }
                write(&record)?;
                continue;
            } else {
                train.resume = Some(ResumeMode::Auto);
            }
        }
        record.cells[k].state = CellState::Running;
        write(&record)?;
        if lead {
            eprintln!("sweep: cell {} of {}: {name}", k + 1, record.cells.len());
        }
        match train_in(&job, &train, config) {
            Ok(summary) => {
                record.cells[k].state = CellState::Finished;
                record.cells[k].best_top1 = Some(summary.best_top1).filter(|v| !v.is_nan());
                record.cells[k].error = None;
            }
            Err(e) if e.is::<Stopped>() => {
                record.cells[k].state = CellState::Pending;
                write(&record)?;
                let code = e.downcast_ref::<Stopped>().map_or(75, Stopped::exit_code);
                if lead {
                    eprintln!("cosine-train: {e}; the same sweep command continues the grid");
                }
                return Ok(ExitCode::from(code));
            }
            // One process: a failed cell is recorded and the grid goes on. Several ranks: the
            // failure may be this rank's alone, and the others may wait in a collective.
            Err(e) if job.comm.size() == 1 => {
                record.cells[k].state = CellState::Failed;
                record.cells[k].error = Some(format!("{e:#}"));
                failed += 1;
                eprintln!("sweep: cell {name} failed: {e:#}");
            }
            Err(e) => return job.finish(Err(e)),
        }
        write(&record)?;
    }
    if lead {
        eprintln!(
            "sweep: {} cells, {} finished, {failed} failed ({})",
            record.cells.len(),
            record.cells.len() - failed,
            args.out.join(SWEEP).display()
        );
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_expand_to_every_combination_with_readable_names() {
        let axes = [
            parse_axis("loss=ce,cosine").unwrap(),
            parse_axis("--seed=0,1,2").unwrap(),
        ];
        let grid = cells(&axes);
        assert_eq!(grid.len(), 6);
        assert_eq!(grid[0].name, "loss-ce_seed-0");
        assert_eq!(grid[5].name, "loss-cosine_seed-2");
        assert_eq!(grid[4].args, ["--loss", "cosine", "--seed", "1"]);
        assert_eq!(parse_axis("lr-max=paper").unwrap().values.len(), 8);
        assert_eq!(parse_axis("per-class=1,all").unwrap().values, ["1", "0"]);
        assert!(parse_axis("out=a,b").is_err());
        assert!(parse_axis("loss").is_err());
        let data = parse_axis("data=/x/cub,/y/nab").unwrap();
        assert_eq!(cells(&[data])[1].name, "data-nab");
    }
}
