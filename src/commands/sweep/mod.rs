//! `cosine-train sweep`: a grid of training runs (losses x learning rates x seeds x subsets ...)
//! as one job. The job's ranks split into groups of `--ranks-per-run` (one group of all ranks by
//! default); each group trains one cell at a time, data-parallel, exactly as `cosine-train train`
//! would on that many ranks, and claims the next cell when it is done (longest expected first).
//! Every cell is an ordinary run directory `OUT/<cell>/`; `OUT/sweep.json` records the grid and
//! each cell's state. Running the same command again continues: finished cells whose
//! configuration still matches are kept, unfinished ones resume from their checkpoints, and a
//! cell whose configuration changed is refused with the difference (or trained anew with
//! `--rerun-changed`).

pub mod grid;
pub mod grid_file;
pub mod handout;
pub mod table2;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use self::grid::{cells, parse_axis, parse_cell};
use self::handout::{Claim, Start, claim, expected_cost, order, start_of};
use super::UsageError;
use super::train::{TrainArgs, resolve_config, train_in};
use crate::config::RunConfig;
use crate::dist::job::{Job, Team};
use crate::dist::{Communicator, Grouping};
use crate::run_dir::checkpoint::ResumeMode;
use crate::run_dir::sweep::{self, Axis, CellState, SweepRecord};
use crate::runtime::signals::{self, Stopped};
use crate::train::step::Diverged;

pub use self::grid::PAPER_RATES;

/// `sweep` options.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Directory of the sweep: sweep.json and one run directory per cell.
    #[arg(long)]
    pub out: PathBuf,
    /// A grid axis: a `train` option and its values, e.g. loss=ce,cosine or seed=0,1,2;
    /// lr-max=paper is the paper's 8 rates, per-class=all the whole split. Repeat for more
    /// axes: the grid is every combination (with --grid's axes first).
    #[arg(
        long = "axis",
        value_name = "OPTION=V1,V2,...",
        required_unless_present = "grid"
    )]
    pub axes: Vec<String>,
    /// A grid file (TOML: a [train] table of common options, [[axis]] tables whose keys vary
    /// together; see docs/sweep-grid.toml), or paper-table2: the paper's presets x 8 learning
    /// rates over the datasets packed in --data-root.
    #[arg(long, value_name = "FILE|paper-table2")]
    pub grid: Option<PathBuf>,
    /// With --grid paper-table2: the directory holding the packed datasets (cub, nab, cars,
    /// flowers, mit67, cifar100; found by the source in their manifests).
    #[arg(long, value_name = "DIR")]
    pub data_root: Option<PathBuf>,
    /// Ranks that train one cell together (data-parallel); the job's ranks split into groups of
    /// this many, each training its own cells [default: all ranks, one group].
    #[arg(long, value_name = "G")]
    pub ranks_per_run: Option<usize>,
    /// Processes sharing each GPU (from different groups): small models cannot fill a GPU.
    /// Start R times as many ranks per node as GPUs.
    #[arg(long, value_name = "R", default_value_t = 1)]
    pub runs_per_gpu: usize,
    /// Train a cell anew when its stored configuration differs from the grid's (default:
    /// refuse, naming the difference).
    #[arg(long)]
    pub rerun_changed: bool,
    /// Train again the cells that failed in an earlier launch (default: keep them failed).
    #[arg(long)]
    pub retry_failed: bool,
    /// Print the cells and what this launch would do with each (train, resume, keep, refuse),
    /// then exit without training or writing anything. Run it as one process.
    #[arg(long)]
    pub dry_run: bool,
    /// Options every cell gets, after `--` (as for `train`; not --out).
    #[arg(last = true, value_name = "TRAIN OPTIONS")]
    pub train: Vec<String>,
}

/// A cell's parsed `train` arguments and the ids of the options given on its command line.
type Parsed = (TrainArgs, Vec<String>);

/// Runs the sweep; exit status 0 when every cell finished, 1 when some failed, 75 when stopped.
pub fn run(args: &SweepArgs) -> anyhow::Result<ExitCode> {
    let spec = grid_of(args)?;
    let grid = cells(&spec.axes);
    let names: Vec<String> = grid.iter().map(|c| c.name.clone()).collect();
    let mut parsed: Vec<Parsed> = grid
        .iter()
        .map(|cell| parse_cell(&args.out, &spec.common, cell))
        .collect::<anyhow::Result<_>>()?;
    let configs: Vec<Result<RunConfig, String>> = parsed
        .iter()
        .map(|(train, given)| {
            resolve_config(train, &|id| given.iter().any(|g| g == id)).map_err(|e| format!("{e:#}"))
        })
        .collect();
    if args.dry_run {
        return dry_run(args, &grid, &parsed, &configs);
    }
    let Some(device) = configs
        .iter()
        .find_map(|c| c.as_ref().ok().map(|c| c.device))
    else {
        return Err(UsageError(format!(
            "sweep: no cell can run: {}",
            configs[0].clone().err().unwrap_or_default()
        ))
        .into());
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create", args.out.display()))?;
    let grouping = Grouping {
        ranks_per_run: args.ranks_per_run.unwrap_or(0),
        runs_per_gpu: args.runs_per_gpu,
    };
    let (first, _) = &parsed[0];
    let (job, team) = Job::join_grouped(&first.job.options(), device, first.threads, grouping)?;
    signals::install();

    let mut exit = match plan_on_first_rank(args, &spec, grid, &configs, &job, &team)? {
        Planned::Refused(code) => return Ok(code),
        Planned::Go(code) => code,
    };
    let costs: Vec<f64> = configs
        .iter()
        .map(|c| c.as_ref().map_or(0.0, expected_cost))
        .collect();
    let order = order(&costs);
    let lead = job.comm.rank() == 0;
    // Every rank of a group leaves the loop together, on the claim that finds no cell left.
    loop {
        let mut message = Vec::new();
        if lead {
            let next = match signals::requested() {
                Some(signal) => Ok(Claim::Stop(signal)),
                None => claim(&args.out, team.group, &order, &|k| match &configs[k] {
                    Ok(config) => start_of(&parsed[k].0.out, config, args.rerun_changed),
                    Err(e) => Ok(Start::Changed(e.clone())),
                })
                .map(|c| c.map_or(Claim::Done, |(cell, start)| Claim::Train { cell, start })),
            };
            message = job.finish(next)?.encode();
        }
        job.comm.broadcast_bytes(&mut message, 0)?;
        let (k, start) = match Claim::decode(&message)? {
            Claim::Done => return Ok(exit),
            Claim::Stop(signal) => {
                return Ok(ExitCode::from(signals::exit_code_after(Some(signal))));
            }
            Claim::Train { cell, start } => (cell, start),
        };
        if lead {
            eprintln!(
                "sweep: group {} trains {} ({start:?})",
                team.group, names[k]
            );
        }
        let config = configs[k].clone().map_err(anyhow::Error::msg)?;
        let end = train_cell(&job, &mut parsed[k].0, config, &start)?;
        if lead && let Some(done) = record_end(&args.out, k, &names[k], &end, &job)? {
            exit = done;
        }
        if let CellEnd::Stopped(code) = end {
            if lead {
                eprintln!("cosine-train: stopped; the same sweep command continues the grid");
            }
            return Ok(ExitCode::from(code));
        }
    }
}

/// `--dry-run`: one line per cell, its name, what a launch would do with it and its options.
fn dry_run(
    args: &SweepArgs,
    grid: &[sweep::Cell],
    parsed: &[Parsed],
    configs: &[Result<RunConfig, String>],
) -> anyhow::Result<ExitCode> {
    let mut refused = 0;
    for ((cell, (train, _)), config) in grid.iter().zip(parsed).zip(configs) {
        let what = match config {
            Err(e) => format!("fails: {e}"),
            Ok(config) => match start_of(&train.out, config, args.rerun_changed)? {
                Start::Fresh => "train".into(),
                Start::Resume => "resume".into(),
                Start::Anew => "train anew (--rerun-changed)".into(),
                Start::Keep(_) => "keep (finished)".into(),
                Start::Changed(difference) => {
                    refused += 1;
                    format!("refused, run with other settings: {difference}")
                }
            },
        };
        println!("{}\t{what}\t{}", cell.name, cell.args.join(" "));
    }
    eprintln!(
        "sweep: {} cells in {}{}",
        grid.len(),
        args.out.display(),
        if refused > 0 {
            format!("; {refused} would refuse the launch (see --rerun-changed)")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// What a sweep's cells are made of.
struct GridSpec {
    /// From --grid, then --axis.
    axes: Vec<Axis>,
    /// The options every cell gets: the grid file's [train], then those after `--`.
    common: Vec<String>,
}

/// The grid of the command line, checked.
fn grid_of(args: &SweepArgs) -> anyhow::Result<GridSpec> {
    if args.ranks_per_run == Some(0) || args.runs_per_gpu == 0 {
        return Err(UsageError(
            "sweep: --ranks-per-run and --runs-per-gpu must be 1 or more".into(),
        )
        .into());
    }
    let (mut axes, mut common) = match (&args.grid, &args.data_root) {
        (Some(g), Some(root)) if g.as_os_str() == table2::NAME => (table2::axes(root)?, vec![]),
        (Some(g), None) if g.as_os_str() == table2::NAME => {
            return Err(UsageError(format!(
                "--grid {}: needs --data-root DIR, the directory of the packed datasets",
                table2::NAME
            ))
            .into());
        }
        (Some(file), None) => grid_file::read(file)?,
        (None, None) => (Vec::new(), Vec::new()),
        (_, Some(_)) => {
            return Err(UsageError(format!(
                "--data-root goes with --grid {} only",
                table2::NAME
            ))
            .into());
        }
    };
    for a in &args.axes {
        axes.push(parse_axis(a)?);
    }
    common.extend(args.train.iter().cloned());
    grid::check(&axes, &common)?;
    Ok(GridSpec { axes, common })
}

/// What the plan says to every rank.
enum Planned {
    /// Train; the exit status so far (failure when the record is complete with failed cells).
    Go(ExitCode),
    /// The grid was refused (by the first rank, which returns the error itself on that rank).
    Refused(ExitCode),
}

/// The first rank of the job plans the grid from the run directories and writes the record;
/// the others wait for its word (empty: go), so that no group claims a cell before the record
/// is written.
fn plan_on_first_rank(
    args: &SweepArgs,
    spec: &GridSpec,
    grid: Vec<sweep::Cell>,
    configs: &[Result<RunConfig, String>],
    job: &Job,
    team: &Team,
) -> anyhow::Result<Planned> {
    let world: &dyn Communicator = team.world.as_deref().unwrap_or(&job.comm);
    let mut verdict = Vec::new();
    let mut exit = ExitCode::SUCCESS;
    if world.rank() == 0 {
        let planned = plan(args, spec, grid, configs, job.comm.size(), team.groups)
            .and_then(|record| sweep::write(&args.out, &record).map(|()| record));
        match planned {
            Ok(record) => {
                eprintln!(
                    "sweep: {} cells for {} group(s) of {} rank(s): {} to train, {} finished, {} \
                     failed ({})",
                    record.cells.len(),
                    team.groups,
                    job.comm.size(),
                    record.count(CellState::Pending),
                    record.count(CellState::Finished),
                    record.count(CellState::Failed),
                    args.out.join(sweep::SWEEP).display()
                );
                if record.complete() {
                    exit = report_done(&args.out, &record);
                }
            }
            Err(e) => verdict = format!("{e:#}").into_bytes(),
        }
    }
    world.broadcast_bytes(&mut verdict, 0)?;
    if verdict.is_empty() {
        return Ok(Planned::Go(exit));
    }
    if world.rank() == 0 {
        return Err(UsageError(String::from_utf8_lossy(&verdict).into_owned()).into());
    }
    Ok(Planned::Refused(ExitCode::from(2)))
}

/// How a cell's training ended on this rank.
enum CellEnd {
    /// Finished, with its best test top-1.
    Finished(Option<f64>),
    /// Failed alike on every rank of the group: the error.
    Failed(String),
    /// Stopped by a signal after its checkpoint: the exit status.
    Stopped(u8),
}

/// Trains one cell on this rank, starting as `start`. A failure every rank of the group
/// shares (or any failure of a group of one) is the cell's; any other may be this rank's
/// alone, with the group's other ranks waiting in a collective, and ends the job.
fn train_cell(
    job: &Job,
    train: &mut TrainArgs,
    config: RunConfig,
    start: &Start,
) -> anyhow::Result<CellEnd> {
    match start {
        Start::Resume => train.resume = Some(ResumeMode::Auto),
        Start::Anew => train.force = true,
        _ => {}
    }
    match train_in(job, train, config) {
        Ok(summary) => Ok(CellEnd::Finished(
            Some(summary.best_top1).filter(|v| !v.is_nan()),
        )),
        Err(e) => match e.downcast_ref::<Stopped>() {
            Some(stopped) => Ok(CellEnd::Stopped(stopped.exit_code())),
            None if e.is::<Diverged>() || job.comm.size() == 1 => {
                Ok(CellEnd::Failed(format!("{e:#}")))
            }
            None => job.finish(Err(e)),
        },
    }
}

/// Writes how cell `k` ended into the record (on a group's first rank); when that completes the
/// grid, says so and returns the sweep's exit status.
fn record_end(
    out: &std::path::Path,
    k: usize,
    name: &str,
    end: &CellEnd,
    job: &Job,
) -> anyhow::Result<Option<ExitCode>> {
    let complete = job.finish(sweep::update(out, |record| {
        let cell = &mut record.cells[k];
        cell.ended_at = Some(sweep::now());
        match end {
            CellEnd::Stopped(_) => cell.state = CellState::Pending,
            CellEnd::Finished(best) => {
                cell.state = CellState::Finished;
                cell.best_top1 = *best;
            }
            CellEnd::Failed(e) => {
                cell.state = CellState::Failed;
                cell.error = Some(e.clone());
            }
        }
        record.complete().then(|| record.clone())
    }))?;
    if let CellEnd::Failed(e) = end {
        eprintln!("sweep: cell {name} failed: {e}");
    }
    Ok(complete.map(|record| report_done(out, &record)))
}

/// Says that the grid is done; the exit status: failure when a cell failed.
fn report_done(out: &std::path::Path, record: &SweepRecord) -> ExitCode {
    let failed = record.count(CellState::Failed);
    eprintln!(
        "sweep: done: {} cells, {} finished, {failed} failed ({}{})",
        record.cells.len(),
        record.count(CellState::Finished),
        out.join(sweep::SWEEP).display(),
        if failed > 0 {
            "; --retry-failed trains the failed ones again"
        } else {
            ""
        }
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The record a launch starts from: each cell's state from its run directory. A cell run with
/// other settings refuses the whole sweep (unless `--rerun-changed`); a cell that failed in an
/// earlier launch stays failed (unless `--retry-failed`).
fn plan(
    args: &SweepArgs,
    spec: &GridSpec,
    mut cells: Vec<sweep::Cell>,
    configs: &[Result<RunConfig, String>],
    ranks_per_run: usize,
    groups: usize,
) -> anyhow::Result<SweepRecord> {
    let earlier = sweep::is_sweep(&args.out)
        .then(|| sweep::read(&args.out))
        .transpose()?;
    let failed_before = |name: &str, hash: &str| {
        earlier.as_ref().and_then(|r| {
            r.cells
                .iter()
                .find(|c| {
                    c.name == name
                        && c.state == CellState::Failed
                        && c.config_xxh3.as_deref() == Some(hash)
                })
                .and_then(|c| c.error.clone())
        })
    };
    let mut changed = Vec::new();
    for (cell, config) in cells.iter_mut().zip(configs) {
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                cell.state = CellState::Failed;
                cell.error = Some(e.clone());
                continue;
            }
        };
        let hash = sweep::config_hash(config);
        match start_of(&args.out.join(&cell.name), config, args.rerun_changed)? {
            Start::Keep(best) => {
                cell.state = CellState::Finished;
                cell.best_top1 = best;
            }
            Start::Changed(difference) => changed.push(format!("{} ({difference})", cell.name)),
            Start::Fresh | Start::Resume if !args.retry_failed => {
                if let Some(error) = failed_before(&cell.name, &hash) {
                    cell.state = CellState::Failed;
                    cell.error = Some(error);
                }
            }
            _ => {}
        }
        cell.config_xxh3 = Some(hash);
    }
    if !changed.is_empty() {
        return Err(UsageError(format!(
            "sweep: {} cell(s) in {} were run with other settings: {}; rerun with \
             --rerun-changed to train them anew, or use another --out",
            changed.len(),
            args.out.display(),
            changed.join("; ")
        ))
        .into());
    }
    Ok(SweepRecord {
        axes: spec.axes.clone(),
        common: spec.common.clone(),
        ranks_per_run,
        groups,
        cells,
    })
}
