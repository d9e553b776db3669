//! `sweep.json`: a sweep's grid and where each cell stands. Every group of a sweep job reads and
//! rewrites it under an exclusive lock on `.sweep.lock` beside it (cells are claimed that way),
//! and each write replaces the file atomically, so a reader never sees half of one.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The file name of a sweep's record, in the sweep directory.
pub const SWEEP: &str = "sweep.json";
/// The lock file beside it.
const LOCK: &str = ".sweep.lock";

/// One grid axis: a `train` option and its values, and any options that vary with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub option: String,
    pub values: Vec<String>,
    /// Options linked to this one: value i of each goes with value i of this axis (e.g. a
    /// dataset and its preset), instead of being combined with every value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linked: Vec<Axis>,
}

impl Axis {
    /// An axis of one option.
    pub fn new(option: impl Into<String>, values: Vec<String>) -> Axis {
        Axis {
            option: option.into(),
            values,
            linked: Vec::new(),
        }
    }

    /// This axis's option and those linked to it.
    pub fn options(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.option.as_str()).chain(self.linked.iter().map(|a| a.option.as_str()))
    }

    /// The options and values of its `i`-th step.
    pub fn step(&self, i: usize) -> Vec<(String, String)> {
        std::iter::once(self)
            .chain(&self.linked)
            .map(|a| (a.option.clone(), a.values[i].clone()))
            .collect()
    }
}

/// Where a cell stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellState {
    Pending,
    Running,
    Finished,
    Failed,
}

/// One cell of the grid: one run directory `<sweep>/<name>/`.
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
    /// xxh3 of the cell's resolved configuration: a failed cell stays failed on the next
    /// launch only while this is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_xxh3: Option<String>,
    /// The group of ranks that trains (or trained) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// When this launch started and ended it (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<f64>,
}

impl Cell {
    pub fn new(name: String, args: Vec<String>) -> Cell {
        Cell {
            name,
            args,
            state: CellState::Pending,
            error: None,
            best_top1: None,
            config_xxh3: None,
            group: None,
            started_at: None,
            ended_at: None,
        }
    }
}

/// `sweep.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub axes: Vec<Axis>,
    /// The options every cell gets.
    pub common: Vec<String>,
    /// Ranks per group and the number of groups of the launch that wrote it last.
    #[serde(default)]
    pub ranks_per_run: usize,
    #[serde(default)]
    pub groups: usize,
    pub cells: Vec<Cell>,
}

impl SweepRecord {
    /// Whether no cell is waiting or being trained.
    pub fn complete(&self) -> bool {
        self.cells
            .iter()
            .all(|c| matches!(c.state, CellState::Finished | CellState::Failed))
    }

    /// The number of cells in `state`.
    pub fn count(&self, state: CellState) -> usize {
        self.cells.iter().filter(|c| c.state == state).count()
    }
}

/// Reads `<dir>/sweep.json`.
pub fn read(dir: &Path) -> anyhow::Result<SweepRecord> {
    let path = dir.join(SWEEP);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a sweep record", path.display()))
}

/// Whether `dir` holds a sweep (a `sweep.json`).
pub fn is_sweep(dir: &Path) -> bool {
    dir.join(SWEEP).is_file()
}

/// Writes `record` as `<dir>/sweep.json` (atomically), holding the lock.
pub fn write(dir: &Path, record: &SweepRecord) -> anyhow::Result<()> {
    let _lock = lock(dir)?;
    write_unlocked(dir, record)
}

/// Reads the record, lets `change` alter it and writes it back, all under the lock, so that
/// groups updating it at once do not lose each other's changes.
pub fn update<T>(dir: &Path, change: impl FnOnce(&mut SweepRecord) -> T) -> anyhow::Result<T> {
    let _lock = lock(dir)?;
    let mut record = read(dir)?;
    let out = change(&mut record);
    write_unlocked(dir, &record)?;
    Ok(out)
}

fn write_unlocked(dir: &Path, record: &SweepRecord) -> anyhow::Result<()> {
    datasets_prep::atomic::write_file(
        &dir.join(SWEEP),
        serde_json::to_string_pretty(record)?.as_bytes(),
    )?;
    Ok(())
}

/// The exclusive lock on the sweep directory, released when the file is dropped.
fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open the sweep's lock file", path.display()))?;
    file.lock()
        .with_context(|| format!("{}: cannot lock", path.display()))?;
    Ok(file)
}

/// Seconds since the Unix epoch, for the cells' times.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `config_xxh3` of a resolved configuration.
pub fn config_hash(config: &crate::config::RunConfig) -> String {
    serde_json::to_vec(config)
        .map_or_else(|e| e.to_string(), |json| super::checkpoint::hash_hex(&json))
}
