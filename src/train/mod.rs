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
pub mod resume;

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
use crate::runtime::fault::Fault;
use crate::model::Backbone;
use crate::objective::{Head, HeadOutput};
use crate::optim::Sgd;
use files::RunFiles;
use replicas::{GradSync, average_bn_buffers, broadcast_model, check_same_model, share};
use resume::ResumeMode;

/// The model: backbone and head in one variable store.
pub struct Network {
    pub vs: nn::VarStore,
    pub backbone: Backbone,
    pub head: Head,
    /// Images and kernels in channels-last memory order (`--channels-last`).
    pub channels_last: bool,
}

impl Network {
    pub fn forward_t(&self, images: &Tensor, train: bool) -> HeadOutput {
        let features = if self.channels_last {
            self.backbone
                .forward_t(&crate::model::channels_last(images), train)
        } else {
            self.backbone.forward_t(images, train)
        };
        self.head.forward_t(&features, train)
    }

    /// Switches to channels-last memory order (before the optimiser is built, so that its
    /// velocities follow).
    pub fn use_channels_last(&mut self) {
        crate::model::to_channels_last(&self.vs);
        self.channels_last = true;
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
    Ok(Network {
        vs,
        backbone,
        head,
        channels_last: false,
    })
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
    /// Also checkpoint every this many optimiser steps (0: only at the end of each epoch).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    pub resume: Option<ResumeMode>,
    /// Channels-last memory order (resolved `--channels-last`).
    pub channels_last: bool,
}

/// The run stopped early on a preemption signal after writing a checkpoint; exit with
/// [`crate::runtime::signals::EXIT_PREEMPTED`] and resume later.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped by {signal} after step {step}; checkpoint {checkpoint}; resume with --resume auto"
)]
pub struct Stopped {
    pub signal: &'static str,
    pub step: u64,
    pub checkpoint: String,
}

/// Makes the run directory (rank 0): refuses to overwrite a run unless `force` (or resuming).
fn prepare_run_dir(out: &Path, force: bool, resuming: bool) -> anyhow::Result<()> {
    let has_run = out.join("metrics.jsonl").exists();
    if has_run && !force && !resuming {
        bail!(
            "{}: already holds a run (metrics.jsonl); choose another --out, pass --force to \
             replace it, or --resume to continue it",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the run directory", out.display()))?;
    if !resuming {
        for name in ["metrics.jsonl", "log.txt", "model.safetensors"] {
            let _ = std::fs::remove_file(out.join(name));
        }
        let _ = std::fs::remove_dir_all(resume::checkpoints_dir(out));
    }
    Ok(())
}

/// Checks that the run directory takes files and has room for `count` checkpoints of `bytes`.
fn check_room(out: &Path, bytes: u64, count: u64) -> anyhow::Result<()> {
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("{}: the run directory is not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    let Ok(path) = std::ffi::CString::new(out.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: statvfs fills the struct for a NUL-terminated path; nothing is kept.
    let free = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut st) == 0)
            .then(|| st.f_bavail as u64 * st.f_frsize as u64)
    };
    let need = bytes.saturating_mul(count);
    if let Some(free) = free
        && free < need
    {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        bail!(
            "{}: {:.1} MiB free, but {count} checkpoints of {:.1} MiB need {:.1} MiB \
             (free space, or lower --keep-checkpoints)",
            out.display(),
            mib(free),
            mib(bytes),
            mib(need)
        );
    }
    Ok(())
}

/// Saves the variables as `.safetensors` atomically (temp file, then rename).
pub fn save_weights(vs: &nn::VarStore, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}.safetensors", std::process::id()));
    // Contiguous copies: channels-last kernels are strided, which the writer refuses.
    let tensors: Vec<(String, Tensor)> = crate::tensors::sorted_variables(vs)
        .into_iter()
        .map(|(name, t)| (name, t.contiguous()))
        .collect();
    Tensor::write_safetensors(&tensors, &tmp)
        .with_context(|| format!("{}: cannot write the weights", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// Where training stands, as a checkpoint records it.
struct Progress {
    epoch: usize,
    step: usize,
    global_step: u64,
    loss_sum: f64,
    seen: usize,
    best: f64,
    best_epoch: usize,
    last: f64,
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
    let manifest = resume::manifest_hash(&config.data)?;
    if lead {
        prepare_run_dir(&opts.out, opts.force, opts.resume.is_some())?;
    }
    let similarity = config
        .hierarchy
        .as_deref()
        .map(|path| class_similarity(path, config.hierarchy_is_a, &m.classes))
        .transpose()?;
    let mut net = build_network(config, &shards, opts.device)?;
    if opts.channels_last {
        net.use_channels_last();
    }
    broadcast_model(&net.vs, comm)?;
    let mut opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(config));
    let params: i64 = opt.params.iter().map(|p| p.tensor.numel() as i64).sum();
    if lead {
        let state_bytes: i64 = net
            .vs
            .variables()
            .values()
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum();
        // Model and velocities; the partial copy of a new checkpoint exists beside the kept ones.
        let one = (state_bytes + 4 * params) as u64;
        check_room(&opts.out, one, opts.keep_checkpoints.max(1) as u64 + 1)?;
    }

    let terminal = std::io::stderr().is_terminal();
    let mut warnings = Vec::new();
    let loaded = match &opts.resume {
        Some(mode) => resume::fetch(&opts.out, mode, comm, &mut |w| warnings.push(w.to_string()))?,
        None => None,
    };
    let mut progress = Progress {
        epoch: 0,
        step: 0,
        global_step: 0,
        loss_sum: 0.0,
        seen: 0,
        best: f64::NAN,
        best_epoch: 0,
        last: f64::NAN,
    };
    if let Some(l) = &loaded {
        resume::restore(l, config, &manifest, &net.vs, &mut opt, comm)?;
        let st = &l.state;
        progress = Progress {
            epoch: st.epoch,
            step: st.step,
            global_step: st.global_step,
            loss_sum: st.loss_sum,
            seen: st.seen,
            best: st.best_top1.unwrap_or(f64::NAN),
            best_epoch: st.best_epoch,
            last: st.last_top1.unwrap_or(f64::NAN),
        };
    }
    // A resume may restore per-rank BatchNorm statistics; the parameters must agree anyway.
    check_same_model(&net.vs, comm, "before the first step", loaded.is_none())?;
    let mut sync = GradSync::new(&opt.params, comm, opts.device, opts.bucket_mb);

    let n_train = m.train.count as usize;
    let steps_per_epoch = batches(n_train, config.batch_size);
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
        if let Some(l) = &loaded {
            RunFiles::truncate_metrics(&opts.out, l.state.metrics_bytes)?;
        }
        let mut f = RunFiles::open(&opts.out, !terminal)?;
        for w in &warnings {
            f.log(&format!("warning: {w}"))?;
        }
        if let Some(l) = &loaded {
            f.log(&format!(
                "resumed from {} at epoch {} step {} (world size {} then, {world} now)",
                l.dir.display(),
                progress.epoch + 1,
                progress.step,
                l.state.world_size
            ))?;
        }
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
    bar.set_position((progress.epoch * steps_per_epoch + progress.step) as u64);
    crate::runtime::signals::install();
    let fault = Fault::from_env()?;
    let bf16 = config.precision == "bf16";
    let sync_bn = config.sync_bn && world > 1;
    let batch_size = config.batch_size.max(1);
    let checkpoint = |progress: &Progress, opt: &Sgd, files: &Option<RunFiles>| {
        let state = crate::checkpoint::State {
            format: crate::checkpoint::FORMAT,
            config: config.clone(),
            manifest_xxh3: manifest.clone(),
            world_size: world,
            epoch: progress.epoch,
            step: progress.step,
            global_step: progress.global_step,
            loss_sum: progress.loss_sum,
            seen: progress.seen,
            best_top1: (!progress.best.is_nan()).then_some(progress.best),
            best_epoch: progress.best_epoch,
            last_top1: (!progress.last.is_nan()).then_some(progress.last),
            metrics_bytes: files.as_ref().map_or(0, RunFiles::metrics_len),
            files: Default::default(),
        };
        resume::save(&opts.out, opts.keep_checkpoints, &net.vs, opt, comm, state)
    };
    while progress.epoch < config.epochs {
        let epoch = progress.epoch;
        let start = Instant::now();
        bar.set_prefix(format!("{}/{}", epoch + 1, config.epochs));
        // The global batches are cut from the epoch order as in a one-rank run; each rank
        // takes a contiguous share of every batch. A resumed epoch skips the steps done.
        let order = epoch_order(config.seed, epoch as u64, n_train);
        let mut sizes = Vec::with_capacity(steps_per_epoch);
        let plan: Vec<_> = (progress.step..steps_per_epoch)
            .map(|b| {
                let global = b * batch_size..((b + 1) * batch_size).min(n_train);
                sizes.push(global.len());
                let mine = share(global.len(), world, rank);
                global.start + mine.start..global.start + mine.end
            })
            .collect();
        let first_step = progress.step;
        let mut lr = config
            .schedule
            .lr_at(epoch, first_step, steps_per_epoch, config.epochs);
        for (i, batch) in train_loader
            .start_plan(epoch as u64, Arc::new(order), plan, true)
            .enumerate()
        {
            let step = first_step + i;
            let batch = batch?;
            fault.before_step(
                rank,
                progress.global_step + 1,
                opt.params.first().map(|p| &p.tensor),
            )?;
            let global_n = sizes[i];
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
                    crate::runtime::autocast::bf16(bf16, opts.device, || {
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
            if world > 1 {
                comm.set_context(&format!(
                    "gradient all-reduce, epoch {} step {}",
                    epoch + 1,
                    step + 1
                ));
            }
            let stop_requested = crate::runtime::signals::requested();
            let (grads, totals) = sync.reduce(
                &opt.params,
                local_loss.as_ref(),
                stop_requested.is_some(),
                comm,
            )?;
            let value = totals.loss;
            if !value.is_finite() {
                bail!(
                    "the loss became {value} at epoch {} step {} (lr {lr}); stopping (metrics so far are kept)",
                    epoch + 1,
                    step + 1
                );
            }
            opt.step_with(lr, grads);
            progress.global_step += 1;
            progress.step = step + 1;
            progress.loss_sum += value * global_n as f64;
            progress.seen += global_n;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} lr {lr:.3e} {:.0} img/s",
                progress.loss_sum / progress.seen.max(1) as f64,
                (progress.seen as f64) / start.elapsed().as_secs_f64()
            ));
            let end_of_epoch = progress.step == steps_per_epoch;
            if totals.stop {
                // Every rank saw the same flag in the all-reduce: all stop after this step.
                let written = checkpoint(&progress, &opt, &files)?;
                let signal = crate::runtime::signals::name(stop_requested.unwrap_or(libc::SIGTERM));
                let stopped = Stopped {
                    signal: if stop_requested.is_some() {
                        signal
                    } else {
                        "another rank's signal"
                    },
                    step: progress.global_step,
                    checkpoint: written
                        .map_or_else(|| "written by rank 0".into(), |p| p.display().to_string()),
                };
                if let Some(f) = files.as_mut() {
                    f.log(&stopped.to_string())?;
                }
                bar.abandon();
                return Err(stopped.into());
            }
            if opts.checkpoint_every > 0
                && progress.global_step.is_multiple_of(opts.checkpoint_every)
                && !end_of_epoch
            {
                checkpoint(&progress, &opt, &files)?;
            }
        }
        let train_secs = start.elapsed().as_secs_f64();
        // Images trained in this process (a resumed epoch counts only the steps run here).
        let epoch_images: usize = sizes.iter().sum();
        let mut record = json!({
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": progress.loss_sum / progress.seen.max(1) as f64,
            "images_per_sec": epoch_images as f64 / train_secs,
            "train_seconds": train_secs,
        });
        if world > 1 {
            record["sync_seconds"] = json!(sync.take_seconds());
        }
        if (epoch + 1).is_multiple_of(config.eval_every.max(1)) || epoch + 1 == config.epochs {
            if config.bn_stats == "precise" {
                recompute_bn_statistics(&net, &train_loader, batch_size, opts.device, comm)?;
            } else {
                average_bn_buffers(&net.vs, comm, 1.0)?;
            }
            let checksum =
                check_same_model(&net.vs, comm, &format!("after epoch {}", epoch + 1), true)?;
            let counts = evaluate(
                &net,
                &test_loader,
                batch_size,
                m.classes.len(),
                opts.device,
                similarity.as_deref(),
                comm,
            )?;
            progress.last = counts.top1();
            if progress.best.is_nan() || progress.last > progress.best {
                progress.best = progress.last;
                progress.best_epoch = epoch + 1;
            }
            record["test_top1"] = json!(progress.last);
            record["test_balanced"] = json!(counts.balanced());
            if let Some(h) = counts.hierarchical() {
                record["test_hierarchical"] = json!(h);
            }
            if let Some(e) = counts.embedding_top1() {
                record["test_head_top1"] = json!(progress.last);
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
                progress.loss_sum / progress.seen.max(1) as f64,
                record
                    .get("test_top1")
                    .and_then(|v| v.as_f64())
                    .map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
                epoch_images as f64 / train_secs,
                start.elapsed().as_secs_f64()
            );
            if terminal {
                bar.println(&line);
            }
            files.log(&line)?;
        }
        progress.epoch += 1;
        progress.step = 0;
        progress.loss_sum = 0.0;
        progress.seen = 0;
        checkpoint(&progress, &opt, &files)?;
    }
    bar.finish_and_clear();
    let (best, best_epoch, last) = (progress.best, progress.best_epoch, progress.last);
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
