//! `cosine-train bench-step`: the training step alone. The same model, objective and step
//! functions as `train` (`crate::train::step`), on one synthetic batch kept on the device: no
//! data loading. Benchmarks divide real step times by this one. Under mpirun it also times the
//! fused gradient all-reduce after a barrier (so that the time is the transfer's, not a wait for
//! a slower rank), to compare with a raw MPI all-reduce of the same size; `--whole-step` times
//! `train_step` itself, as a training job sees it.

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
use crate::model::Arch;
use crate::network::{Network, l2_of};
use crate::objective::LossKind;
use crate::optim::Sgd;
use crate::runtime::device::DeviceChoice;
use crate::schedule::ScheduleKind;
use crate::train::data_parallel::DataParallel;
use crate::train::step::{StepAt, StepSettings, forward_backward, train_step};

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
    let mut opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(&config));
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
    let split = dp.world() > 1 && !args.whole_step;
    let (mut compute, mut reduce, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let timed = i >= args.warmup;
        let at = StepAt { epoch: 0, step: i };
        if !split {
            let start = Instant::now();
            train_step(
                &net, &mut opt, &mut dp, &batch, global, LR, &settings, false, at,
            )?;
            // The update is asynchronous on a GPU: wait for it, so the time covers the work.
            wait_for(device);
            if timed {
                compute.push(start.elapsed().as_secs_f64());
            }
            continue;
        }
        let start = Instant::now();
        opt.zero_grad()?;
        let loss = forward_backward(&net, &dp, &batch, global, &settings);
        // Wait for the gradients (a GPU is asynchronous) and for the other ranks, untimed.
        if let Some(l) = &loss {
            let _ = f64::try_from(l)?;
        }
        let computed = start.elapsed().as_secs_f64();
        dp.barrier("bench-step barrier")?;
        let start = Instant::now();
        let _ = dp.take_sync_seconds();
        let (grads, _) = dp.reduce_gradients(&opt.params, loss.as_ref(), false)?;
        let reduced = start.elapsed().as_secs_f64();
        let call_seconds = dp.take_sync_seconds();
        let start = Instant::now();
        let _norm = opt.step_with(LR, grads)?;
        wait_for(device);
        if timed {
            compute.push(computed + start.elapsed().as_secs_f64());
            reduce.push(reduced);
            calls.push(call_seconds);
        }
    }
    let median = median(&mut compute);
    let mut report = json!({
        "arch": args.arch,
        "loss": args.loss,
        "batch_size": args.batch_size,
        "image": [args.channels, args.size, args.size],
        "parameters": net.parameter_count(),
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "steps": args.steps,
        "step_seconds_median": median,
        // All ranks together: each steps on --batch-size images.
        "images_per_sec": (args.batch_size * dp.world()) as f64 / median,
        "world_size": dp.world(),
        "precision": args.precision,
        "channels_last": net.channels_last,
        "whole_step": args.whole_step,
    });
    if split {
        report["sync_seconds_median"] = json!(self::median(&mut reduce));
        report["allreduce_call_seconds_median"] = json!(self::median(&mut calls));
        report["sync_floats"] = json!(dp.reduced_floats());
    }
    Ok(report)
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
