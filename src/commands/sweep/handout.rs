//! Handing out a sweep's cells to its groups: each group's first rank claims the next pending
//! cell (longest expected first) in `sweep.json` under its lock, decides how the cell starts
//! (fresh, resumed, anew, or kept) and tells its group.

use std::path::Path;

use anyhow::Context;

use super::grid::difference;
use crate::config::RunConfig;
use crate::model::Arch;
use crate::run_dir::sweep::{self, CellState};
use crate::run_dir::{self as run_dir, records};

/// How a cell's run directory stands against the grid's configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum Start {
    /// No run yet: train from the start.
    Fresh,
    /// An unfinished run with the same configuration: continue from its last checkpoint.
    Resume,
    /// A run with another configuration, to be replaced (`--rerun-changed`).
    Anew,
    /// Finished with the same configuration: keep it (its best test top-1).
    Keep(Option<f64>),
    /// Run with another configuration, and not to be replaced: the difference.
    Changed(String),
}

impl Start {
    fn code(&self) -> u8 {
        match self {
            Start::Fresh => 0,
            Start::Resume => 1,
            Start::Anew => 2,
            Start::Keep(_) | Start::Changed(_) => u8::MAX,
        }
    }
}

/// How the run directory `dir` stands against `config`.
pub fn start_of(dir: &Path, config: &RunConfig, rerun_changed: bool) -> anyhow::Result<Start> {
    if !dir.join(run_dir::CONFIG).exists() {
        return Ok(Start::Fresh);
    }
    let stored = records::read_record(dir)?.config;
    if &stored != config {
        return Ok(if rerun_changed {
            Start::Anew
        } else {
            Start::Changed(difference(&stored, config))
        });
    }
    let summary = records::read_metrics(dir).ok().and_then(|m| m.summary);
    Ok(match summary {
        Some(s) => Start::Keep(s.best_top1),
        None => Start::Resume,
    })
}

/// What a group's first rank tells the others.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// No pending cell is left.
    Done,
    /// A stop signal came (its number): checkpointing is over, exit.
    Stop(i32),
    /// Train cell `cell`, starting as `start`.
    Train { cell: usize, start: Start },
}

impl Claim {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Claim::Done => Vec::new(),
            Claim::Stop(signal) => [&[b'S'][..], &signal.to_le_bytes()].concat(),
            Claim::Train { cell, start } => {
                let cell = u64::try_from(*cell).unwrap_or(u64::MAX);
                [&[b'T', start.code()][..], &cell.to_le_bytes()].concat()
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> anyhow::Result<Claim> {
        let bad = || anyhow::anyhow!("sweep: a malformed cell claim of {} bytes", bytes.len());
        match bytes {
            [] => Ok(Claim::Done),
            [b'S', rest @ ..] => Ok(Claim::Stop(i32::from_le_bytes(
                rest.try_into().map_err(|_| bad())?,
            ))),
            [b'T', code, rest @ ..] => {
                let cell = u64::from_le_bytes(rest.try_into().map_err(|_| bad())?);
                let start = match code {
                    0 => Start::Fresh,
                    1 => Start::Resume,
                    2 => Start::Anew,
                    _ => return Err(bad()),
                };
                Ok(Claim::Train {
                    cell: usize::try_from(cell).map_err(|_| bad())?,
                    start,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// A cell's expected training work, to hand the longest out first (so that no group is left
/// with a long cell when the others are done): images seen times pixels times a per-pixel cost
/// of the architecture. Only the order matters.
pub fn expected_cost(config: &RunConfig) -> f64 {
    let images_per_class = config.subset.per_class.map_or(1000.0, |k| k as f64);
    let side = f64::from(config.augment.crop.unwrap_or(32));
    let per_pixel = match config.arch {
        Arch::ResNet50 => 40.0,
        Arch::Cifar { depth, wide } => depth as f64 * if wide { 4.0 } else { 1.0 },
        Arch::Tiny => 1.0,
    };
    config.epochs as f64
        * config.train_repeats.max(1) as f64
        * images_per_class
        * side
        * side
        * per_pixel
}

/// The order to hand cells out in: longest expected first, grid order among equals.
pub fn order(costs: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    order
}

/// Claims the next pending cell for `group` (first in `order`), marking it running; `None`
/// when none is pending. `start` decides how a claimed cell starts; a cell found finished
/// meanwhile is marked so and the next is tried.
pub fn claim(
    out: &Path,
    group: usize,
    order: &[usize],
    start: &dyn Fn(usize) -> anyhow::Result<Start>,
) -> anyhow::Result<Option<(usize, Start)>> {
    sweep::update(out, |record| -> anyhow::Result<Option<(usize, Start)>> {
        for &k in order {
            let Some(cell) = record.cells.get_mut(k) else {
                continue;
            };
            if cell.state != CellState::Pending {
                continue;
            }
            let how = start(k).with_context(|| format!("sweep: cell {}", cell.name))?;
            match how {
                Start::Keep(best) => {
                    cell.state = CellState::Finished;
                    cell.best_top1 = best;
                }
                Start::Changed(difference) => {
                    cell.state = CellState::Failed;
                    cell.error = Some(format!("run with other settings: {difference}"));
                }
                how => {
                    cell.state = CellState::Running;
                    cell.group = Some(group);
                    cell.started_at = Some(sweep::now());
                    cell.ended_at = None;
                    cell.error = None;
                    return Ok(Some((k, how)));
                }
            }
        }
        Ok(None)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_survive_the_wire_and_longest_cells_go_first() {
        for claim in [
            Claim::Done,
            Claim::Stop(15),
            Claim::Train {
                cell: 7,
                start: Start::Resume,
            },
            Claim::Train {
                cell: 0,
                start: Start::Anew,
            },
        ] {
            assert_eq!(Claim::decode(&claim.encode()).unwrap(), claim);
        }
        assert!(Claim::decode(b"T\x09\0\0\0\0\0\0\0\0").is_err());
        assert!(Claim::decode(b"Tx").is_err());
        assert_eq!(order(&[1.0, 3.0, 2.0, 3.0]), [1, 3, 2, 0]);
    }
}
