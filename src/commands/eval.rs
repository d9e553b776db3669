//! `cosine-train eval`: evaluates saved weights on the test split of a shard directory, exactly
//! and with any number of ranks, using the model a run directory's `config.json` describes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use datasets_prep::{ShardDir, Split};
use serde_json::{Value, json};

use super::{JobArgs, threads};
use crate::data::loader::LoaderSpec;
use crate::dist::Communicator;
use crate::dist::job::Job;
use crate::network::Network;
use crate::run_dir::{self, records, weights};
use crate::runtime::device::DeviceChoice;
use crate::train::data_parallel::DataParallel;
use crate::train::{class_similarity, evaluate};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory written by `train` (its config.json says how to build the model).
    #[arg(long)]
    pub run: PathBuf,
    /// Weights to evaluate [default: RUN/model.safetensors].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Shard directory [default: the run's --data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Images per forward pass on each rank [default: the run's batch size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Device: cpu, cuda (the local rank's GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// libtorch intra-op threads [default: the cores this rank may use].
    #[arg(long, value_parser = threads())]
    pub threads: Option<i32>,
    #[command(flatten)]
    pub job: JobArgs,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let job = Job::join(&args.job.options(), args.device, args.threads)?;
    let report = job.finish(evaluate_run(args, job.device, &job.comm))?;
    if job.comm.rank() == 0 {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Evaluates and returns the JSON report (identical on every rank).
pub fn evaluate_run(
    args: &EvalArgs,
    device: tch::Device,
    comm: &dyn Communicator,
) -> anyhow::Result<Value> {
    let mut config = records::read_record(&args.run)?.config;
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    let shards = Arc::new(ShardDir::open(&config.data).with_context(|| {
        format!(
            "--data {}: not a usable shard directory",
            config.data.display()
        )
    })?);
    let m = shards.manifest().clone();
    let mut net = Network::build(&config, i64::from(m.channels), &m.classes, device)?;
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => run_dir::weights::of_run(&args.run)?,
    };
    let model_of = args.run.join(run_dir::CONFIG).display().to_string();
    weights::load(&mut net.vs, &weights, &model_of)?;
    let similarity = config
        .hierarchy
        .as_deref()
        .map(|path| class_similarity(path, config.hierarchy_is_a, &m.classes))
        .transpose()?;
    let loader = LoaderSpec::new(
        Arc::clone(&shards),
        Split::Test,
        config.augment.clone(),
        config.seed,
        args.workers,
        device,
    );
    let batch = args.batch_size.unwrap_or(config.batch_size).max(1);
    let dp = DataParallel::new(comm);
    let counts = evaluate(
        &net,
        &loader,
        batch,
        m.classes.len(),
        device,
        similarity.as_deref(),
        &dp,
    )?;
    let mut report = json!({
        "weights": weights.display().to_string(),
        "data": config.data.display().to_string(),
        "test_images": counts.total.iter().sum::<u64>(),
        "correct": counts.correct.iter().sum::<u64>(),
        "test_top1": counts.top1(),
        "test_balanced": counts.balanced(),
        "world_size": comm.size(),
    });
    if let Some(h) = counts.hierarchical() {
        report["test_hierarchical"] = json!(h);
    }
    if let Some(e) = counts.embedding_top1() {
        report["test_embedding_top1"] = json!(e);
    }
    Ok(report)
}
