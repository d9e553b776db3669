//! Training as a library: a [`Trainer`] is built from a [`RunConfig`], the run's options and a
//! communicator, and [`Trainer::fit`] runs the epochs of one rank of a data-parallel job (a job
//! of one rank being the plain single-process run). Rank 0 writes the run directory.
//!
//! The parts the loop calls, one file each: [`step`] (one optimiser step, also timed by
//! `bench-step`), [`data_parallel`] (everything that talks to the other ranks), [`eval`] (exact
//! distributed evaluation and precise BatchNorm), [`resume`] (checkpoints across ranks) and
//! [`progress`] (the loop's position and the terminal display). Nothing here is global: two
//! trainers can run one after another in one process, each with its own communicator.

pub mod data_parallel;
pub mod eval;
pub mod grad_sync;
pub mod progress;
pub mod resume;
pub mod step;
pub mod step_totals;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use datasets_prep::{Manifest, ShardDir, Split};
use tch::Device;

pub use eval::{EvalCounts, class_similarity, evaluate, recompute_bn_statistics};

use crate::config::{BnStats, Precision, RunConfig};
use crate::data::loader::LoaderSpec;
use crate::data::selection::{self, Selection};
use crate::data::{batches, epoch_samples};
use crate::dist::Communicator;
use crate::network::{Network, l2_of};
use crate::optim::Sgd;
use crate::run_dir::checkpoint::{self, ResumeMode};
use crate::run_dir::records::{
    EpochMetrics, MetricsLine, RunRecord, Summary, SummaryMarker, Versions,
};
use crate::run_dir::writer::RunWriter;
use crate::runtime::fault::Fault;
use crate::runtime::signals::{self, Stopped};
use data_parallel::{DataParallel, share};
use progress::{Display, Eta, Position};
use step::{BnGroups, Diverged, StepAt, StepSettings, train_step};
use step_totals::{PendingStep, PendingTotals};

/// Best and last test accuracy of a finished run: `best_top1` is the test top-1 of the epoch
/// selected on validation when the run has a validation split, else the highest.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub best_top1: f64,
    pub best_epoch: usize,
    pub last_top1: f64,
}

/// How a run is carried out, besides the configuration (nothing here changes its result).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run directory.
    pub out: PathBuf,
    pub device: Device,
    /// Loader threads.
    pub workers: usize,
    /// Replace a run already in `out`.
    pub force: bool,
    /// Largest gradient all-reduce call, in MiB.
    pub bucket_mb: usize,
    /// Also checkpoint every this many optimiser steps (0: only at the end of each epoch).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// Steps between the host's reads of the step totals (at least 1).
    pub totals_every: usize,
    pub resume: Option<ResumeMode>,
    /// Channels-last memory order.
    pub channels_last: bool,
}

/// The data of a run: the shard directory and its loaders.
struct RunData {
    manifest: Manifest,
    /// xxh3 of `manifest.json` (a resume must see the same data).
    manifest_hash: String,
    train: LoaderSpec,
    test: LoaderSpec,
    /// The training records used and held out for validation (`--per-class`, `--val-per-class`).
    selection: Selection,
    /// Passes over `selection.train` per epoch.
    repeats: usize,
    /// Class similarities for the hierarchical accuracy (`--hierarchy`).
    similarity: Option<Vec<f64>>,
}

impl RunData {
    fn open(config: &RunConfig, opts: &RunOptions) -> anyhow::Result<Self> {
        let shards = Arc::new(ShardDir::open(&config.data).with_context(|| {
            format!(
                "--data {}: not a usable shard directory",
                config.data.display()
            )
        })?);
        check_image_sizes(&shards, config.augment.crop, &config.data)?;
        let manifest = shards.manifest().clone();
        let loader = |split| {
            LoaderSpec::new(
                Arc::clone(&shards),
                split,
                config.augment.clone(),
                config.seed,
                opts.workers,
                opts.device,
            )
        };
        let similarity = config
            .hierarchy
            .as_deref()
            .map(|path| class_similarity(path, config.hierarchy_is_a, &manifest.classes))
            .transpose()?;
        let selection = select_training_records(&shards, config)?;
        Ok(RunData {
            manifest_hash: checkpoint::manifest_hash(&config.data)?,
            train: loader(Split::Train),
            test: loader(Split::Test),
            selection,
            repeats: config.train_repeats.max(1),
            similarity,
            manifest,
        })
    }

    /// Training samples per epoch (the selected records times the passes).
    fn train_images(&self) -> usize {
        self.selection.train.len() * self.repeats
    }

    /// The records precise BatchNorm statistics are computed over: `None` for the whole split.
    fn bn_records(&self) -> Option<&[usize]> {
        let all = self.selection.train.len() == self.manifest.train.count as usize;
        (!all).then_some(self.selection.train.as_slice())
    }
}

/// The training and validation records of the run's subset, from the records' labels.
fn select_training_records(shards: &ShardDir, config: &RunConfig) -> anyhow::Result<Selection> {
    let reader = shards.split(Split::Train);
    let labels = (0..reader.len())
        .map(|i| Ok(reader.record(i)?.label))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let classes = shards.manifest().classes.len();
    let chosen = selection::select(&labels, classes, &config.subset)?;
    if chosen.train.is_empty() {
        anyhow::bail!(
            "--data {}: no training images are left to train on",
            config.data.display()
        );
    }
    Ok(chosen)
}

/// Refuses data that batches cannot be made of before anything trains: images of different
/// sizes without `--crop`, or a crop larger than a stored image (it would be padded silently).
fn check_image_sizes(shards: &ShardDir, crop: Option<u32>, data: &Path) -> anyhow::Result<()> {
    let data = data.display();
    let mut first: Option<(u32, u32)> = None;
    for split in [Split::Train, Split::Test] {
        let reader = shards.split(split);
        for i in 0..reader.len() {
            let r = reader.record(i)?;
            let size = (r.height, r.width);
            match crop {
                Some(c) if r.height < c || r.width < c => anyhow::bail!(
                    "--crop {c}: {} record {i} of {data} is only {}x{} pixels; pack with \
                     --short-side {c} or more, or lower --crop",
                    split.name(),
                    r.height,
                    r.width
                ),
                Some(_) => {}
                None => match first {
                    None => first = Some(size),
                    Some((h, w)) if (h, w) != size => anyhow::bail!(
                        "{data}: images of different sizes ({} record {i} is {}x{}, the first \
                         is {h}x{w}) need --crop N (a square crop) or a pack with --short-side",
                        split.name(),
                        r.height,
                        r.width
                    ),
                    Some(_) => {}
                },
            }
        }
    }
    Ok(())
}

/// One rank's training run.
pub struct Trainer<'c> {
    config: RunConfig,
    opts: RunOptions,
    dp: DataParallel<'c>,
    data: RunData,
    net: Network,
    opt: Sgd,
    at: Position,
    settings: StepSettings,
    /// Rank 0's `metrics.jsonl` and `log.txt`.
    writer: Option<RunWriter>,
    display: Display,
    /// Time left, from this process's own steps and evaluations.
    eta: Eta,
    fault: Fault,
}

/// What one epoch's training steps did.
struct EpochTraining {
    /// The learning rate of the last step.
    lr: f64,
    /// Images trained in this process (a resumed epoch counts only the steps run here).
    images: usize,
    seconds: f64,
}

impl<'c> Trainer<'c> {
    /// Prepares the run: opens the data, builds and replicates the network, resumes from a
    /// checkpoint if asked, and (rank 0) writes `config.json` and opens the logs. Collective:
    /// every rank of `comm` calls it.
    pub fn new(
        config: RunConfig,
        opts: RunOptions,
        comm: &'c dyn Communicator,
    ) -> anyhow::Result<Self> {
        let mut dp = DataParallel::new(comm);
        let data = RunData::open(&config, &opts)?;
        if dp.is_lead() {
            crate::run_dir::prepare(&opts.out, opts.force, opts.resume.is_some())?;
        }
        let m = &data.manifest;
        let mut net = Network::build(&config, i64::from(m.channels), &m.classes, opts.device)?;
        if let Some(init) = &config.init_from
            && dp.is_lead()
        {
            // Rank 0's model goes to every rank next.
            crate::run_dir::weights::init_from(&net.vs, init)?;
        }
        if opts.channels_last {
            net.use_channels_last();
        }
        dp.broadcast_model(&net.vs)?;
        let mut opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(&config));
        if dp.is_lead() {
            // Model and velocities; the partial copy of a new checkpoint exists beside the
            // kept ones.
            let one = net.state_bytes() + 4 * net.parameter_count() as u64;
            crate::run_dir::check_room(&opts.out, one, opts.keep_checkpoints.max(1) as u64 + 1)?;
        }
        let mut warnings = Vec::new();
        let loaded = match &opts.resume {
            Some(mode) => {
                resume::fetch(&opts.out, mode, &dp, &mut |w| warnings.push(w.to_string()))?
            }
            None => None,
        };
        let mut at = Position::start();
        if let Some(l) = &loaded {
            resume::restore(l, &config, &data.manifest_hash, &net.vs, &mut opt, &dp)?;
            at = Position::from_state(&l.state);
        }
        // A resume may restore per-rank BatchNorm statistics; the parameters must agree anyway.
        dp.check_same_model(&net.vs, "before the first step", loaded.is_none())?;
        dp.attach(&opt.params, opts.device, opts.bucket_mb);
        let steps_per_epoch = batches(data.train_images(), config.batch_size);
        let display = Display::new(
            dp.is_lead(),
            (config.epochs * steps_per_epoch) as u64,
            (at.epoch * steps_per_epoch + at.step) as u64,
        );
        signals::install();
        let settings = StepSettings {
            device: opts.device,
            bf16: config.precision == Precision::Bf16,
            bn: BnGroups::for_run(
                config.bn_batch,
                config.sync_bn,
                config.batch_size,
                dp.world(),
            )?,
        };
        let mut trainer = Trainer {
            fault: Fault::from_env()?,
            config,
            opts,
            dp,
            data,
            net,
            opt,
            at,
            settings,
            writer: None,
            display,
            eta: Eta::default(),
        };
        if trainer.dp.is_lead() {
            trainer.writer = Some(trainer.open_run_files(loaded.as_ref(), &warnings)?);
        }
        Ok(trainer)
    }

    /// Rank 0: writes `config.json`, cuts `metrics.jsonl` back to what a resumed checkpoint
    /// covers, opens the logs and logs the start.
    fn open_run_files(
        &self,
        loaded: Option<&checkpoint::Loaded>,
        warnings: &[String],
    ) -> anyhow::Result<RunWriter> {
        let (config, opts, m, at) = (&self.config, &self.opts, &self.data.manifest, &self.at);
        let record = RunRecord {
            config: config.clone(),
            world_size: self.dp.world(),
            backend: self.dp.backend(),
            parameters: self.net.parameter_count(),
            classes: m.classes.len(),
            train_images: m.train.count,
            test_images: m.test.count,
            dataset: m.dataset.clone(),
            versions: Versions::current(),
        };
        datasets_prep::atomic::write_file(
            &opts.out.join(crate::run_dir::CONFIG),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        if let Some(l) = loaded {
            RunWriter::truncate_metrics(&opts.out, l.state.metrics_bytes)?;
        }
        let mut w = RunWriter::open(&opts.out, !self.display.terminal)?;
        if let Some(l) = loaded {
            // The checkpoint's epoch is 0-based: the next epoch logged is one more.
            w.restart_at_epoch(l.state.epoch + 1)?;
        }
        for warning in warnings {
            w.log(&format!("warning: {warning}"))?;
        }
        let chosen = &self.data.selection;
        if let (Some(k), false) = (config.subset.per_class, chosen.short.is_empty()) {
            let named: Vec<String> = chosen
                .short
                .iter()
                .take(10)
                .map(|&(c, n)| format!("{} ({n})", m.classes[c].id))
                .collect();
            w.log(&format!(
                "warning: --per-class {k}: {} of the classes have fewer training images and \
                 keep all they have: {}{}",
                chosen.short.len(),
                named.join(", "),
                if chosen.short.len() > 10 { ", ..." } else { "" }
            ))?;
        }
        if !config.subset.is_all() || self.data.repeats > 1 {
            w.log(&format!(
                "training on {} of the {} packed training images (subset seed {}), {} held out \
                 for validation, {} per epoch",
                chosen.train.len(),
                m.train.count,
                config.subset.seed,
                chosen.val.len(),
                plural(self.data.repeats, "pass", "passes"),
            ))?;
        }
        if let Some(l) = loaded {
            w.log(&format!(
                "resumed from {} at epoch {} step {} (world size {} then, {} now)",
                l.dir.display(),
                at.epoch + 1,
                at.step,
                l.state.world_size,
                self.dp.world()
            ))?;
        }
        let device = match opts.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".to_string(),
        };
        w.log(&format!(
            "train {} ({}, {} train / {} test images) {} {} on {device} x {} ({}): {} parameters, {} x {} of global batch {}, BatchNorm statistics {} in evaluation",
            m.dataset,
            plural(m.classes.len(), "class", "classes"),
            self.data.train_images(),
            m.test.count,
            config.arch,
            config.objective.loss,
            plural(self.dp.world(), "rank", "ranks"),
            self.dp.backend(),
            self.net.parameter_count(),
            plural(config.epochs, "epoch", "epochs"),
            plural(
                batches(self.data.train_images(), config.batch_size),
                "step",
                "steps"
            ),
            config.batch_size,
            config.bn_stats,
        ))?;
        Ok(w)
    }

    /// Trains the remaining epochs: each is trained, evaluated when due, recorded and
    /// checkpointed. All ranks return the same summary; a preemption signal ends the run with
    /// [`Stopped`] after a checkpoint.
    pub fn fit(mut self) -> anyhow::Result<RunSummary> {
        if let Err(e) = self.train_remaining_epochs() {
            if !e.is::<Stopped>() {
                self.display.abandon();
                if let Some(w) = self.writer.as_mut() {
                    // The error is printed by the caller; the log keeps it with the run.
                    let _ = w.log_only(&format!("error: {e:#}"));
                }
            }
            return Err(e);
        }
        self.finish()
    }

    fn train_remaining_epochs(&mut self) -> anyhow::Result<()> {
        while self.at.epoch < self.config.epochs {
            let epoch = self.at.epoch;
            let clock = Instant::now();
            self.display.epoch(epoch, self.config.epochs);
            let trained = self.train_epoch(epoch)?;
            let mut metrics = EpochMetrics {
                epoch: epoch + 1,
                lr: trained.lr,
                train_loss: self.at.train_loss(),
                images_per_sec: trained.images as f64 / trained.seconds,
                train_seconds: trained.seconds,
                sync_seconds: (self.dp.world() > 1).then(|| self.dp.take_sync_seconds()),
                ..Default::default()
            };
            if self.evaluates_after(epoch) {
                let clock = Instant::now();
                self.display.evaluating(self.data.manifest.test.count);
                self.evaluate_into(&mut metrics)?;
                let seconds = clock.elapsed().as_secs_f64();
                self.eta.evaluated(seconds);
                metrics.eval_seconds = Some(seconds);
            }
            metrics.seconds = clock.elapsed().as_secs_f64();
            self.record_epoch(&metrics)?;
            self.at.next_epoch();
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// Runs the steps of `epoch` not done yet. The global batches are cut from the epoch order
    /// as in a one-rank run; each rank takes a contiguous share of every batch.
    fn train_epoch(&mut self, epoch: usize) -> anyhow::Result<EpochTraining> {
        let start = Instant::now();
        let records = &self.data.selection.train;
        let split_len = self.data.manifest.train.count as usize;
        let order = epoch_samples(
            self.config.seed,
            epoch as u64,
            records,
            self.data.repeats,
            split_len,
        );
        let n = order.len();
        let batch = self.config.batch_size;
        let steps = batches(n, batch);
        let first = self.at.step;
        let globals: Vec<_> = (first..steps)
            .map(|b| b * batch..((b + 1) * batch).min(n))
            .collect();
        let plan = globals
            .iter()
            .map(|g| {
                let mine = share(g.len(), self.dp.world(), self.dp.rank());
                g.start + mine.start..g.start + mine.end
            })
            .collect();
        let order = Arc::new(order);
        let schedule = self.config.schedule;
        let epochs = self.config.epochs;
        let lr_at = |step| schedule.lr_at(epoch, step, steps, epochs);
        // The rate of the epoch's last step, also when a resume finds every step done (a stop
        // read at the epoch's end).
        let mut lr = lr_at(first.min(steps.saturating_sub(1)));
        let loader = self.data.train.start_plan(epoch as u64, order, plan, true);
        let mut last_read = Instant::now();
        // The same for every step of the epoch.
        let evals_left = self.evaluations_from(epoch);
        let steps_after = (self.config.epochs - epoch - 1) * steps;
        let every = self.opts.checkpoint_every;
        // Read at the epoch's end anyway: a larger table would only take memory.
        let mut pending = PendingTotals::new(self.opts.totals_every.min(steps));
        for ((global, batch), step) in globals.iter().zip(loader).zip(first..) {
            let batch = batch?;
            let global_step = self.at.global_step + pending.len() as u64 + 1;
            let first_param = self.opt.params.first().map(|p| &p.tensor);
            self.fault
                .before_step(self.dp.rank(), global_step, first_param)?;
            lr = lr_at(step);
            let at = StepAt { epoch, step };
            let totals = train_step(
                &self.net,
                &mut self.opt,
                &mut self.dp,
                &batch,
                global.len(),
                lr,
                &self.settings,
                signals::requested().is_some(),
                at,
            )?;
            let images = global.len();
            pending.push(&totals, PendingStep { at, lr, images });
            let end_of_epoch = step + 1 == steps;
            let checkpoint_due = every > 0 && global_step.is_multiple_of(every) && !end_of_epoch;
            if !(pending.is_full() || end_of_epoch || checkpoint_due) {
                continue;
            }
            let read = pending.len();
            let stop = self.take_totals(&mut pending, at)?;
            self.eta
                .trained(read as u64, last_read.elapsed().as_secs_f64());
            last_read = Instant::now();
            let images_per_sec = self.at.seen as f64 / start.elapsed().as_secs_f64();
            let left = self
                .eta
                .left((steps - self.at.step + steps_after) as u64, evals_left);
            self.display
                .step(self.at.train_loss(), lr, images_per_sec, left, self.at.best);
            if stop {
                // Every rank saw the same votes in the all-reduce: all stop after this step.
                return Err(self.stop(signals::requested())?.into());
            }
            if checkpoint_due {
                self.save_checkpoint()?;
            }
        }
        Ok(EpochTraining {
            lr,
            images: globals.iter().map(|g| g.len()).sum(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Waits for the steps queued up to `last`, reads their totals into the position and says
    /// whether any rank asked to stop. A non-finite loss is an error naming its step.
    fn take_totals(&mut self, pending: &mut PendingTotals, last: StepAt) -> anyhow::Result<bool> {
        let first = last.step + 1 - pending.len();
        self.dp.wait_for_reduces(&format!(
            "gradient all-reduces of epoch {} steps {}-{}",
            last.epoch + 1,
            first + 1,
            last.step + 1
        ))?;
        let mut stop = false;
        for read in pending.read()? {
            if !read.loss.is_finite() {
                let step = read.step.at.step + 1;
                return Err(Diverged {
                    loss: read.loss,
                    epoch: read.step.at.epoch + 1,
                    step,
                    lr: read.step.lr,
                    read_at: (last.step + 1 > step).then_some(last.step + 1),
                }
                .into());
            }
            self.at.stepped(read.loss, read.step.images);
            stop |= read.stop;
        }
        Ok(stop)
    }

    /// Evaluations still to come from `epoch` (0-based) on, that epoch's included.
    fn evaluations_from(&self, epoch: usize) -> u64 {
        (epoch..self.config.epochs)
            .filter(|&e| self.evaluates_after(e))
            .count() as u64
    }

    fn evaluates_after(&self, epoch: usize) -> bool {
        (epoch + 1).is_multiple_of(self.config.eval_every.max(1)) || epoch + 1 == self.config.epochs
    }

    /// Makes the BatchNorm statistics the evaluation's, checks that the replicas agree, and
    /// evaluates on the test split.
    fn evaluate_into(&mut self, metrics: &mut EpochMetrics) -> anyhow::Result<()> {
        let batch = self.config.batch_size.max(1);
        match self.config.bn_stats {
            BnStats::Precise => recompute_bn_statistics(
                &self.net,
                &self.data.train,
                self.data.bn_records(),
                batch,
                self.opts.device,
                &self.dp,
            )?,
            BnStats::Ema => self.dp.average_bn_buffers(&self.net.vs, 1.0)?,
        }
        let when = format!("after epoch {}", metrics.epoch);
        let checksum = self.dp.check_same_model(&self.net.vs, &when, true)?;
        let classes = self.data.manifest.classes.len();
        let val = &self.data.selection.val;
        let val_top1 = if val.is_empty() {
            None
        } else {
            // The held-out training images, preprocessed as test images are.
            let counts = evaluate(
                &self.net,
                &self.data.train,
                Some(val),
                batch,
                classes,
                self.opts.device,
                None,
                false,
                &self.dp,
            )?;
            metrics.val_balanced = Some(counts.balanced());
            Some(counts.top1())
        };
        metrics.val_top1 = val_top1;
        let counts = evaluate(
            &self.net,
            &self.data.test,
            None,
            batch,
            classes,
            self.opts.device,
            self.data.similarity.as_deref(),
            false,
            &self.dp,
        )?;
        self.at.evaluated(counts.top1(), val_top1);
        metrics.test_top1 = Some(counts.top1());
        metrics.test_balanced = Some(counts.balanced());
        metrics.test_hierarchical = counts.hierarchical();
        if let Some(e) = counts.embedding_top1() {
            metrics.test_head_top1 = Some(counts.top1());
            metrics.test_embedding_top1 = Some(e);
        }
        metrics.model_checksum = Some(format!("{checksum:016x}"));
        Ok(())
    }

    /// Appends the epoch to `metrics.jsonl` and the log (rank 0).
    fn record_epoch(&mut self, metrics: &EpochMetrics) -> anyhow::Result<()> {
        let evals_left = self.evaluations_from(metrics.epoch);
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        writer.metric(&MetricsLine::Epoch(Box::new(metrics.clone())))?;
        let pct = |v: f64| format!("{:.2}%", 100.0 * v);
        let mut line = format!(
            "epoch {:>4}/{} lr {:.3e} loss {:.4}",
            metrics.epoch, self.config.epochs, metrics.lr, metrics.train_loss,
        );
        if let Some(v) = metrics.val_top1 {
            line += &format!(" val top-1 {}", pct(v));
        }
        line += &format!(" test top-1 {}", metrics.test_top1.map_or("-".into(), pct));
        if !self.at.best.is_nan() {
            let on = if self.at.best_val.is_nan() {
                String::new()
            } else {
                format!(", selected on val {}", pct(self.at.best_val))
            };
            line += &format!(" (best {} @{}{on})", pct(self.at.best), self.at.best_epoch);
        }
        line += &format!(
            " | train {:.0} img/s {:.1}s",
            metrics.images_per_sec, metrics.train_seconds
        );
        if let Some(e) = metrics.eval_seconds {
            line += &format!(", eval {e:.1}s");
        }
        let steps = batches(self.data.train_images(), self.config.batch_size);
        let rest = (self.config.epochs - metrics.epoch) * steps;
        if let Some(left) = self.eta.left(rest as u64, evals_left) {
            line += &format!(", ETA {}", progress::duration(left));
        }
        self.display.println(&line);
        writer.log(&line)
    }

    /// Writes a checkpoint of the current position (collective).
    fn save_checkpoint(&self) -> anyhow::Result<Option<PathBuf>> {
        let at = &self.at;
        let state = checkpoint::State {
            format: checkpoint::FORMAT,
            config: self.config.clone(),
            manifest_xxh3: self.data.manifest_hash.clone(),
            world_size: self.dp.world(),
            epoch: at.epoch,
            step: at.step,
            global_step: at.global_step,
            loss_sum: at.loss_sum,
            seen: at.seen,
            best_top1: (!at.best.is_nan()).then_some(at.best),
            best_epoch: at.best_epoch,
            last_top1: (!at.last.is_nan()).then_some(at.last),
            best_val_top1: (!at.best_val.is_nan()).then_some(at.best_val),
            max_test_top1: (!at.max_test.is_nan()).then_some(at.max_test),
            metrics_bytes: self.writer.as_ref().map_or(0, RunWriter::metrics_len),
            files: Default::default(),
        };
        resume::save(
            &self.opts.out,
            self.opts.keep_checkpoints,
            &self.net.vs,
            &self.opt,
            &self.dp,
            state,
        )
    }

    /// Checkpoints after a preemption signal (`asked`: this rank's, if it got one).
    fn stop(&mut self, asked: Option<i32>) -> anyhow::Result<Stopped> {
        let written = self.save_checkpoint()?;
        let stopped = Stopped {
            signal: asked.map_or("another rank's signal", signals::name),
            signal_number: asked,
            step: self.at.global_step,
            checkpoint: written
                .map_or_else(|| "written by rank 0".into(), |p| p.display().to_string()),
        };
        if let Some(w) = self.writer.as_mut() {
            w.log_only(&stopped.to_string())?;
        }
        self.display.abandon();
        Ok(stopped)
    }

    /// Saves the weights and the summary (rank 0); no rank leaves before that is done.
    fn finish(mut self) -> anyhow::Result<RunSummary> {
        self.display.finish();
        let at = &self.at;
        let summary = RunSummary {
            best_top1: at.best,
            best_epoch: at.best_epoch,
            last_top1: at.last,
        };
        self.dp
            .set_context("end of the run (waiting for rank 0 to write the run directory)");
        if let Some(w) = self.writer.as_mut() {
            let metadata = crate::run_dir::weights::metadata(&self.config, &self.data.manifest)?;
            crate::run_dir::weights::save(
                &self.net.vs,
                &self.opts.out.join(crate::run_dir::WEIGHTS),
                metadata,
            )?;
            let finite = |v: f64| (!v.is_nan()).then_some(v);
            w.metric(&MetricsLine::Summary(Summary {
                summary: SummaryMarker,
                best_top1: finite(at.best),
                best_epoch: at.best_epoch,
                last_top1: finite(at.last),
                epochs: self.config.epochs,
                world_size: self.dp.world(),
                selected_on: if at.best_val.is_nan() { "test" } else { "val" }.to_string(),
                best_val_top1: finite(at.best_val),
                max_test_top1: (!at.best_val.is_nan()).then_some(at.max_test),
            }))?;
            let line = if at.best_val.is_nan() {
                format!(
                    "done: best test top-1 {:.2}% (epoch {}), last {:.2}%",
                    100.0 * at.best,
                    at.best_epoch,
                    100.0 * at.last
                )
            } else {
                format!(
                    "done: test top-1 {:.2}% at epoch {} selected on validation ({:.2}%); \
                     best test top-1 of any epoch {:.2}%, last {:.2}%",
                    100.0 * at.best,
                    at.best_epoch,
                    100.0 * at.best_val,
                    100.0 * at.max_test,
                    100.0 * at.last
                )
            };
            w.log(&line)?;
            if self.display.terminal {
                eprintln!("{line}");
            }
        }
        // An error on rank 0 ends all ranks; the others wait here until it has written.
        self.dp.barrier("final barrier")?;
        Ok(summary)
    }
}

/// `1 epoch`, `2 epochs`.
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
