//! `cosine-train check-dist`: exercises every collective across the job's ranks and reports what
//! each rank saw. Users run it to check a new cluster (MPI, NCCL, GPU binding) before training;
//! the test suite runs it under `mpirun`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::choice;
use crate::dist::{self, Backend};
use crate::runtime::device::DeviceChoice;

#[derive(Debug, Args)]
pub struct CheckDistArgs {
    /// Communication backend: auto picks NCCL for CUDA devices and MPI otherwise.
    #[arg(long, value_parser = choice::<Backend>(), default_value = "auto")]
    pub dist: Backend,
    /// Device of the tensors: cpu, cuda (the local rank's GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Number of f32 elements in the all-reduce.
    #[arg(long, default_value_t = 1 << 20)]
    pub elements: usize,
    /// Number of bytes broadcast from rank 0.
    #[arg(long, default_value_t = (1 << 20) + 3)]
    pub bytes: usize,
    /// Seconds creating the NCCL communicator may wait for the other ranks before the job is
    /// ended (exit status 3); 0 waits forever.
    #[arg(long, value_parser = super::seconds, default_value = "300")]
    pub collective_timeout: std::time::Duration,
}

/// What one rank reports.
#[derive(Debug, Serialize)]
pub struct RankReport {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub local_size: usize,
    pub backend: String,
    pub device: String,
    pub hostname: String,
    /// The first elements of the reduced tensor (the test recomputes them).
    pub all_reduce_head: Vec<f32>,
    /// Sum of all reduced elements, in f64.
    pub all_reduce_total: f64,
    /// Whether every element equals the expected sum exactly.
    pub all_reduce_exact: bool,
    pub all_reduce_secs: f64,
    pub broadcast_len: usize,
    pub broadcast_intact: bool,
    pub barrier_ok: bool,
}

/// The value rank `rank` contributes at element `i`: small integers, so f32 sums are exact.
pub fn contribution(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 7 + 1)) as f32
}

/// The byte rank 0 broadcasts at position `i`.
pub fn broadcast_byte(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

pub fn run(args: &CheckDistArgs) -> anyhow::Result<ExitCode> {
    Ok(if check(args)? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the checks and prints this rank's report; whether every check passed.
pub fn check(args: &CheckDistArgs) -> anyhow::Result<bool> {
    let (comm, device) = dist::connect(args.dist, args.device, args.collective_timeout)
        .with_context(|| format!("cannot set up the {} backend", args.dist))?;
    let (rank, size) = (comm.rank(), comm.size());

    let values: Vec<f32> = (0..args.elements).map(|i| contribution(rank, i)).collect();
    let mut tensor = Tensor::from_slice(&values).to_device(device);
    let start = Instant::now();
    comm.all_reduce_sum(&mut tensor).context("all-reduce")?;
    let reduced = Vec::<f32>::try_from(tensor.to_device(tch::Device::Cpu).to_kind(Kind::Float))
        .context("reading the reduced tensor")?;
    let all_reduce_secs = start.elapsed().as_secs_f64();
    let rank_sum = (size * (size + 1) / 2) as f32;
    let all_reduce_exact = reduced
        .iter()
        .enumerate()
        .all(|(i, &v)| v == rank_sum * (i % 7 + 1) as f32);

    let mut bytes = if rank == 0 {
        (0..args.bytes).map(broadcast_byte).collect()
    } else {
        vec![0xAB; 17]
    };
    comm.broadcast_bytes(&mut bytes, 0).context("broadcast")?;
    let broadcast_intact = bytes.len() == args.bytes
        && bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == broadcast_byte(i));

    comm.barrier().context("barrier")?;

    let report = RankReport {
        rank,
        size,
        local_rank: comm.local_rank(),
        local_size: comm.local_size(),
        backend: comm.backend().to_string(),
        device: format!("{device:?}"),
        hostname: hostname(),
        all_reduce_head: reduced.iter().take(8).copied().collect(),
        all_reduce_total: reduced.iter().map(|&v| f64::from(v)).sum(),
        all_reduce_exact,
        all_reduce_secs,
        broadcast_len: bytes.len(),
        broadcast_intact,
        barrier_ok: true,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(report.all_reduce_exact && report.broadcast_intact)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
