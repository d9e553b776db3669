//! The comparison plot: test top-1 (%) and training loss per epoch (one line per run, markers
//! where a run has few points) above the learning rate, as a PNG.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::{EpochPoint, RunInfo};

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

/// Series with at most this many points get a marker at each.
const MARKED_POINTS: usize = 40;

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
    // At most 12 labels on the epoch axis, each on a whole epoch.
    let epoch_ticks = (max_epoch as usize + 1).min(12);
    let (width, height) = PLOT_SIZE;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, PLOT_SIZE).into_drawing_area();
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
                Panel::new(
                    "test top-1",
                    "top-1 (%)",
                    |p| p.test_top1.map(|v| 100.0 * v),
                    100.0,
                ),
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
                .x_labels(epoch_ticks)
                // Epochs are whole numbers.
                .x_label_formatter(&|x| format!("{}", x.round() as i64))
                .light_line_style(TRANSPARENT)
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, r) in plotted.iter().enumerate() {
                let c = colour(i);
                let points = series(r, f);
                // Few points (a run with one evaluation draws no line at all) get markers.
                let marked = points.len() <= MARKED_POINTS;
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                    .label(r.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                if marked {
                    chart.draw_series(
                        points
                            .iter()
                            .map(|&(x, y)| Circle::new((x, y), 4, c.filled())),
                    )?;
                }
            }
            // One legend, where rising accuracy curves leave room (upper left of the accuracy
            // panel, above where they start and left of where they end); the other panels use
            // the same colours.
            if title == "test top-1" {
                draw_legend(&mut chart)?;
            }
        }
        root.present().context("drawing the plot")?;
    }
    write_png(path, &rgb, (width, height))
}

/// One line of a [`curves`] chart: its label and its (x, y) points.
pub type Curve = (String, Vec<(f64, f64)>);

/// A chart of `curves` (y in %, markers at every point) into a PNG at `path` (1000x700); with
/// `log_x` the x axis is logarithmic (learning rates), labelled with the values themselves.
pub fn curves(
    path: &Path,
    title: &str,
    x_desc: &str,
    log_x: bool,
    curves: &[Curve],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let to_x = |x: f64| if log_x { x.max(1e-300).log10() } else { x };
    let xs: Vec<f64> = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, _)| to_x(x)))
        .collect();
    if xs.is_empty() {
        bail!("nothing to plot for {title}");
    }
    let (lo, hi) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let pad = ((hi - lo) * 0.05).max(0.1);
    let size = (1000u32, 700u32);
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((lo - pad)..(hi + pad), 0f64..100f64)?;
        let format_x = |x: &f64| three_digits(if log_x { 10f64.powf(*x) } else { *x });
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("test top-1 (%)")
            .x_label_formatter(&format_x)
            .light_line_style(TRANSPARENT)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (label, points)) in curves.iter().enumerate() {
            let (r, g, b) = PALETTE[i % PALETTE.len()];
            let c = RGBColor(r, g, b);
            let points: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (to_x(x), y)).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, c.filled())),
            )?;
        }
        draw_legend(&mut chart)?;
        root.present().context("drawing the plot")?;
    }
    write_png(path, &rgb, size)
}

/// `v` to three significant digits, without trailing zeros (axis labels).
fn three_digits(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Encodes an RGB buffer of `size` as PNG and writes it to `path` atomically.
fn write_png(path: &Path, rgb: &[u8], size: (u32, u32)) -> anyhow::Result<()> {
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        rgb,
        size.0,
        size.1,
        image::ExtendedColorType::Rgb8,
    )
    .context("encoding the plot as PNG")?;
    datasets_prep::atomic::write_file(path, &png)
        .with_context(|| format!("{}: cannot write the plot", path.display()))
}

/// The legend of a chart's labelled series, upper left on a translucent white box.
fn draw_legend<'a, 'b: 'a>(
    chart: &mut plotters::chart::ChartContext<
        'a,
        plotters::backend::BitMapBackend<'b>,
        plotters::coord::cartesian::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}
