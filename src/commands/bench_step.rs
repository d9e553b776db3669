//! `cosine-train bench-step`: the training step alone. The same model, objective and step
//! functions as `train` (`crate::train::step`), on one synthetic batch kept on the device: no
//! data loading. Benchmarks divide real step times by this one.
//!
//! It reports: whole steps queued as training queues them (the host reads the step totals
//! every `--totals-every` steps), with the share of that time the host waited for the device;
//! each phase's median time (forward and backward, gradient all-reduce, update), the device
//! waited for after each; and the operators libtorch dispatches per step by phase, beside the
//! count of the same update written one operator per parameter. Under mpirun the step time is
//! compute plus update and the all-reduce is timed after a barrier (so that the time is the
//! transfer's, not a wait for a slower rank), to compare with a raw MPI all-reduce of the same
//! size; `--whole-step` times whole steps there too, as a training job sees them.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

use super::{ChannelsLast, JobArgs, UsageError, choice, threads};
use crate::config::{Overrides, Precision, RunConfig};
use crate::data::loader::Batch;
use crate::dist::Communicator;
use crate::dist::job::Job;
use crate::libtorch_shim::OpCounter;
use crate::model::Arch;
use crate::network::{Network, l2_of};
use crate::objective::LossKind;
use crate::optim::Sgd;
use crate::runtime::device::DeviceChoice;
use crate::schedule::ScheduleKind;
use crate::train::data_parallel::DataParallel;
use crate::train::step::{StepAt, StepSettings, forward_backward, train_step};
use crate::train::step_totals::{PendingStep, PendingTotals};

#[derive(Debug, Args)]
pub struct BenchStepArgs {
    /// Architecture (as `train --arch`).
    #[arg(long, value_parser = choice::<Arch>(), default_value = "resnet20")]
    pub arch: Arch,
    /// Objective (as `train --loss`).
    #[arg(long, value_parser = choice::<LossKind>(), default_value = "ce")]
    pub loss: LossKind,
    /// Images per step on each rank.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: i64,
    /// Image channels.
    #[arg(long, default_value_t = 3)]
    pub channels: i64,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// libtorch intra-op threads [default: the cores this rank may use].
    #[arg(long, value_parser = threads())]
    pub threads: Option<i32>,
    /// Precision: fp32, or bf16 (autocast, as `train --precision`).
    #[arg(long, value_parser = choice::<Precision>(), default_value = "fp32")]
    pub precision: Precision,
    /// Memory order (as `train --channels-last`).
    #[arg(long, value_parser = choice::<ChannelsLast>(), default_value = "auto")]
    pub channels_last: ChannelsLast,
    /// With several ranks, time whole steps (compute and gradient all-reduce, no barrier
    /// between them), as a training job sees them.
    #[arg(long)]
    pub whole_step: bool,
    /// Steps between reads of the step totals in the whole-step timing (as `train
    /// --totals-every`; 0 = auto).
    #[arg(long, default_value_t = 0)]
    pub totals_every: u32,
    /// Largest gradient all-reduce call in MiB (as `train --bucket-mb`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub bucket_mb: u32,
    #[command(flatten)]
    pub job: JobArgs,
}

/// The learning rate of the benchmark's steps.
const LR: f64 = 0.01;

pub fn run(args: &BenchStepArgs) -> anyhow::Result<ExitCode> {
    if args.batch_size == 0
        || args.steps == 0
        || args.size < 1
        || args.channels < 1
        || args.classes < 2
    {
        return Err(UsageError(
            "--batch-size, --steps, --size and --channels must be at least 1 and --classes at least 2"
                .into(),
        )
        .into());
    }
    let job = Job::join(&args.job.options(), args.device, args.threads)?;
    let report = job.finish(measure(args, job.device, &job.comm))?;
    if job.comm.rank() == 0 {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Times the steps; the report as JSON (identical on every rank).
pub fn measure(
    args: &BenchStepArgs,
    device: tch::Device,
    comm: &dyn Communicator,
) -> anyhow::Result<Value> {
    let mut bench = Bench::new(args, device, comm)?;
    let split = bench.dp.world() > 1 && !args.whole_step;
    let totals_every = crate::train::step_totals::interval(args.totals_every, device);
    let queued = if split {
        None
    } else {
        Some(bench.queued_steps(args, totals_every)?)
    };
    let mut phases = bench.phases(args)?;
    let ops = bench.count_ops()?;
    let median_step = match &queued {
        Some(q) => median(&mut q.per_step.clone()),
        None => {
            let mut sums: Vec<f64> = (phases.forward_backward.iter())
                .zip(&phases.update)
                .map(|(a, b)| a + b)
                .collect();
            median(&mut sums)
        }
    };
    let world = bench.dp.world();
    let mut report = json!({
        "arch": args.arch,
        "loss": args.loss,
        "batch_size": args.batch_size,
        "image": [args.channels, args.size, args.size],
        "parameters": bench.net.parameter_count(),
        "parameter_tensors": bench.opt.params.len(),
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "steps": args.steps,
        "step_seconds_median": median_step,
        // All ranks together: each steps on --batch-size images.
        "images_per_sec": (args.batch_size * world) as f64 / median_step,
        "world_size": world,
        "precision": args.precision,
        "channels_last": bench.net.channels_last,
        "whole_step": args.whole_step,
        "phase_seconds_median": {
            "forward_backward": median(&mut phases.forward_backward),
            "all_reduce": (world > 1).then(|| median(&mut phases.all_reduce)),
            "update": median(&mut phases.update),
        },
        "ops_per_step": ops,
    });
    match queued {
        Some(q) => {
            report["totals_every"] = json!(totals_every);
            // The share of the queued steps' time the host spent waiting for the device: near
            // 1 when the device is the bottleneck, near 0 when the host's launches are.
            report["host_wait_fraction"] = json!(q.waiting / q.total);
        }
        None => {
            report["sync_seconds_median"] = json!(median(&mut phases.all_reduce));
            report["allreduce_call_seconds_median"] = json!(median(&mut phases.all_reduce_calls));
            report["sync_floats"] = json!(bench.dp.reduced_floats());
        }
    }
    Ok(report)
}

/// What every measurement steps: the model, its optimiser and data parallelism, one batch.
struct Bench<'c> {
    net: Network,
    opt: Sgd,
    dp: DataParallel<'c>,
    batch: Batch,
    /// Images per step over all ranks.
    global: usize,
    settings: StepSettings,
}

/// Whole steps, queued as training queues them.
struct Queued {
    /// Seconds per step of each chunk of steps between two reads.
    per_step: Vec<f64>,
    /// Seconds the host waited at the reads, and in all.
    waiting: f64,
    total: f64,
}

/// Per-step times of each phase.
#[derive(Default)]
struct Phases {
    forward_backward: Vec<f64>,
    all_reduce: Vec<f64>,
    all_reduce_calls: Vec<f64>,
    update: Vec<f64>,
}

impl<'c> Bench<'c> {
    fn new(
        args: &BenchStepArgs,
        device: Device,
        comm: &'c dyn Communicator,
    ) -> anyhow::Result<Self> {
        let given = Overrides {
            arch: Some(args.arch),
            loss: Some(args.loss),
            batch_size: Some(args.batch_size),
            lr_max: Some(LR),
            lr_min: Some(LR),
            schedule: Some(ScheduleKind::CosineSteps),
            epochs: Some(1),
            device: Some(args.device),
            precision: Some(args.precision),
            ..Default::default()
        };
        let config = RunConfig::resolve(Path::new(""), &given, None)?;
        let classes: Vec<datasets_prep::manifest::ClassInfo> = (0..args.classes)
            .map(|i| datasets_prep::manifest::ClassInfo {
                id: i.to_string(),
                name: format!("class {i}"),
            })
            .collect();
        let mut net = Network::build(&config, args.channels, &classes, device)?;
        if args.channels_last.resolve(device) {
            net.use_channels_last();
        }
        let opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(&config));
        let mut dp = DataParallel::new(comm);
        dp.attach(&opt.params, device, args.bucket_mb as usize);
        let b = args.batch_size as i64;
        let batch = Batch {
            images: Tensor::randn(
                [b, args.channels, args.size, args.size],
                (Kind::Float, device),
            ),
            labels: Tensor::randint(args.classes as i64, [b], (Kind::Int64, device)),
        };
        let global = args.batch_size * dp.world();
        let settings = StepSettings {
            device,
            bf16: config.precision == Precision::Bf16,
            bn: crate::train::step::BnGroups::PerRank,
        };
        Ok(Bench {
            net,
            opt,
            dp,
            batch,
            global,
            settings,
        })
    }

    fn step(&mut self, i: usize) -> anyhow::Result<Tensor> {
        let at = StepAt { epoch: 0, step: i };
        train_step(
            &self.net,
            &mut self.opt,
            &mut self.dp,
            &self.batch,
            self.global,
            LR,
            &self.settings,
            false,
            at,
        )
    }

    /// Whole steps as training runs them: the host reads the totals every `totals_every` steps
    /// and waits only there; each read ends a timed chunk.
    fn queued_steps(
        &mut self,
        args: &BenchStepArgs,
        totals_every: usize,
    ) -> anyhow::Result<Queued> {
        for i in 0..args.warmup {
            let totals = self.step(i)?;
            read_totals(&mut self.dp, &totals)?;
        }
        let mut queued = Queued {
            per_step: Vec::new(),
            waiting: 0.0,
            total: 0.0,
        };
        let mut done = 0;
        while done < args.steps {
            let chunk = totals_every.min(args.steps - done);
            let start = Instant::now();
            let mut pending = PendingTotals::new(chunk);
            for i in 0..chunk {
                let step = args.warmup + done + i;
                let totals = self.step(step)?;
                let at = StepAt { epoch: 0, step };
                let images = self.global;
                pending.push(&totals, PendingStep { at, lr: LR, images });
            }
            let wait = Instant::now();
            self.dp.wait_for_reduces("bench-step")?;
            pending.read()?;
            // The update of the last step is not needed by the read: wait for it too.
            wait_for(self.settings.device);
            queued.waiting += wait.elapsed().as_secs_f64();
            queued.total += start.elapsed().as_secs_f64();
            queued
                .per_step
                .push(start.elapsed().as_secs_f64() / chunk as f64);
            done += chunk;
        }
        Ok(queued)
    }

    /// The steps phase by phase, waiting for the device after each (so each phase's time is
    /// its own) and for the other ranks before the all-reduce (so that its time is the
    /// transfer's, not a wait for a slower rank).
    fn phases(&mut self, args: &BenchStepArgs) -> anyhow::Result<Phases> {
        let device = self.settings.device;
        let mut phases = Phases::default();
        for i in 0..args.warmup + args.steps {
            let start = Instant::now();
            self.dp.reset_gradients(&mut self.opt)?;
            let loss = forward_backward(
                &self.net,
                &self.dp,
                &self.batch,
                self.global,
                &self.settings,
            );
            wait_for(device);
            let computed = start.elapsed().as_secs_f64();
            self.dp.barrier("bench-step barrier")?;
            let start = Instant::now();
            let _ = self.dp.take_sync_seconds();
            let (grads, totals) =
                self.dp
                    .reduce_gradients(&self.opt.params, loss.as_ref(), false)?;
            self.dp.wait_for_reduces("bench-step")?;
            let reduced = start.elapsed().as_secs_f64();
            let call_seconds = self.dp.take_sync_seconds();
            let start = Instant::now();
            let _norm = self.opt.step_with(LR, grads)?;
            wait_for(device);
            let updated = start.elapsed().as_secs_f64();
            read_totals(&mut self.dp, &totals)?;
            if i >= args.warmup {
                phases.forward_backward.push(computed);
                phases.all_reduce.push(reduced);
                phases.all_reduce_calls.push(call_seconds);
                phases.update.push(updated);
            }
        }
        Ok(phases)
    }

    /// The operators libtorch dispatches in one step that compute (views and new handles of
    /// existing memory left out: no kernel on a GPU), by phase, and those of the update written
    /// as one operator per parameter and phase (the form before the multi-tensor update), run
    /// on copies of the weights: on a GPU the count is roughly the step's kernel launches.
    fn count_ops(&mut self) -> anyhow::Result<Value> {
        let counter = OpCounter::start()?;
        let mark = || counter.count() - counter.views();
        let start = mark();
        let views = counter.views();
        self.dp.reset_gradients(&mut self.opt)?;
        let loss = forward_backward(
            &self.net,
            &self.dp,
            &self.batch,
            self.global,
            &self.settings,
        );
        let computed = mark();
        let (grads, totals) = (self.dp).reduce_gradients(&self.opt.params, loss.as_ref(), false)?;
        let reduced = mark();
        let copies: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
        let more_copies: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
        let before = mark();
        let _norm = self.opt.step_with(LR, grads)?;
        let updated = mark();
        let views = counter.views() - views;
        read_totals(&mut self.dp, &totals)?;
        let baseline = per_tensor_update(&self.opt, copies, &counter);
        // The update as CUDA runs it (the clip factor computed on the device), whatever this
        // device is; it changes the weights, which nothing reads after this.
        let on_device = self.opt.clip_on_device;
        self.opt.clip_on_device = true;
        let start_device = mark();
        let _norm = self.opt.step_with(LR, more_copies)?;
        let device_form = mark() - start_device;
        self.opt.clip_on_device = on_device;
        Ok(json!({
            "forward_backward": computed - start,
            "gradient_sync": reduced - computed,
            "update": updated - before,
            "total": updated - before + reduced - start,
            "update_as_on_cuda": device_form,
            "update_one_op_per_tensor": baseline,
            "views_and_handles": views,
        }))
    }
}

/// Waits for the step's all-reduce and reads its totals, as training does at a read.
fn read_totals(dp: &mut DataParallel, totals: &Tensor) -> anyhow::Result<()> {
    dp.wait_for_reduces("bench-step")?;
    let _ = Vec::<f32>::try_from(totals.to_device(Device::Cpu))?;
    Ok(())
}

/// Counts the update of `opt` from `grads` done one parameter at a time (zero_grad, L2, norm,
/// clip, momentum and step per tensor), on copies of the weights and velocities.
fn per_tensor_update(opt: &Sgd, grads: Vec<Tensor>, counter: &OpCounter) -> u64 {
    let copies: Vec<(Tensor, Tensor, f64)> = (opt.params.iter())
        .map(|p| (p.tensor.detach().copy(), p.velocity.copy(), p.l2))
        .collect();
    let zeroed: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
    tch::no_grad(|| {
        let work = || counter.count() - counter.views();
        let start = work();
        for g in &zeroed {
            let _ = g.shallow_clone().zero_();
        }
        let grads: Vec<Tensor> = (grads.iter().zip(&copies))
            .map(|(g, (w, _, l2))| {
                if *l2 > 0.0 {
                    g + w * (2.0 * l2)
                } else {
                    g.shallow_clone()
                }
            })
            .collect();
        let scale = opt.clip_norm.map_or(1.0, |limit| {
            let squares: Vec<Tensor> = (grads.iter())
                .map(|g| g.pow_tensor_scalar(2).sum(Kind::Float))
                .collect();
            let norm = f64::try_from(Tensor::stack(&squares, 0).sum(Kind::Float).sqrt())
                .unwrap_or(f64::NAN);
            if norm >= limit { limit / norm } else { 1.0 }
        });
        for (g, (w, v, _)) in grads.iter().zip(&copies) {
            let step = g * (LR * scale);
            let _ = v.shallow_clone().g_mul_scalar_(opt.momentum);
            let _ = v.shallow_clone().g_sub_(&step);
            let _ = w.shallow_clone().g_add_(v);
        }
        work() - start
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Waits until `device` has finished the work queued so far (nothing to wait for on the CPU).
fn wait_for(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}
