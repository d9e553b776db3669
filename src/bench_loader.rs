//! `cosine-train bench-loader`: how fast the loader delivers ready training batches (decoded,
//! augmented as for the fine-grained datasets, normalised, batched; on the host) from a shard
//! directory, without training.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use datasets_prep::{ShardDir, Split};
use serde_json::{Value, json};

use crate::cli::BenchLoaderArgs;
use crate::data::epoch_order;
use crate::data::loader::LoaderSpec;

pub fn run(args: &BenchLoaderArgs) -> anyhow::Result<Value> {
    let shards = Arc::new(ShardDir::open(&args.data).with_context(|| {
        format!(
            "--data {}: not a usable shard directory",
            args.data.display()
        )
    })?);
    let m = shards.manifest().clone();
    // The fine-grained datasets' training augmentation (448 crops, flips, random erasing).
    let augment = crate::data::augment::AugmentConfig {
        crop: (args.crop > 0).then_some(args.crop),
        hflip: true,
        erase_prob: 0.5,
        shift: 0.0,
    };
    let spec = LoaderSpec {
        shards: Arc::clone(&shards),
        split: Split::Train,
        augment,
        channels: usize::from(m.channels),
        mean: m.train_mean.iter().map(|&v| v as f32).collect(),
        std: m.train_std.iter().map(|&v| (v as f32).max(1e-3)).collect(),
        seed: 0,
        workers: args.workers,
        prefetch: 2 * args.workers.max(1),
        pin_for: None,
    };
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
