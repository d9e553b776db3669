//! Comparing runs (`cosine-train report RUN_DIR...`): each run's `config.json` and
//! `metrics.jsonl`, read through the run directory's own record types, become a row of a
//! markdown or CSV table and lines of a plot ([`plot`]). A run with missing or damaged files is
//! reported as such, never fatal.

pub mod plot;
pub mod sweep;

use std::path::{Path, PathBuf};

use crate::run_dir::records::{self, EpochMetrics};

/// One epoch of a run, as the table and plot use it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochPoint {
    pub epoch: f64,
    pub lr: Option<f64>,
    pub train_loss: Option<f64>,
    pub test_top1: Option<f64>,
    pub test_balanced: Option<f64>,
    pub images_per_sec: Option<f64>,
    pub seconds: Option<f64>,
}

impl From<&EpochMetrics> for EpochPoint {
    fn from(e: &EpochMetrics) -> Self {
        let finite = |v: f64| v.is_finite().then_some(v);
        EpochPoint {
            epoch: e.epoch as f64,
            lr: finite(e.lr),
            train_loss: finite(e.train_loss),
            test_top1: e.test_top1,
            test_balanced: e.test_balanced,
            images_per_sec: finite(e.images_per_sec),
            seconds: finite(e.seconds),
        }
    }
}

/// What `report` knows about one run directory.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub dir: PathBuf,
    pub name: String,
    pub objective: String,
    pub arch: String,
    pub data: String,
    /// The shard directory's dataset name (datasets-prep's source name, e.g. cub).
    pub dataset: String,
    pub world_size: Option<u64>,
    pub epochs_planned: Option<u64>,
    pub points: Vec<EpochPoint>,
    pub best_top1: Option<f64>,
    pub best_epoch: Option<u64>,
    pub last_top1: Option<f64>,
    pub finished: bool,
    /// Best validation top-1 and what the best epoch was chosen on (finished runs).
    pub best_val_top1: Option<f64>,
    pub selected_on: String,
    /// Problems found (missing or unreadable files, damaged lines); empty for a clean run.
    pub notes: Vec<String>,
}

impl RunInfo {
    /// "finished", "running or stopped at epoch k/N", or what is missing.
    pub fn status(&self) -> String {
        if self.finished {
            "finished".into()
        } else if self.points.is_empty() {
            "no epochs".into()
        } else {
            format!(
                "stopped at epoch {}/{}",
                self.points.last().map_or(0.0, |p| p.epoch),
                self.epochs_planned
                    .map_or_else(|| "?".to_string(), |n| n.to_string())
            )
        }
    }

    pub fn balanced(&self) -> Option<f64> {
        self.points.iter().rev().find_map(|p| p.test_balanced)
    }

    pub fn images_per_sec(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .points
            .iter()
            .filter_map(|p| p.images_per_sec)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    pub fn wall_seconds(&self) -> Option<f64> {
        let v: Vec<f64> = self.points.iter().filter_map(|p| p.seconds).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }
}

/// Reads run directories (see [`read_run`]) and names each by the shortest ending of its path
/// that no other has (`a/ce` and `b/ce` rather than `ce` twice).
pub fn read_runs(dirs: &[PathBuf]) -> Vec<RunInfo> {
    let mut runs: Vec<RunInfo> = dirs.iter().map(|d| read_run(d)).collect();
    let names = distinct_names(dirs);
    for (run, name) in runs.iter_mut().zip(names) {
        run.name = name;
    }
    runs
}

/// For each path, its last components, as few as make it different from the others'.
fn distinct_names(dirs: &[PathBuf]) -> Vec<String> {
    let parts: Vec<Vec<String>> = dirs
        .iter()
        .map(|d| {
            d.components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect()
        })
        .collect();
    let ending = |p: &[String], n: usize| p[p.len().saturating_sub(n)..].join("/");
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (1..=p.len().max(1))
                .map(|n| ending(p, n))
                .find(|name| {
                    parts
                        .iter()
                        .enumerate()
                        .all(|(j, q)| j == i || ending(q, name.split('/').count()) != *name)
                })
                .unwrap_or_else(|| dirs[i].display().to_string())
        })
        .collect()
}

/// Reads one run directory; never fails (problems become notes).
pub fn read_run(dir: &Path) -> RunInfo {
    let mut info = RunInfo {
        dir: dir.to_path_buf(),
        name: dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        ..Default::default()
    };
    let config_path = dir.join(crate::run_dir::CONFIG);
    match std::fs::read_to_string(&config_path) {
        Err(e) => info.notes.push(format!("config.json: {e}")),
        Ok(text) => match serde_json::from_str::<records::RunRecord>(&text) {
            Err(e) => info
                .notes
                .push(format!("config.json: not the record of a run ({e})")),
            Ok(r) => {
                info.objective = r.config.objective.loss.to_string();
                info.arch = r.config.arch.to_string();
                let data_name = r
                    .config
                    .data
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                info.dataset = r.dataset.clone();
                info.data = match (r.dataset.is_empty(), data_name.is_empty()) {
                    (false, false) => format!("{} ({data_name})", r.dataset),
                    (false, true) => r.dataset,
                    _ => data_name,
                };
                info.world_size = Some(r.world_size as u64);
                info.epochs_planned = Some(r.config.epochs as u64);
            }
        },
    }
    match records::read_metrics(dir) {
        Err(datasets_prep::bounded::ReadError::NotFound { .. }) => {
            info.notes.push("metrics.jsonl: No such file".into())
        }
        Err(e) => info.notes.push(format!("metrics.jsonl: {e}")),
        Ok(m) => {
            info.notes
                .extend(m.damaged.iter().map(|d| format!("metrics.jsonl {d}")));
            info.points = m.epochs.iter().map(EpochPoint::from).collect();
            if let Some(s) = &m.summary {
                info.finished = true;
                info.best_top1 = s.best_top1;
                info.best_epoch = Some(s.best_epoch as u64);
                info.last_top1 = s.last_top1;
                info.best_val_top1 = s.best_val_top1;
                info.selected_on = s.selected_on.clone();
            }
        }
    }
    if !info.finished {
        // Best and last so far, from the epochs written.
        let evaluated: Vec<&EpochPoint> = info
            .points
            .iter()
            .filter(|p| p.test_top1.is_some())
            .collect();
        info.last_top1 = evaluated.last().and_then(|p| p.test_top1);
        if let Some(best) = evaluated.iter().max_by(|a, b| {
            a.test_top1
                .partial_cmp(&b.test_top1)
                .unwrap_or(std::cmp::Ordering::Equal)
        }) {
            info.best_top1 = best.test_top1;
            info.best_epoch = Some(best.epoch as u64);
        }
    }
    info
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{:.2}%", 100.0 * x))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

const COLUMNS: [&str; 13] = [
    "run",
    "objective",
    "arch",
    "data",
    "ranks",
    "best top-1",
    "best epoch",
    "last top-1",
    "last balanced",
    "epochs",
    "images/s",
    "wall s",
    "status",
];

fn row(r: &RunInfo) -> [String; 13] {
    let status = if r.notes.is_empty() {
        r.status()
    } else {
        format!("{}; {}", r.status(), r.notes.join("; "))
    };
    [
        r.name.clone(),
        r.objective.clone(),
        r.arch.clone(),
        r.data.clone(),
        r.world_size.map_or_else(|| "-".into(), |w| w.to_string()),
        pct(r.best_top1),
        r.best_epoch.map_or_else(|| "-".into(), |e| e.to_string()),
        pct(r.last_top1),
        pct(r.balanced()),
        format!(
            "{}/{}",
            r.points.len(),
            r.epochs_planned
                .map_or_else(|| "?".to_string(), |n| n.to_string())
        ),
        num(r.images_per_sec(), 0),
        num(r.wall_seconds(), 1),
        status,
    ]
}

/// The markdown comparison table.
pub fn markdown(runs: &[RunInfo]) -> String {
    let mut out = format!("| {} |\n", COLUMNS.join(" | "));
    out += &format!(
        "|{}\n",
        COLUMNS
            .iter()
            .enumerate()
            .map(|(i, _)| if (4..12).contains(&i) {
                " ---: |"
            } else {
                " --- |"
            })
            .collect::<String>()
    );
    for r in runs {
        out += &format!("| {} |\n", row(r).map(|c| c.replace('|', "/")).join(" | "));
    }
    out
}

/// A CSV field (RFC 4180): quoted when it holds a comma, quote or line break.
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The same table as CSV (RFC 4180 quoting), accuracies as plain percentages for spreadsheets.
pub fn csv(runs: &[RunInfo]) -> String {
    let quote = |s: &str| csv_field(s);
    let header = COLUMNS.map(|c| {
        if c.contains("top-1") || c.contains("balanced") {
            format!("{c} (%)")
        } else {
            c.to_string()
        }
    });
    let mut out = header.map(|c| quote(&c)).join(",") + "\n";
    for r in runs {
        let cells = row(r).map(|c| match c.strip_suffix('%') {
            Some(number) => number.to_string(),
            None => c,
        });
        out += &(cells.map(|c| quote(&c)).join(",") + "\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_the_same_name_are_told_apart_by_their_folders() {
        let dirs: Vec<PathBuf> = ["runs/a/ce", "runs/b/ce", "runs/b/cosine", "x"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(distinct_names(&dirs), ["a/ce", "b/ce", "cosine", "x"]);
    }
}
