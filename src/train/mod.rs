//! `cosine-train train`: the epoch loop of one rank of a data-parallel job (a job of one rank
//! being the plain single-process run), and the run directory rank 0 writes (`config.json`,
//! `metrics.jsonl`, `log.txt`, `model.safetensors`).
//!
//! Every rank executes the same sequence of collectives whatever its data: a rank whose share of
//! a batch is empty still joins the gradient all-reduce; evaluation, BatchNorm averaging and
//! checksums run on all ranks; only file writes are rank 0's, and they sit outside collectives.

pub mod eval;
pub mod files;
pub mod replicas;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use datasets_prep::{ShardDir, Split};
use serde_json::json;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

pub use eval::{EvalCounts, class_similarity, evaluate, recompute_bn_statistics};
pub use files::write_atomic;

use crate::config::RunConfig;
use crate::data::loader::LoaderSpec;
use crate::data::{batches, epoch_order};
use crate::dist::Communicator;
use crate::fault::Fault;
use crate::model::Backbone;
use crate::objective::{Head, HeadOutput};
use crate::optim::Sgd;
use files::RunFiles;
use replicas::{GradSync, average_bn_buffers, broadcast_model, check_same_model, share};

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

/// Builds the network for `config` and the data of `shards` on `device`, initialised from the
/// seed.
pub fn build_network(
    config: &RunConfig,
    shards: &ShardDir,
    device: Device,
) -> anyhow::Result<Network> {
    let m = shards.manifest();
    build_network_for(config, i64::from(m.channels), &m.classes, device)
}

/// Builds the network for `config`, images of `channels` channels and `classes`, on `device`.
pub fn build_network_for(
    config: &RunConfig,
    channels: i64,
    classes: &[datasets_prep::manifest::ClassInfo],
    device: Device,
) -> anyhow::Result<Network> {
    tch::manual_seed(config.seed as i64);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let backbone = Backbone::new(config.arch, &root, channels);
    let class_embedding = if config.objective.loss.uses_embedding() {
        Some(crate::embedding::load(&config.embedding, classes)?.to_device(device))
    } else {
        None
    };
    let head = Head::new(
        &root,
        config.objective,
        backbone.out_dim(),
        classes.len() as i64,
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
    /// Largest gradient all-reduce call, in MiB.
    pub bucket_mb: usize,
}

/// Makes the run directory (rank 0): refuses to overwrite a run unless `force`.
fn prepare_run_dir(out: &Path, force: bool) -> anyhow::Result<()> {
    if out.join("metrics.jsonl").exists() && !force {
        bail!(
            "{}: already holds a run (metrics.jsonl); choose another --out or pass --force",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the run directory", out.display()))?;
    for name in ["metrics.jsonl", "log.txt", "model.safetensors"] {
        let _ = std::fs::remove_file(out.join(name));
    }
    Ok(())
}

/// Saves the variables as `.safetensors` atomically (temp file, then rename).
pub fn save_weights(vs: &nn::VarStore, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}.safetensors", std::process::id()));
    vs.save(&tmp)
        .with_context(|| format!("{}: cannot write the weights", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// Trains `config` as one rank of the job `comm` connects and (on rank 0) writes the run
/// directory. All ranks return the same summary.
pub fn train(
    config: &RunConfig,
    opts: &RunOptions,
    comm: &dyn Communicator,
) -> anyhow::Result<RunSummary> {
    let (rank, world) = (comm.rank(), comm.size());
    let lead = rank == 0;
    let shards = Arc::new(
        ShardDir::open(Path::new(&config.data))
            .with_context(|| format!("--data {}: not a usable shard directory", config.data))?,
    );
    let m = shards.manifest().clone();
    if lead {
        prepare_run_dir(&opts.out, opts.force)?;
    }
    let similarity = config
        .hierarchy
        .as_deref()
        .map(|path| class_similarity(path, config.hierarchy_is_a, &m.classes))
        .transpose()?;
    let net = build_network(config, &shards, opts.device)?;
    broadcast_model(&net.vs, comm)?;
    check_same_model(&net.vs, comm, "before the first step")?;
    let mut opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(config));
    let mut sync = GradSync::new(&opt.params, comm, opts.device, opts.bucket_mb);
    let params: i64 = opt.params.iter().map(|p| p.tensor.numel() as i64).sum();

    let n_train = m.train.count as usize;
    let steps_per_epoch = batches(n_train, config.batch_size);
    let terminal = std::io::stderr().is_terminal();
    let mut files = None;
    if lead {
        let resolved = json!({
            "config": config,
            "world_size": world,
            "backend": comm.backend().to_string(),
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
        let mut f = RunFiles::open(&opts.out, !terminal)?;
        f.log(&format!(
            "train {} ({} classes, {} train / {} test images) {} {} on {:?} x {world} rank(s) ({}): {} parameters, {} epochs x {} steps of global batch {}",
            m.dataset,
            m.classes.len(),
            m.train.count,
            m.test.count,
            config.arch,
            config.objective.loss,
            opts.device,
            comm.backend(),
            params,
            config.epochs,
            steps_per_epoch,
            config.batch_size
        ))?;
        files = Some(f);
    }

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

    let bar = if terminal && lead {
        indicatif::ProgressBar::new((config.epochs * steps_per_epoch) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let fault = Fault::from_env()?;
    let autocast = config.precision == "bf16" && opts.device.is_cuda();
    let sync_bn = config.sync_bn && world > 1;
    let batch_size = config.batch_size.max(1);
    let (mut best, mut best_epoch, mut last) = (f64::NAN, 0usize, f64::NAN);
    let mut global_step = 0u64;
    for epoch in 0..config.epochs {
        let start = Instant::now();
        bar.set_prefix(format!("{}/{}", epoch + 1, config.epochs));
        // The global batches are cut from the epoch order as in a one-rank run; each rank
        // takes a contiguous share of every batch.
        let order = epoch_order(config.seed, epoch as u64, n_train);
        let mut sizes = Vec::with_capacity(steps_per_epoch);
        let plan: Vec<_> = (0..steps_per_epoch)
            .map(|b| {
                let global = b * batch_size..((b + 1) * batch_size).min(n_train);
                sizes.push(global.len());
                let mine = share(global.len(), world, rank);
                global.start + mine.start..global.start + mine.end
            })
            .collect();
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        let mut lr = config
            .schedule
            .lr_at(epoch, 0, steps_per_epoch, config.epochs);
        for (step, batch) in train_loader
            .start_plan(epoch as u64, Arc::new(order), plan, true)
            .enumerate()
        {
            let batch = batch?;
            global_step += 1;
            fault.before_step(rank, global_step, opt.params.first().map(|p| &p.tensor))?;
            let global_n = sizes[step];
            lr = config
                .schedule
                .lr_at(epoch, step, steps_per_epoch, config.epochs);
            opt.zero_grad();
            let local_loss = if batch.is_empty() && !sync_bn {
                None
            } else {
                let (images, labels) = batch.to_device(opts.device);
                // An empty share still runs the forward pass when the BatchNorms are
                // synchronised (every rank joins their all-reduces), but has no loss.
                let forward = || {
                    tch::autocast(autocast, || {
                        let out = net.forward_t(&images, true);
                        (!batch.is_empty()).then(|| net.head.loss(&out, &labels))
                    })
                };
                let loss = if sync_bn {
                    crate::model::sync_bn::with_sync_bn(comm, forward)
                } else {
                    forward()
                };
                loss.map(|loss| {
                    // This rank's share of the global-batch mean; the all-reduce adds the
                    // shares.
                    let loss = if world == 1 {
                        loss
                    } else {
                        loss * (batch.len() as f64 / global_n as f64)
                    };
                    loss.backward();
                    loss.detach()
                })
            };
            comm.set_context(&format!(
                "gradient all-reduce, epoch {} step {}",
                epoch + 1,
                step + 1
            ));
            let (grads, value) = sync.reduce(&opt.params, local_loss.as_ref(), comm)?;
            if !value.is_finite() {
                bail!(
                    "the loss became {value} at epoch {} step {} (lr {lr}); stopping (metrics so far are kept)",
                    epoch + 1,
                    step + 1
                );
            }
            opt.step_with(lr, grads);
            loss_sum += value * global_n as f64;
            seen += global_n;
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
        if world > 1 {
            record["sync_seconds"] = json!(sync.take_seconds());
        }
        if (epoch + 1) % config.eval_every.max(1) == 0 || epoch + 1 == config.epochs {
            if config.bn_stats == "precise" {
                recompute_bn_statistics(&net, &train_loader, batch_size, opts.device, comm)?;
            } else {
                average_bn_buffers(&net.vs, comm, 1.0)?;
            }
            let checksum = check_same_model(&net.vs, comm, &format!("after epoch {}", epoch + 1))?;
            let counts = evaluate(
                &net,
                &test_loader,
                batch_size,
                m.classes.len(),
                opts.device,
                similarity.as_deref(),
                comm,
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
            record["model_checksum"] = json!(format!("{checksum:016x}"));
        }
        record["seconds"] = json!(start.elapsed().as_secs_f64());
        if let Some(files) = files.as_mut() {
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
    }
    bar.finish_and_clear();
    let summary = RunSummary {
        best_top1: best,
        best_epoch,
        last_top1: last,
    };
    comm.set_context("end of the run (waiting for rank 0 to write the run directory)");
    if let Some(files) = files.as_mut() {
        save_weights(&net.vs, &opts.out.join("model.safetensors"))?;
        files.metric(&json!({"summary": true, "best_top1": best, "best_epoch": best_epoch, "last_top1": last, "epochs": config.epochs, "world_size": world}))?;
        let line = format!(
            "done: best test top-1 {:.2}% (epoch {best_epoch}), last {:.2}%",
            100.0 * best,
            100.0 * last
        );
        files.log(&line)?;
        if terminal {
            eprintln!("{line}");
        }
    }
    // No rank leaves before rank 0 has written everything (an error there ends all ranks).
    comm.barrier().context("final barrier")?;
    Ok(summary)
}
