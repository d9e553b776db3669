//! `sweep --grid paper-table2 --data-root DIR`: the paper's Table 2 over the packed datasets
//! found in DIR. Each shard directory directly inside DIR that was packed from one of the
//! paper's sources (cub, nab, cars, flowers, mit67, cifar100) gives 4 cells per learning rate:
//! its `paper-D-LOSS` preset for each loss (the data and its preset vary together), times the
//! reference's 8 learning rates.

use std::path::{Path, PathBuf};

use datasets_prep::ShardDir;
use datasets_prep::sources::Source;

use super::super::UsageError;
use super::grid::{PAPER_RATES, axis, linked};
use crate::choice::Choice;
use crate::config::presets::{paper_dataset_of, paper_datasets};
use crate::objective::LossKind;
use crate::run_dir::sweep::Axis;

/// The grid name of `--grid`.
pub const NAME: &str = "paper-table2";

/// The axes of Table 2 over the datasets in `root`, in the paper's order; says on stderr which
/// of the paper's datasets are missing.
pub fn axes(root: &Path) -> Result<Vec<Axis>, UsageError> {
    let found = find(root)?;
    let missing: Vec<&str> = paper_datasets()
        .filter(|d| !found.iter().any(|(name, _)| name == d))
        .collect();
    if found.is_empty() {
        return Err(UsageError(format!(
            "--grid {NAME} --data-root {}: no dataset of the paper's Table 2 is packed there \
             (expected shard directories packed with datasets-prep pack --source one of {}, \
             e.g. {0}/cub)",
            root.display(),
            missing.join(", ")
        )));
    }
    if !missing.is_empty() {
        eprintln!(
            "sweep: {NAME}: not in {}: {} (pack them there to add their cells)",
            root.display(),
            missing.join(", ")
        );
    }
    let mut data = Vec::new();
    let mut presets = Vec::new();
    for (name, dir) in &found {
        for loss in LossKind::ALL {
            data.push(dir.display().to_string());
            presets.push(format!("paper-{name}-{loss}"));
        }
    }
    let both = linked(
        axis("data", data).map_err(UsageError)?,
        vec![axis("preset", presets).map_err(UsageError)?],
    )
    .map_err(UsageError)?;
    let rates = axis(
        "lr-max",
        PAPER_RATES.iter().map(|r| r.to_string()).collect(),
    )
    .map_err(UsageError)?;
    Ok(vec![both, rates])
}

/// The paper's datasets packed directly inside `root`, in the paper's order.
fn find(root: &Path) -> Result<Vec<(&'static str, PathBuf)>, UsageError> {
    let entries = std::fs::read_dir(root).map_err(|e| {
        UsageError(format!(
            "--data-root {}: cannot list it: {e}",
            root.display()
        ))
    })?;
    let mut found: Vec<(&'static str, PathBuf)> = Vec::new();
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let source = match source_of(&dir) {
            Ok(source) => source,
            Err(e) => {
                eprintln!("sweep: {NAME}: skipping {}: {e}", dir.display());
                continue;
            }
        };
        let Some(name) = paper_dataset_of(&source) else {
            continue;
        };
        if let Some((_, first)) = found.iter().find(|(n, _)| *n == name) {
            return Err(UsageError(format!(
                "--data-root {}: {} and {} are both packed from {name}; keep one there",
                root.display(),
                first.display(),
                dir.display()
            )));
        }
        found.push((name, dir));
    }
    found.sort_by_key(|(name, _)| paper_datasets().position(|d| d == *name));
    Ok(found)
}

/// The source a shard directory was packed from (read and checked as training reads it).
fn source_of(dir: &Path) -> Result<Source, String> {
    let shards = ShardDir::open(dir).map_err(|e| e.to_string())?;
    shards.manifest().source.parse()
}
