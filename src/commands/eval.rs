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
use crate::report::csv_field;
use crate::run_dir::{self, records, weights};
use crate::runtime::device::DeviceChoice;
use crate::train::data_parallel::DataParallel;
use crate::train::{EvalCounts, class_similarity, evaluate};
use datasets_prep::manifest::ClassInfo;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory written by `train` (its config.json says how to build the model).
    #[arg(long)]
    pub run: PathBuf,
    /// Also write per-class test accuracy (class id, name, images, top-1, top-5) to this CSV.
    #[arg(long, value_name = "CSV")]
    pub per_class: Option<PathBuf>,
    /// Also write the confusion matrix (rows: true class, columns: predicted, by class id) to
    /// this CSV.
    #[arg(long, value_name = "CSV")]
    pub confusion: Option<PathBuf>,
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
        None,
        batch,
        m.classes.len(),
        device,
        similarity.as_deref(),
        args.confusion.is_some(),
        &dp,
    )?;
    if comm.rank() == 0 {
        if let Some(path) = &args.per_class {
            datasets_prep::atomic::write_file(path, per_class_csv(&counts, &m.classes).as_bytes())
                .context("--per-class")?;
        }
        if let (Some(path), Some(matrix)) = (&args.confusion, &counts.confusion) {
            let text = confusion_csv(matrix, &m.classes);
            datasets_prep::atomic::write_file(path, text.as_bytes()).context("--confusion")?;
        }
    }
    let mut report = json!({
        "weights": weights.display().to_string(),
        "data": config.data.display().to_string(),
        "test_images": counts.total.iter().sum::<u64>(),
        "correct": counts.correct.iter().sum::<u64>(),
        "test_top1": counts.top1(),
        "test_top5": counts.top5(),
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

fn per_class_csv(c: &EvalCounts, classes: &[ClassInfo]) -> String {
    let mut out = String::from("class_id,class_name,test_images,correct,top1,top5\n");
    for (i, class) in classes.iter().enumerate() {
        let n = c.total[i];
        let share = |k: u64| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        out += &format!(
            "{},{},{n},{},{:.6},{:.6}\n",
            csv_field(&class.id),
            csv_field(&class.name),
            c.correct[i],
            share(c.correct[i]),
            share(c.top5_correct[i])
        );
    }
    out
}

fn confusion_csv(matrix: &[u64], classes: &[ClassInfo]) -> String {
    let ids: Vec<String> = classes.iter().map(|c| csv_field(&c.id)).collect();
    let mut out = format!("true\\predicted,{}\n", ids.join(","));
    for (i, id) in ids.iter().enumerate() {
        let row = &matrix[i * classes.len()..(i + 1) * classes.len()];
        let cells: Vec<String> = row.iter().map(u64::to_string).collect();
        out += &format!("{id},{}\n", cells.join(","));
    }
    out
}
