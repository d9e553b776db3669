//! The report of a sweep (`cosine-train report SWEEP_DIR`): cells that differ only in their
//! seed are replicates; cells that differ only in the learning rate are the choices of one
//! condition. Per condition (loss x dataset x any other axis) the learning rate is chosen on the
//! validation split when every run has one (else on test, the paper's protocol, and labelled
//! so), and the test top-1 at that rate is given as the mean and 95% confidence interval over
//! the seeds. The table has a row per loss and a column per dataset (and other axis values),
//! with the paper's Table 2 beside it where the dataset is one of the paper's.

use std::collections::BTreeMap;
use std::path::Path;

use super::{RunInfo, csv_field, read_run};
use crate::choice::Choice;
use crate::config::presets::published_top1;
use crate::objective::LossKind;
use crate::run_dir::sweep::{self, CellState};

/// Axes whose values are replicates of one measurement.
const REPLICATE_AXES: [&str; 2] = ["seed", "subset-seed"];
/// The axis tuned per condition.
const RATE_AXES: [&str; 2] = ["lr-max", "lr"];
/// Axes the row and column name from the run's own configuration instead.
const NAMED_AXES: [&str; 2] = ["loss", "data"];

/// One cell of the sweep with its run.
#[derive(Clone, Debug)]
pub struct CellRun {
    pub name: String,
    pub state: CellState,
    pub run: RunInfo,
    pub rate: String,
    pub replicate: String,
    /// Row (the loss) and column (dataset and the other axes' values) of its condition.
    pub row: String,
    pub column: String,
}

/// One learning rate of a condition: the test (and validation) top-1 of each finished seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateResult {
    pub rate: String,
    pub test: Vec<f64>,
    pub val: Vec<f64>,
}

/// One (row, column) of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub row: String,
    pub column: String,
    pub rates: Vec<RateResult>,
    /// Index into `rates` of the chosen learning rate.
    pub chosen: Option<usize>,
    /// "val" or "test".
    pub selected_on: &'static str,
    pub published: Option<f64>,
}

impl Condition {
    /// Mean and 95% half-width (in %) of the test top-1 at the chosen rate.
    pub fn result(&self) -> Option<(f64, Option<f64>, usize)> {
        let r = &self.rates[self.chosen?];
        let (mean, half) = mean_ci95(&r.test)?;
        Some((100.0 * mean, half.map(|h| 100.0 * h), r.test.len()))
    }
}

/// A whole sweep's report.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub cells: Vec<CellRun>,
    pub conditions: Vec<Condition>,
}

/// The 0.975 quantile of Student's t for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Mean and half-width of the 95% confidence interval of the mean (Student's t, sample
/// standard deviation); no interval for a single value.
pub fn mean_ci95(values: &[f64]) -> Option<(f64, Option<f64>)> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some((mean, None));
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T975.get(n - 2).copied().unwrap_or(1.96);
    Some((mean, Some(t * var.sqrt() / (n as f64).sqrt())))
}

/// Reads the sweep in `dir` and its cells' runs.
pub fn read(dir: &Path) -> anyhow::Result<SweepReport> {
    let record = sweep::read(dir)?;
    let cells: Vec<CellRun> = record
        .cells
        .iter()
        .map(|cell| {
            let run = read_run(&dir.join(&cell.name));
            let values: Vec<(&str, &str)> = cell
                .args
                .chunks(2)
                .filter_map(|p| match p {
                    [o, v] => Some((o.trim_start_matches("--"), v.as_str())),
                    _ => None,
                })
                .collect();
            let pick = |names: &[&str]| {
                values
                    .iter()
                    .filter(|(o, _)| names.contains(o))
                    .map(|(o, v)| format!("{o}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let rate = values
                .iter()
                .find(|(o, _)| RATE_AXES.contains(o))
                .map_or_else(String::new, |(_, v)| v.to_string());
            let dataset = if run.dataset.is_empty() {
                run.data.clone()
            } else {
                run.dataset.clone()
            };
            let column = column_of(&dataset, &values);
            CellRun {
                name: cell.name.clone(),
                state: cell.state,
                row: if run.objective.is_empty() {
                    "?".into()
                } else {
                    run.objective.clone()
                },
                column,
                rate,
                replicate: pick(&REPLICATE_AXES),
                run,
            }
        })
        .collect();
    let conditions = conditions(&cells);
    Ok(SweepReport { cells, conditions })
}

/// A cell's column: its dataset and the values of the axes that are neither replicates, rates
/// nor named by the row and the dataset. The dataset's own paper preset (`paper-D-LOSS`, as in
/// a Table 2 grid) says nothing more: its loss is the row's (or set over it), so it is left out.
fn column_of(dataset: &str, values: &[(&str, &str)]) -> String {
    let own_paper_preset = |v: &str| {
        v.strip_prefix(&format!("paper-{dataset}-"))
            .is_some_and(|loss| LossKind::parse_name(loss).is_ok())
    };
    let others = values
        .iter()
        .filter(|(o, v)| {
            let left_out = REPLICATE_AXES.contains(o)
                || RATE_AXES.contains(o)
                || NAMED_AXES.contains(o)
                || (*o == "preset" && own_paper_preset(v));
            !left_out
        })
        .map(|(o, v)| format!("{o}={v}"));
    std::iter::once(dataset.to_string())
        .chain(others)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Groups the cells into conditions and chooses each one's learning rate.
fn conditions(cells: &[CellRun]) -> Vec<Condition> {
    // Rates in the grid's order: a tie on the score goes to the rate listed first.
    let mut grouped: BTreeMap<(String, String), Vec<RateResult>> = BTreeMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    for c in cells {
        let key = (c.row.clone(), c.column.clone());
        if !grouped.contains_key(&key) {
            order.push(key.clone());
        }
        let rates = grouped.entry(key).or_default();
        let at = match rates.iter().position(|r| r.rate == c.rate) {
            Some(at) => at,
            None => {
                rates.push(RateResult {
                    rate: c.rate.clone(),
                    ..Default::default()
                });
                rates.len() - 1
            }
        };
        let rate = &mut rates[at];
        if c.state == CellState::Finished
            && c.run.finished
            && let Some(test) = c.run.best_top1
        {
            rate.test.push(test);
            if let Some(val) = c.run.best_val_top1 {
                rate.val.push(val);
            }
        }
    }
    order
        .into_iter()
        .map(|key| {
            let rates: Vec<RateResult> = grouped.remove(&key).unwrap_or_default();
            let on_val = rates.iter().any(|r| !r.test.is_empty())
                && rates.iter().all(|r| r.val.len() == r.test.len());
            let score = |r: &RateResult| {
                let v = if on_val { &r.val } else { &r.test };
                mean_ci95(v).map(|(m, _)| m)
            };
            let mut chosen: Option<(usize, f64)> = None;
            for (i, r) in rates.iter().enumerate() {
                if let Some(v) = score(r)
                    && chosen.is_none_or(|(_, best)| v > best)
                {
                    chosen = Some((i, v));
                }
            }
            let chosen = chosen.map(|(i, _)| i);
            let dataset = key.1.split(' ').next().unwrap_or("");
            let published = LossKind::parse_name(&key.0)
                .ok()
                .filter(|_| key.1 == dataset)
                .and_then(|loss| published_top1(dataset, loss));
            Condition {
                row: key.0,
                column: key.1,
                rates,
                chosen,
                selected_on: if on_val { "val" } else { "test" },
                published,
            }
        })
        .collect()
}

fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for i in items {
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
    seen
}

/// The table as markdown: a row per loss, a column per dataset (and other axes).
pub fn markdown(dir: &Path, report: &SweepReport) -> String {
    let count = |s: CellState| report.cells.iter().filter(|c| c.state == s).count();
    let mut out = format!(
        "# Sweep {}\n\n{} cells: {} finished, {} failed, {} pending or running.\n\n",
        dir.display(),
        report.cells.len(),
        count(CellState::Finished),
        count(CellState::Failed),
        count(CellState::Pending) + count(CellState::Running),
    );
    let on_test = report.conditions.iter().any(|c| c.selected_on == "test");
    out.push_str(&format!(
        "Test top-1 (%) at the learning rate chosen per entry on {}; mean ± 95% confidence \
         interval over seeds (n = seeds); paper = the paper's Table 2.\n\n",
        if on_test {
            "the test split (the paper's protocol: no validation split in these runs)"
        } else {
            "the validation split"
        }
    ));
    let rows = unique(report.conditions.iter().map(|c| c.row.as_str()));
    let columns = unique(report.conditions.iter().map(|c| c.column.as_str()));
    out.push_str(&format!("| loss | {} |\n", columns.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---|".repeat(columns.len())));
    for row in &rows {
        let entries: Vec<String> = columns
            .iter()
            .map(|col| {
                report
                    .conditions
                    .iter()
                    .find(|c| c.row == *row && c.column == *col)
                    .map_or_else(|| "-".into(), entry)
            })
            .collect();
        out.push_str(&format!("| {row} | {} |\n", entries.join(" | ")));
    }
    let failed: Vec<&CellRun> = report
        .cells
        .iter()
        .filter(|c| c.state == CellState::Failed)
        .collect();
    if !failed.is_empty() {
        out.push_str("\nFailed cells (their errors are in sweep.json):\n");
        for c in failed {
            out.push_str(&format!("- {}\n", c.name));
        }
    }
    out
}

/// One entry: `62.1 ± 1.3 (lr 0.5, n=3) · paper 67.6`.
fn entry(c: &Condition) -> String {
    let Some((mean, half, n)) = c.result() else {
        return "no finished run".into();
    };
    let rate = c.chosen.map_or("", |i| c.rates[i].rate.as_str());
    let mut s = match half {
        Some(h) => format!("{mean:.1} ± {h:.1}"),
        None => format!("{mean:.1}"),
    };
    let mut details = Vec::new();
    if !rate.is_empty() {
        details.push(format!("lr {rate}"));
    }
    details.push(format!("n={n}"));
    s.push_str(&format!(" ({})", details.join(", ")));
    if let Some(p) = c.published {
        s.push_str(&format!(" · paper {p:.1}"));
    }
    s
}

/// One CSV row per cell, with its condition's chosen rate and result at the cell's rate.
pub fn csv(report: &SweepReport) -> String {
    let mut out = String::from(
        "cell,state,loss,column,lr,replicate,test_top1,val_top1,chosen_lr,selected_on,\
         mean_top1_at_lr,ci95_at_lr,seeds_at_lr\n",
    );
    let pct = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{:.4}", 100.0 * v));
    for c in &report.cells {
        let cond = report
            .conditions
            .iter()
            .find(|k| k.row == c.row && k.column == c.column);
        let at_rate = cond.and_then(|k| k.rates.iter().find(|r| r.rate == c.rate));
        let stats = at_rate.and_then(|r| mean_ci95(&r.test));
        let finished = c.state == CellState::Finished;
        out.push_str(
            &[
                csv_field(&c.name),
                format!("{:?}", c.state).to_lowercase(),
                csv_field(&c.row),
                csv_field(&c.column),
                csv_field(&c.rate),
                csv_field(&c.replicate),
                pct(c.run.best_top1.filter(|_| finished)),
                pct(c.run.best_val_top1.filter(|_| finished)),
                cond.and_then(|k| k.chosen.map(|i| k.rates[i].rate.clone()))
                    .unwrap_or_default(),
                cond.map_or("", |k| k.selected_on).to_string(),
                pct(stats.map(|s| s.0)),
                pct(stats.and_then(|s| s.1)),
                at_rate.map_or(0, |r| r.test.len()).to_string(),
            ]
            .join(","),
        );
        out.push('\n');
    }
    out
}

/// The curves of the learning-rate plot: mean test top-1 (%) against the rate, per condition.
pub fn rate_curves(report: &SweepReport) -> Vec<super::plot::Curve> {
    report
        .conditions
        .iter()
        .filter_map(|c| {
            let mut points: Vec<(f64, f64)> = c
                .rates
                .iter()
                .filter_map(|r| Some((r.rate.parse().ok()?, 100.0 * mean_ci95(&r.test)?.0)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (!points.is_empty()).then(|| (format!("{} {}", c.row, c.column), points))
        })
        .collect()
}

/// The curves of the sub-sampling plot: test top-1 (%) at the chosen rate against images per
/// class, per loss (and dataset), when `per-class` is an axis.
pub fn per_class_curves(report: &SweepReport) -> Vec<super::plot::Curve> {
    let mut curves: Vec<super::plot::Curve> = Vec::new();
    for c in &report.conditions {
        let mut words: Vec<&str> = c.column.split(' ').collect();
        let Some((at, k)) = words
            .iter()
            .enumerate()
            .find_map(|(i, w)| Some((i, images_per_class(w)?)))
        else {
            continue;
        };
        words.remove(at);
        let Some((mean, _, _)) = c.result() else {
            continue;
        };
        let label = format!("{} {}", c.row, words.join(" "));
        match curves.iter_mut().find(|(l, _)| *l == label) {
            Some((_, points)) => points.push((k, mean)),
            None => curves.push((label, vec![(k, mean)])),
        }
    }
    for (_, points) in &mut curves {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    curves
}

/// The images per class an axis value stands for: `per-class=K`, or a CUB-subX preset
/// (`preset=paper-cub-subX-LOSS`).
fn images_per_class(word: &str) -> Option<f64> {
    let k = match word.strip_prefix("per-class=") {
        Some(k) => k,
        None => word
            .strip_prefix("preset=paper-cub-sub")?
            .split('-')
            .next()?,
    };
    k.parse().ok().filter(|&k: &f64| k > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datasets_own_paper_preset_is_left_out_of_its_column() {
        let values = [
            ("data", "/d/cub"),
            ("preset", "paper-cub-cosine"),
            ("lr-max", "0.5"),
            ("seed", "1"),
        ];
        assert_eq!(column_of("cub", &values), "cub");
        let sub = [("preset", "paper-cub-sub5-cosine"), ("per-class", "5")];
        assert_eq!(
            column_of("cub", &sub),
            "cub preset=paper-cub-sub5-cosine per-class=5"
        );
        // Another dataset's preset, or another family's, stays visible.
        let other = [("preset", "paper-nab-ce"), ("arch", "resnet20")];
        assert_eq!(
            column_of("cub", &other),
            "cub preset=paper-nab-ce arch=resnet20"
        );
        assert_eq!(
            column_of("cub", &[("preset", "gem-cub-ce")]),
            "cub preset=gem-cub-ce"
        );
    }

    #[test]
    fn images_per_class_come_from_the_axis_or_the_cub_sub_preset() {
        assert_eq!(images_per_class("per-class=5"), Some(5.0));
        assert_eq!(images_per_class("per-class=0"), None);
        assert_eq!(
            images_per_class("preset=paper-cub-sub10-cosine"),
            Some(10.0)
        );
        assert_eq!(images_per_class("preset=paper-cub-ce"), None);
        assert_eq!(images_per_class("seed=1"), None);
    }

    #[test]
    fn confidence_interval_is_students_t_over_the_sample_deviation() {
        let (mean, half) = mean_ci95(&[0.60, 0.62, 0.64]).unwrap();
        assert!((mean - 0.62).abs() < 1e-12);
        // sd 0.02, t(2) = 4.303: 4.303 * 0.02 / sqrt(3).
        assert!((half.unwrap() - 4.303 * 0.02 / 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(mean_ci95(&[0.5]), Some((0.5, None)));
        assert_eq!(mean_ci95(&[]), None);
        let many: Vec<f64> = (0..40).map(|i| f64::from(i % 2)).collect();
        let (_, half) = mean_ci95(&many).unwrap();
        let sd = (40.0 * 0.25 / 39.0f64).sqrt();
        assert!((half.unwrap() - 1.96 * sd / 40f64.sqrt()).abs() < 1e-12);
    }
}
