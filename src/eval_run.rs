//! `cosine-train eval`: evaluates saved weights on the test split of a shard directory, exactly
//! and with any number of ranks, using the model a run directory's `config.json` describes.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use datasets_prep::{ShardDir, Split};
use serde_json::{Value, json};

use crate::cli::EvalArgs;
use crate::config::RunConfig;
use crate::data::loader::LoaderSpec;
use crate::dist::Communicator;
use crate::train::{build_network, class_similarity, evaluate};

/// The configuration a run directory was trained with.
pub fn run_config(run: &Path) -> anyhow::Result<RunConfig> {
    let path = run.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read (not a run directory?)", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let config = value
        .get("config")
        .cloned()
        .with_context(|| format!("{}: has no \"config\" object", path.display()))?;
    serde_json::from_value(config)
        .with_context(|| format!("{}: \"config\" is not a run configuration", path.display()))
}

/// Evaluates and returns the JSON report (identical on every rank).
pub fn run(args: &EvalArgs, device: tch::Device, comm: &dyn Communicator) -> anyhow::Result<Value> {
    let mut config = run_config(&args.run)?;
    if let Some(data) = &args.data {
        config.data = data.display().to_string();
    }
    let shards = Arc::new(
        ShardDir::open(Path::new(&config.data))
            .with_context(|| format!("--data {}: not a usable shard directory", config.data))?,
    );
    let m = shards.manifest().clone();
    let net = build_network(&config, &shards, device)?;
    let weights = args
        .weights
        .clone()
        .unwrap_or_else(|| args.run.join("model.safetensors"));
    let mut vs = net.vs;
    vs.load(&weights).with_context(|| {
        format!(
            "{}: cannot load weights matching the model of {}",
            weights.display(),
            args.run.join("config.json").display()
        )
    })?;
    let net = crate::train::Network { vs, ..net };
    crate::model::layers::forget_all_step_counts();
    let similarity = config
        .hierarchy
        .as_deref()
        .map(|path| class_similarity(path, config.hierarchy_is_a, &m.classes))
        .transpose()?;
    let loader = LoaderSpec {
        shards: Arc::clone(&shards),
        split: Split::Test,
        augment: config.augment.clone(),
        channels: usize::from(m.channels),
        mean: m.train_mean.iter().map(|&v| v as f32).collect(),
        std: m.train_std.iter().map(|&v| (v as f32).max(1e-3)).collect(),
        seed: config.seed,
        workers: args.workers,
        prefetch: 2 * args.workers.max(1),
        pin_for: device.is_cuda().then_some(device),
    };
    let batch = args.batch_size.unwrap_or(config.batch_size).max(1);
    let counts = evaluate(
        &net,
        &loader,
        batch,
        m.classes.len(),
        device,
        similarity.as_deref(),
        comm,
    )?;
    let mut report = json!({
        "weights": weights.display().to_string(),
        "data": config.data,
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
