//! `cosine-train train`: one process, CPU or one GPU. The epoch loop, evaluation and the run
//! directory (`config.json`, `metrics.jsonl`, `log.txt`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use datasets_prep::{ShardDir, Split};
use serde_json::json;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

use crate::config::RunConfig;
use crate::data::loader::LoaderSpec;
use crate::data::{batches, epoch_order};
use crate::model::Backbone;
use crate::objective::{Head, HeadOutput};
use crate::optim::Sgd;

/// The model: backbone and head in one variable store.
pub struct Network {
    pub vs: nn::VarStore,
    pub backbone: Backbone,
    pub head: Head,
}

impl Network {
    pub fn forward_t(&self, images: &Tensor, train: bool) -> HeadOutput {
        let features = self.backbone.forward_t(images, train);
        self.head.forward_t(&features, train)
    }
}

/// Builds the network for `config` on `device`, initialised from the seed.
pub fn build_network(
    config: &RunConfig,
    shards: &ShardDir,
    device: Device,
) -> anyhow::Result<Network> {
    let m = shards.manifest();
    tch::manual_seed(config.seed as i64);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let backbone = Backbone::new(config.arch, &root, i64::from(m.channels));
    let class_embedding = if config.objective.loss.uses_embedding() {
        Some(crate::embedding::load(&config.embedding, &m.classes)?.to_device(device))
    } else {
        None
    };
    let head = Head::new(
        &root,
        config.objective,
        backbone.out_dim(),
        m.classes.len() as i64,
        class_embedding,
    );
    Ok(Network { vs, backbone, head })
}

/// The L2 coefficient of every trainable tensor (reference-spec 4.6).
pub fn l2_of(config: &RunConfig) -> impl Fn(&str, &Tensor) -> f64 + '_ {
    move |name, tensor| match Head::l2_of(name) {
        Some(l2) => l2,
        // Kernels (convs, dense) have two or more dimensions; biases and BN parameters one.
        None if tensor.dim() >= 2 => config.arch.kernel_l2(),
        None => 0.0,
    }
}

/// Correct predictions per class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalCounts {
    pub total: Vec<u64>,
    pub correct: Vec<u64>,
    /// Cosine+CE: the embedding's nearest-class predictions.
    pub embedding_correct: Option<Vec<u64>>,
    /// With a hierarchy: the sum over samples of S[prediction][truth].
    pub hierarchical_sum: Option<f64>,
}

impl EvalCounts {
    pub fn top1(&self) -> f64 {
        ratio(self.correct.iter().sum(), self.total.iter().sum())
    }
    /// Mean of the per-class accuracies (classes without test images left out).
    pub fn balanced(&self) -> f64 {
        let per_class: Vec<f64> = self
            .total
            .iter()
            .zip(&self.correct)
            .filter(|(t, _)| **t > 0)
            .map(|(&t, &c)| c as f64 / t as f64)
            .collect();
        if per_class.is_empty() {
            0.0
        } else {
            per_class.iter().sum::<f64>() / per_class.len() as f64
        }
    }
    pub fn hierarchical(&self) -> Option<f64> {
        let n: u64 = self.total.iter().sum();
        self.hierarchical_sum
            .map(|s| if n == 0 { 0.0 } else { s / n as f64 })
    }
    pub fn embedding_top1(&self) -> Option<f64> {
        self.embedding_correct
            .as_ref()
            .map(|c| ratio(c.iter().sum(), self.total.iter().sum()))
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Class similarities S (C x C, row-major, manifest class order) from a hierarchy file.
pub fn class_similarity(
    path: &str,
    is_a: bool,
    classes: &[datasets_prep::manifest::ClassInfo],
) -> anyhow::Result<Vec<f64>> {
    let h = crate::hierarchy::Hierarchy::from_file(Path::new(path), is_a)?;
    let ids: Vec<i64> = classes
        .iter()
        .map(|c| {
            c.id.parse::<i64>().with_context(|| {
                format!(
                    "--hierarchy {path}: class id {:?} of the data is not an integer",
                    c.id
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let leaves = h.leaves();
    let missing: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|i| leaves.binary_search(i).is_err())
        .take(10)
        .collect();
    if !missing.is_empty() {
        bail!(
            "--hierarchy {path}: classes {missing:?} of the data are not leaves of the hierarchy"
        );
    }
    Ok(h.similarity(&ids))
}

/// Evaluates on the test split, in order, without augmentation. `similarity` (C x C) adds the
/// hierarchical accuracy.
pub fn evaluate(
    net: &Network,
    loader: &LoaderSpec,
    batch: usize,
    classes: usize,
    device: Device,
    similarity: Option<&[f64]>,
) -> anyhow::Result<EvalCounts> {
    let n = loader.shards.split(Split::Test).len();
    let mut counts = EvalCounts {
        total: vec![0; classes],
        correct: vec![0; classes],
        embedding_correct: None,
        hierarchical_sum: similarity.map(|_| 0.0),
    };
    tch::no_grad(|| -> anyhow::Result<()> {
        for b in loader.start(0, (0..n).collect(), batch, false) {
            let b = b?;
            let out = net.forward_t(&b.to_device(device).0, false);
            let (pred, embedding_pred) = net.head.predict(&out);
            let labels = Vec::<i64>::try_from(&b.labels)?;
            let pred = Vec::<i64>::try_from(pred.to_device(Device::Cpu))?;
            let embedding_pred = embedding_pred
                .map(|p| Vec::<i64>::try_from(p.to_device(Device::Cpu)))
                .transpose()?;
            for (k, &y) in labels.iter().enumerate() {
                let y = y as usize;
                counts.total[y] += 1;
                counts.correct[y] += u64::from(pred[k] == y as i64);
                if let (Some(sum), Some(s)) = (counts.hierarchical_sum.as_mut(), similarity) {
                    *sum += s[pred[k] as usize * classes + y];
                }
                if let Some(e) = &embedding_pred {
                    counts
                        .embedding_correct
                        .get_or_insert_with(|| vec![0; classes])[y] += u64::from(e[k] == y as i64);
                }
            }
        }
        Ok(())
    })?;
    Ok(counts)
}

/// Replaces every BatchNorm's running statistics by their average over one pass of the
/// training images, preprocessed as test images are (precise BN).
pub fn recompute_bn_statistics(
    net: &Network,
    loader: &LoaderSpec,
    batch: usize,
    device: Device,
) -> anyhow::Result<()> {
    let n = loader.shards.split(Split::Train).len();
    tch::no_grad(|| {
        crate::model::layers::with_precise_bn(|| -> anyhow::Result<()> {
            for b in loader.start(0, (0..n).collect(), batch, false) {
                let _ = net.forward_t(&b?.to_device(device).0, true);
            }
            Ok(())
        })
    })
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: write failed", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// Appends lines to `metrics.jsonl` and `log.txt`, flushing each.
struct RunFiles {
    metrics: std::fs::File,
    log: std::fs::File,
    echo: bool,
}

impl RunFiles {
    fn open(out: &Path, echo: bool) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let path = out.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("{}: cannot open", path.display()))
        };
        Ok(RunFiles {
            metrics: open("metrics.jsonl")?,
            log: open("log.txt")?,
            echo,
        })
    }
    fn metric(&mut self, value: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.metrics, "{value}")
            .and_then(|_| self.metrics.flush())
            .context("writing metrics.jsonl")
    }
    fn log(&mut self, line: &str) -> anyhow::Result<()> {
        if self.echo {
            eprintln!("{line}");
        }
        writeln!(self.log, "{line}")
            .and_then(|_| self.log.flush())
            .context("writing log.txt")
    }
}

/// Best and last test accuracy of a finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub best_top1: f64,
    pub best_epoch: usize,
    pub last_top1: f64,
}

/// What `train` needs besides the configuration.
pub struct RunOptions {
    pub out: PathBuf,
    pub device: Device,
    pub workers: usize,
    pub force: bool,
}

/// Trains `config` and writes the run directory.
pub fn train(config: &RunConfig, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let shards = Arc::new(
        ShardDir::open(Path::new(&config.data))
            .with_context(|| format!("--data {}: not a usable shard directory", config.data))?,
    );
    let m = shards.manifest().clone();
    if opts.out.join("metrics.jsonl").exists() && !opts.force {
        bail!(
            "{}: already holds a run (metrics.jsonl); choose another --out or pass --force",
            opts.out.display()
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("{}: cannot create the run directory", opts.out.display()))?;
    for name in ["metrics.jsonl", "log.txt"] {
        let _ = std::fs::remove_file(opts.out.join(name));
    }

    let similarity = config
        .hierarchy
        .as_deref()
        .map(|path| class_similarity(path, config.hierarchy_is_a, &m.classes))
        .transpose()?;
    let net = build_network(config, &shards, opts.device)?;
    let mut opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(config));
    let params: i64 = opt.params.iter().map(|p| p.tensor.numel() as i64).sum();

    let resolved = json!({
        "config": config,
        "world_size": 1,
        "parameters": params,
        "classes": m.classes.len(),
        "train_images": m.train.count,
        "test_images": m.test.count,
        "dataset": m.dataset,
        "versions": {
            "cosine_train": env!("CARGO_PKG_VERSION"),
            "git": env!("COSINE_GIT_REVISION"),
            "libtorch_threads": tch::get_num_threads(),
        },
    });
    write_atomic(
        &opts.out.join("config.json"),
        serde_json::to_string_pretty(&resolved)?.as_bytes(),
    )?;

    let channels = usize::from(m.channels);
    let spec = |split, augment| LoaderSpec {
        shards: Arc::clone(&shards),
        split,
        augment,
        channels,
        mean: m.train_mean.iter().map(|&v| v as f32).collect(),
        std: m.train_std.iter().map(|&v| (v as f32).max(1e-3)).collect(),
        seed: config.seed,
        workers: opts.workers,
        prefetch: 2 * opts.workers.max(1),
        pin_for: opts.device.is_cuda().then_some(opts.device),
    };
    let train_loader = spec(Split::Train, config.augment.clone());
    let test_loader = spec(Split::Test, config.augment.clone());

    let terminal = std::io::stderr().is_terminal();
    let mut files = RunFiles::open(&opts.out, !terminal)?;
    let n_train = m.train.count as usize;
    let steps_per_epoch = batches(n_train, config.batch_size);
    files.log(&format!(
        "train {} ({} classes, {} train / {} test images) {} {} on {:?}: {} parameters, {} epochs x {} steps of batch {}",
        m.dataset,
        m.classes.len(),
        m.train.count,
        m.test.count,
        config.arch,
        config.objective.loss,
        opts.device,
        params,
        config.epochs,
        steps_per_epoch,
        config.batch_size
    ))?;

    let bar = if terminal {
        indicatif::ProgressBar::new((config.epochs * steps_per_epoch) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let autocast = config.precision == "bf16" && opts.device.is_cuda();
    let (mut best, mut best_epoch, mut last) = (f64::NAN, 0usize, f64::NAN);
    for epoch in 0..config.epochs {
        let start = Instant::now();
        bar.set_prefix(format!("{}/{}", epoch + 1, config.epochs));
        let order = epoch_order(config.seed, epoch as u64, n_train);
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        let mut lr = config
            .schedule
            .lr_at(epoch, 0, steps_per_epoch, config.epochs);
        for (step, batch) in train_loader
            .start(epoch as u64, order, config.batch_size, true)
            .enumerate()
        {
            let batch = batch?;
            lr = config
                .schedule
                .lr_at(epoch, step, steps_per_epoch, config.epochs);
            let (images, labels) = batch.to_device(opts.device);
            let loss = tch::autocast(autocast, || {
                let out = net.forward_t(&images, true);
                net.head.loss(&out, &labels)
            });
            let value = f64::try_from(&loss)?;
            if !value.is_finite() {
                bail!(
                    "the loss became {value} at epoch {} step {} (lr {lr}); stopping (metrics so far are kept)",
                    epoch + 1,
                    step + 1
                );
            }
            opt.zero_grad();
            loss.backward();
            opt.step(lr);
            let n = labels.size()[0] as usize;
            loss_sum += value * n as f64;
            seen += n;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} lr {lr:.3e} {:.0} img/s",
                loss_sum / seen as f64,
                seen as f64 / start.elapsed().as_secs_f64()
            ));
        }
        let train_secs = start.elapsed().as_secs_f64();
        let mut record = json!({
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen.max(1) as f64,
            "images_per_sec": seen as f64 / train_secs,
            "train_seconds": train_secs,
        });
        if (epoch + 1) % config.eval_every.max(1) == 0 || epoch + 1 == config.epochs {
            if config.bn_stats == "precise" {
                recompute_bn_statistics(&net, &train_loader, config.batch_size, opts.device)?;
            }
            let counts = evaluate(
                &net,
                &test_loader,
                config.batch_size,
                m.classes.len(),
                opts.device,
                similarity.as_deref(),
            )?;
            last = counts.top1();
            if best.is_nan() || last > best {
                best = last;
                best_epoch = epoch + 1;
            }
            record["test_top1"] = json!(last);
            record["test_balanced"] = json!(counts.balanced());
            if let Some(h) = counts.hierarchical() {
                record["test_hierarchical"] = json!(h);
            }
            if let Some(e) = counts.embedding_top1() {
                record["test_head_top1"] = json!(last);
                record["test_embedding_top1"] = json!(e);
            }
        }
        record["seconds"] = json!(start.elapsed().as_secs_f64());
        files.metric(&record)?;
        let line = format!(
            "epoch {:>4}/{} lr {:.3e} loss {:.4} test top-1 {} ({:.0} img/s, {:.1}s)",
            epoch + 1,
            config.epochs,
            lr,
            loss_sum / seen.max(1) as f64,
            record
                .get("test_top1")
                .and_then(|v| v.as_f64())
                .map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
            seen as f64 / train_secs,
            start.elapsed().as_secs_f64()
        );
        if terminal {
            bar.println(&line);
        }
        files.log(&line)?;
    }
    bar.finish_and_clear();
    let summary = RunSummary {
        best_top1: best,
        best_epoch,
        last_top1: last,
    };
    files.metric(&json!({"summary": true, "best_top1": best, "best_epoch": best_epoch, "last_top1": last, "epochs": config.epochs}))?;
    let line = format!(
        "done: best test top-1 {:.2}% (epoch {best_epoch}), last {:.2}%",
        100.0 * best,
        100.0 * last
    );
    files.log(&line)?;
    if terminal {
        eprintln!("{line}");
    }
    Ok(summary)
}
