//! `cosine-train report RUN_DIR...`: compares runs. Reads each run's `config.json` and
//! `metrics.jsonl`, prints a markdown table, optionally writes it as CSV, and draws test accuracy,
//! training loss and learning rate per epoch, one line per run, into a PNG. A run with missing or
//! damaged files is reported as such, never fatal.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

/// One epoch line of `metrics.jsonl`.
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

/// What `report` knows about one run directory.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub dir: PathBuf,
    pub name: String,
    pub objective: String,
    pub arch: String,
    pub data: String,
    pub world_size: Option<u64>,
    pub epochs_planned: Option<u64>,
    pub points: Vec<EpochPoint>,
    pub best_top1: Option<f64>,
    pub best_epoch: Option<u64>,
    pub last_top1: Option<f64>,
    pub finished: bool,
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

fn text(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
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
    let config_path = dir.join("config.json");
    match std::fs::read_to_string(&config_path) {
        Err(e) => info.notes.push(format!("config.json: {e}")),
        Ok(t) => match serde_json::from_str::<Value>(&t) {
            Err(e) => info.notes.push(format!("config.json: not JSON ({e})")),
            Ok(c) => {
                info.objective = text(&c, &["config", "objective", "loss"]).unwrap_or_default();
                info.arch = text(&c, &["config", "arch"]).unwrap_or_default();
                let dataset = text(&c, &["dataset"]).unwrap_or_default();
                let data = text(&c, &["config", "data"]).unwrap_or_default();
                let data_name = Path::new(&data)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                info.data = match (dataset.is_empty(), data_name.is_empty()) {
                    (false, false) => format!("{dataset} ({data_name})"),
                    (false, true) => dataset,
                    _ => data_name,
                };
                info.world_size = c.get("world_size").and_then(Value::as_u64);
                info.epochs_planned = c.pointer("/config/epochs").and_then(Value::as_u64);
            }
        },
    }
    let metrics_path = dir.join("metrics.jsonl");
    match std::fs::read_to_string(&metrics_path) {
        Err(e) => info.notes.push(format!("metrics.jsonl: {e}")),
        Ok(t) => {
            for (i, line) in t.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    info.notes.push(format!(
                        "metrics.jsonl line {}: not JSON (cut short?)",
                        i + 1
                    ));
                    continue;
                };
                if v.get("summary").and_then(Value::as_bool) == Some(true) {
                    info.finished = true;
                    info.best_top1 = v.get("best_top1").and_then(Value::as_f64);
                    info.best_epoch = v.get("best_epoch").and_then(Value::as_u64);
                    info.last_top1 = v.get("last_top1").and_then(Value::as_f64);
                    continue;
                }
                let f = |k: &str| v.get(k).and_then(Value::as_f64);
                let Some(epoch) = f("epoch") else {
                    info.notes
                        .push(format!("metrics.jsonl line {}: no epoch", i + 1));
                    continue;
                };
                info.points.push(EpochPoint {
                    epoch,
                    lr: f("lr"),
                    train_loss: f("train_loss"),
                    test_top1: f("test_top1"),
                    test_balanced: f("test_balanced"),
                    images_per_sec: f("images_per_sec"),
                    seconds: f("seconds"),
                });
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

/// The same table as CSV (RFC 4180 quoting), accuracies as plain percentages for spreadsheets.
pub fn csv(runs: &[RunInfo]) -> String {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
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

/// Registers a TrueType font for the plot's text: `COSINE_FONT`, else DejaVu Sans or Liberation
/// Sans from their Debian locations (`launch/setup.sh` installs `fonts-dejavu-core`).
fn register_font() -> anyhow::Result<()> {
    let candidates: Vec<PathBuf> = std::env::var_os("COSINE_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
            ]
            .map(PathBuf::from),
        )
        .collect();
    for path in &candidates {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return Ok(());
            }
        }
    }
    bail!(
        "no usable font for the plot's text (looked for {}); install fonts-dejavu-core or set COSINE_FONT to a .ttf file",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Line colours (the "tab10" palette): distinct, and readable on white.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One chart of the plot: a value per epoch.
struct Panel {
    title: &'static str,
    y_desc: &'static str,
    value: fn(&EpochPoint) -> Option<f64>,
    y_max: f64,
}

impl Panel {
    fn new(
        title: &'static str,
        y_desc: &'static str,
        value: fn(&EpochPoint) -> Option<f64>,
        y_max: f64,
    ) -> Self {
        Panel {
            title,
            y_desc,
            value,
            y_max,
        }
    }
}

/// Plot size in pixels.
pub const PLOT_SIZE: (u32, u32) = (1200, 900);

/// Draws test top-1 and training loss per epoch (one line per run) with the learning rate
/// underneath into a PNG at `path`.
pub fn plot(runs: &[RunInfo], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let plotted: Vec<&RunInfo> = runs.iter().filter(|r| !r.points.is_empty()).collect();
    if plotted.is_empty() {
        bail!("no run has any epoch to plot");
    }
    let max_epoch = plotted
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.epoch))
        .fold(1.0f64, f64::max);
    let series = |r: &RunInfo, f: fn(&EpochPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        r.points
            .iter()
            .filter_map(|p| f(p).filter(|v| v.is_finite()).map(|v| (p.epoch, v)))
            .collect()
    };
    let max_of = |f: fn(&EpochPoint) -> Option<f64>| {
        plotted
            .iter()
            .flat_map(|r| series(r, f))
            .map(|(_, v)| v)
            .fold(0.0f64, f64::max)
    };
    let tmp = path.with_extension(format!("tmp-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let (upper, lower) = root.split_vertically(PLOT_SIZE.1 * 2 / 3);
        let (left, right) = upper.split_horizontally(PLOT_SIZE.0 / 2);
        let colour = |i: usize| {
            let (r, g, b) = PALETTE[i % PALETTE.len()];
            RGBColor(r, g, b)
        };
        let panels = [
            (
                &left,
                Panel::new("test top-1", "top-1", |p| p.test_top1, 1.0),
            ),
            (
                &right,
                Panel::new(
                    "training loss",
                    "loss",
                    |p| p.train_loss,
                    max_of(|p| p.train_loss) * 1.05,
                ),
            ),
            (
                &lower,
                Panel::new("learning rate", "lr", |p| p.lr, max_of(|p| p.lr) * 1.05),
            ),
        ];
        for (
            area,
            Panel {
                title,
                y_desc,
                value: f,
                y_max,
            },
        ) in panels
        {
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..max_epoch, 0f64..y_max.max(1e-12))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(y_desc)
                .light_line_style(TRANSPARENT)
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, r) in plotted.iter().enumerate() {
                let c = colour(i);
                chart
                    .draw_series(LineSeries::new(series(r, f), c.stroke_width(2)))?
                    .label(r.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(if title == "test top-1" {
                    SeriesLabelPosition::LowerRight
                } else {
                    SeriesLabelPosition::UpperRight
                })
                .draw()?;
        }
        root.present()
            .with_context(|| format!("{}: cannot write the plot", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// Runs `report`: the table on stdout, CSV and PNG where asked.
pub fn run(args: &crate::cli::ReportArgs) -> anyhow::Result<()> {
    let runs: Vec<RunInfo> = args.runs.iter().map(|d| read_run(d)).collect();
    print!("{}", markdown(&runs));
    if let Some(path) = &args.csv {
        crate::train::write_atomic(path, csv(&runs).as_bytes())?;
    }
    if let Some(path) = &args.plot {
        if runs.iter().all(|r| r.points.is_empty()) {
            eprintln!("cosine-train: no run has an epoch yet; no plot written");
        } else {
            plot(&runs, path)?;
            eprintln!("cosine-train: plot written to {}", path.display());
        }
    }
    Ok(())
}
