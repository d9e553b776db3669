//! `cosine-train predict`: the top classes of image files under a trained run, with exactly the
//! evaluation preprocessing: the pack's resize of the shorter side, the run's centre crop and
//! the data's normalisation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use datasets_prep::buffers::BufferPool;
use datasets_prep::image_ops::{self, Pixels};
use datasets_prep::{Manifest, ShardDir};
use serde::Serialize;
use tch::{Kind, Tensor};

use super::{choice, threads};
use crate::choice::Choice;
use crate::data::augment::{self, Normalize, Source};
use crate::model::layers::Pass;
use crate::network::Network;
use crate::report::csv_field;
use crate::run_dir::{records, weights};
use crate::runtime::device::DeviceChoice;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Run directory written by `train` (its config.json and data say how to build the model
    /// and prepare the images).
    #[arg(long)]
    pub run: PathBuf,
    /// Weights [default: RUN/model.safetensors, else the run's newest checkpoint].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Image files (JPEG or PNG), or folders searched for them (recursively).
    #[arg(required = true, value_name = "IMAGE|FOLDER")]
    pub inputs: Vec<PathBuf>,
    /// Classes listed per image.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,
    /// Output: table, json (one object per image per line) or csv.
    #[arg(long, value_parser = choice::<OutputFormat>(), default_value = "table")]
    pub format: OutputFormat,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// libtorch intra-op threads [default: libtorch's].
    #[arg(long, value_parser = threads())]
    pub threads: Option<i32>,
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
    Csv,
}

impl Choice for OutputFormat {
    const WHAT: &'static str = "output format";
    const ALL: &'static [OutputFormat] =
        &[OutputFormat::Table, OutputFormat::Json, OutputFormat::Csv];
    fn name(self) -> &'static str {
        match self {
            OutputFormat::Table => "table",
            OutputFormat::Json => "json",
            OutputFormat::Csv => "csv",
        }
    }
}

/// One class of an image's top k.
#[derive(Debug, Serialize)]
pub struct Ranked {
    pub id: String,
    pub name: String,
    /// Softmax probability (cross-entropy heads) or cosine similarity (cosine loss).
    pub score: f64,
}

#[derive(Debug, Serialize)]
pub struct Prediction {
    pub image: String,
    pub top: Vec<Ranked>,
}

/// The largest image file read.
const IMAGE_FILE_LIMIT: u64 = 256 << 20;

pub fn run(args: &PredictArgs) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    args.device.ensure_available()?;
    let device = args.device.resolve(0)?;
    let config = records::read_record(&args.run)?.config;
    let shards = ShardDir::open(&config.data).with_context(|| {
        format!(
            "{}: the run's data, needed for its classes and preprocessing",
            config.data.display()
        )
    })?;
    let manifest = shards.manifest().clone();
    let mut net = Network::build(
        &config,
        i64::from(manifest.channels),
        &manifest.classes,
        device,
    )?;
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => weights::of_run(&args.run)?,
    };
    weights::load(&mut net.vs, &weights, &args.run.display().to_string())?;
    let images = image_files(&args.inputs)?;
    let prep = Preprocess::new(&manifest, config.augment.clone());
    let mut out = std::io::stdout().lock();
    if args.format == OutputFormat::Csv {
        use std::io::Write;
        writeln!(out, "image,rank,class_id,class_name,score")?;
    }
    for path in &images {
        let input = prep.image(path)?;
        let scores = tch::no_grad(|| {
            let out = net.forward(&input.to_device(device), Pass::Eval);
            net.head.scores(&out).to_device(tch::Device::Cpu)
        });
        let prediction = top_k(path, &scores, &manifest, args.top_k as usize)?;
        print_one(&mut out, &prediction, args.format)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The files named, and the JPEG/PNG files under the folders named, in order.
fn image_files(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
        if meta.is_dir() {
            let before = files.len();
            collect_images(input, &mut files)?;
            if files.len() == before {
                anyhow::bail!("{}: holds no .jpg, .jpeg or .png file", input.display());
            }
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn collect_images(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_images(&path, files)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.to_ascii_lowercase().as_str()))
        {
            files.push(path);
        }
    }
    Ok(())
}

/// The evaluation preprocessing of one image file, as the pack and the test loader do it.
struct Preprocess {
    channels: usize,
    short_side: Option<u32>,
    mean: Vec<f32>,
    std: Vec<f32>,
    augment: augment::AugmentConfig,
    pool: BufferPool,
}

impl Preprocess {
    fn new(m: &Manifest, augment: augment::AugmentConfig) -> Self {
        let (mean, std) = crate::data::loader::normalization(m);
        Preprocess {
            channels: usize::from(m.channels),
            short_side: m.resize.short_side,
            mean,
            std,
            augment,
            pool: BufferPool::new(0),
        }
    }

    /// A batch of one: 1 x C x H x W, normalised.
    fn image(&self, path: &Path) -> anyhow::Result<Tensor> {
        let bytes = datasets_prep::bounded::read_limited(path, IMAGE_FILE_LIMIT)?;
        let what = || format!("{}", path.display());
        let mut pixels = image_ops::decode_image(&bytes, &self.pool).with_context(what)?;
        if let Some(side) = self.short_side {
            let mut resizer = fast_image_resize::Resizer::new();
            pixels = image_ops::resize_short_side(pixels, side, &mut resizer, &self.pool)
                .with_context(what)?;
        }
        if self.channels == 1 && pixels.channels == 3 {
            pixels = to_grey(&pixels);
        }
        let src = Source {
            pixels: &pixels.data,
            height: pixels.height as usize,
            width: pixels.width as usize,
            channels: usize::from(pixels.channels),
        };
        let (h, w) = match self.augment.crop {
            Some(c) => (c as usize, c as usize),
            None => (src.height, src.width),
        };
        let mut buf = vec![0f32; self.channels * h * w];
        let norm = Normalize {
            mean: &self.mean,
            std: &self.std,
        };
        augment::process(&src, self.channels, &norm, &self.augment, None, &mut buf);
        Ok(Tensor::from_slice(&buf).view([1, self.channels as i64, h as i64, w as i64]))
    }
}

/// ITU-R 601 luma, as Pillow's `convert("L")`.
fn to_grey(p: &Pixels) -> Pixels {
    let data = p
        .data
        .chunks_exact(3)
        .map(|c| {
            let y = (299 * u32::from(c[0]) + 587 * u32::from(c[1]) + 114 * u32::from(c[2]) + 500)
                / 1000;
            y.min(255) as u8
        })
        .collect();
    Pixels {
        height: p.height,
        width: p.width,
        channels: 1,
        data,
    }
}

fn top_k(path: &Path, scores: &Tensor, m: &Manifest, k: usize) -> anyhow::Result<Prediction> {
    let scores: Vec<f64> = Vec::try_from(scores.view([-1]).to_kind(Kind::Double))?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Highest first; ties in class order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let top = order
        .into_iter()
        .take(k)
        .map(|c| Ranked {
            id: m.classes[c].id.clone(),
            name: m.classes[c].name.clone(),
            score: scores[c],
        })
        .collect();
    Ok(Prediction {
        image: path.display().to_string(),
        top,
    })
}

fn print_one(
    out: &mut impl std::io::Write,
    p: &Prediction,
    format: OutputFormat,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(p)?)?,
        OutputFormat::Csv => {
            for (rank, r) in p.top.iter().enumerate() {
                writeln!(
                    out,
                    "{},{},{},{},{:.6}",
                    csv_field(&p.image),
                    rank + 1,
                    csv_field(&r.id),
                    csv_field(&r.name),
                    r.score
                )?;
            }
        }
        OutputFormat::Table => {
            writeln!(out, "{}", p.image)?;
            for (rank, r) in p.top.iter().enumerate() {
                let class = if r.name == r.id {
                    r.id.clone()
                } else {
                    format!("{} ({})", r.name, r.id)
                };
                writeln!(out, "  {:>2}. {class:<30} {:.4}", rank + 1, r.score)?;
            }
        }
    }
    Ok(())
}
