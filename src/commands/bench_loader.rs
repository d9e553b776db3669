//! `cosine-train bench-loader`: how fast the loader delivers ready training batches (decoded,
//! augmented as for the fine-grained datasets, normalised, batched; on the host) from a shard
//! directory, without training.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use datasets_prep::{ShardDir, Split};
use serde_json::{Value, json};

use clap::Args;

use crate::data::epoch_order;
use crate::data::loader::LoaderSpec;

#[derive(Debug, Args)]
pub struct BenchLoaderArgs {
    /// Shard directory.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Timed passes over the training split (after one untimed pass).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Square random crop (with flips and random erasing, as for the fine-grained datasets);
    /// 0 keeps the stored size.
    #[arg(long, default_value_t = 448)]
    pub crop: u32,
}

pub fn run(args: &BenchLoaderArgs) -> anyhow::Result<std::process::ExitCode> {
    println!("{}", serde_json::to_string(&measure(args)?)?);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Times the loader: the report printed as JSON.
pub fn measure(args: &BenchLoaderArgs) -> anyhow::Result<Value> {
    let shards = Arc::new(ShardDir::open(&args.data).with_context(|| {
        format!(
            "--data {}: not a usable shard directory",
            args.data.display()
        )
    })?);
    let m = shards.manifest().clone();
    // The fine-grained datasets' training augmentation (crops, flips, random erasing).
    let mut augment =
        crate::config::defaults::augment_for(Some(&datasets_prep::sources::Source::Cub));
    augment.crop = (args.crop > 0).then_some(args.crop);
    let spec = LoaderSpec::new(
        Arc::clone(&shards),
        Split::Train,
        augment,
        0,
        args.workers,
        tch::Device::Cpu,
    );
    let n = m.train.count as usize;
    let mut images = 0usize;
    let mut shape = Vec::new();
    // One untimed pass warms the page cache, as the baseline's first pass does.
    for b in spec.start(0, epoch_order(0, 0, n), args.batch_size, true) {
        shape = b?.images.size();
    }
    let start = Instant::now();
    for epoch in 1..=args.epochs.max(1) as u64 {
        for b in spec.start(epoch, epoch_order(0, epoch, n), args.batch_size, true) {
            images += b?.len();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "data": Path::new(&args.data).display().to_string(),
        "images": images,
        "seconds": secs,
        "images_per_sec": images as f64 / secs,
        "workers": args.workers,
        "batch_shape": shape,
    }))
}
