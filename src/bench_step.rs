//! `cosine-train bench-step`: the compute-only training step. The same model, objective and
//! optimiser step as `train`, on one synthetic batch kept on the device: no data loading.
//! Benchmarks divide real step times by this one. Under mpirun it also times the fused gradient
//! all-reduce of `train` after a barrier (so that the time is the transfer's, not a wait for a
//! slower rank), to compare with a raw MPI all-reduce of the same size.

use std::time::Instant;

use anyhow::bail;
use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::cli::BenchStepArgs;
use crate::config::RunConfig;
use crate::data::augment::AugmentConfig;
use crate::dist::Communicator;
use crate::objective::ObjectiveConfig;
use crate::optim::Sgd;
use crate::schedule::Schedule;
use crate::train::replicas::GradSync;
use crate::train::{build_network_for, l2_of};

pub fn run(
    args: &BenchStepArgs,
    device: tch::Device,
    comm: &dyn Communicator,
) -> anyhow::Result<Value> {
    if args.batch_size == 0 || args.steps == 0 || args.size == 0 || args.classes < 2 {
        bail!("--batch-size, --steps and --size must be at least 1 and --classes at least 2");
    }
    let config = RunConfig {
        data: String::new(),
        arch: args.arch.parse().map_err(anyhow::Error::msg)?,
        objective: ObjectiveConfig {
            loss: args.loss.parse().map_err(anyhow::Error::msg)?,
            label_smoothing: 0.1,
            cls_weight: 0.1,
            keras_ce_clip: false,
        },
        embedding: "onehot".into(),
        schedule: Schedule::CosineSteps {
            max_lr: 0.01,
            min_lr: 0.01,
        },
        epochs: 1,
        batch_size: args.batch_size,
        momentum: 0.9,
        clip_norm: Some(10.0),
        augment: AugmentConfig {
            crop: None,
            hflip: false,
            erase_prob: 0.0,
            shift: 0.0,
        },
        eval_every: 1,
        bn_stats: "ema".into(),
        hierarchy: None,
        hierarchy_is_a: false,
        seed: 0,
        device: args.device.to_string(),
        precision: args.precision.clone(),
        sync_bn: false,
    };
    let classes: Vec<datasets_prep::manifest::ClassInfo> = (0..args.classes)
        .map(|i| datasets_prep::manifest::ClassInfo {
            id: i.to_string(),
            name: format!("class {i}"),
        })
        .collect();
    let mut net = build_network_for(&config, args.channels, &classes, device)?;
    if args.channels_last.resolve(device) {
        net.use_channels_last();
    }
    let bf16 = args.precision == "bf16";
    let mut opt = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(&config));
    let params: i64 = opt.params.iter().map(|p| p.tensor.numel() as i64).sum();
    let b = args.batch_size as i64;
    let images = Tensor::randn(
        [b, args.channels, args.size, args.size],
        (Kind::Float, device),
    );
    let labels = Tensor::randint(args.classes as i64, [b], (Kind::Int64, device));
    let mut sync = GradSync::new(&opt.params, comm, device, args.job.bucket_mb);
    let (mut compute, mut reduce, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        opt.zero_grad();
        let loss = crate::runtime::autocast::bf16(bf16, device, || {
            let out = net.forward_t(&images, true);
            net.head.loss(&out, &labels)
        });
        loss.backward();
        let (grads, _) = if comm.size() > 1 && !args.whole_step {
            // Wait for the gradients (a GPU is asynchronous) and for the other ranks, untimed.
            let _ = f64::try_from(&loss)?;
            let computed = start.elapsed().as_secs_f64();
            comm.barrier()?;
            let start = Instant::now();
            let _ = sync.take_seconds();
            let out = sync.reduce(&opt.params, Some(&loss.detach()), false, comm)?;
            if i >= args.warmup {
                compute.push(computed);
                reduce.push(start.elapsed().as_secs_f64());
                calls.push(sync.take_seconds());
            }
            out
        } else {
            let out = sync.reduce(&opt.params, Some(&loss.detach()), false, comm)?;
            if i >= args.warmup {
                compute.push(start.elapsed().as_secs_f64());
            }
            out
        };
        // The norm read in `step_with` synchronises a GPU, so the time covers the work.
        let start = Instant::now();
        opt.step_with(0.01, grads);
        if let Some(last) = compute.last_mut().filter(|_| i >= args.warmup) {
            *last += start.elapsed().as_secs_f64();
        }
    }
    let median = median(&mut compute);
    let mut report = json!({
        "arch": args.arch,
        "loss": args.loss,
        "batch_size": args.batch_size,
        "image": [args.channels, args.size, args.size],
        "parameters": params,
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "steps": args.steps,
        "step_seconds_median": median,
        // All ranks together: each steps on --batch-size images.
        "images_per_sec": (args.batch_size * comm.size()) as f64 / median,
        "world_size": comm.size(),
        "precision": args.precision,
        "channels_last": net.channels_last,
        "whole_step": args.whole_step,
    });
    if comm.size() > 1 && !args.whole_step {
        report["sync_seconds_median"] = json!(self::median(&mut reduce));
        report["allreduce_call_seconds_median"] = json!(self::median(&mut calls));
        report["sync_floats"] = json!(sync.len());
    }
    Ok(report)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
