//! Random-access read throughput of a shard directory's train split: records/s and GB/s over a
//! seeded random order (first pass cold or warm as the page cache has it, then warm passes).
//!
//!     cargo run --release -p datasets-prep --example read_bench -- SHARD_DIR [PASSES]

use std::time::Instant;

use datasets_prep::rng::SplitMix64;
use datasets_prep::{ShardDir, Split};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: read_bench SHARD_DIR [PASSES]"))?;
    let passes: usize = args.next().map_or(Ok(3), |p| p.parse())?;
    let shards = ShardDir::open(dir.as_ref())?;
    let train = shards.split(Split::Train);
    let mut order: Vec<usize> = (0..train.len()).collect();
    SplitMix64::new(1).shuffle(&mut order);
    for pass in 0..passes {
        let start = Instant::now();
        let (mut bytes, mut checksum) = (0usize, 0u64);
        for &i in &order {
            let r = train.record(i)?;
            let px = r.pixels()?;
            bytes += px.len();
            // Touch every 64th byte so the pages are really read.
            checksum += px.iter().step_by(64).map(|&b| u64::from(b)).sum::<u64>();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "pass {pass}: {} records in {secs:.3}s = {:.0} records/s, {:.2} GB/s of pixels (checksum {checksum})",
            order.len(),
            order.len() as f64 / secs,
            bytes as f64 / secs / 1e9
        );
    }
    Ok(())
}
