//! Collectives under a real `mpirun`, checked against values computed here.

use std::time::Duration;

use serde_json::Value;

use crate::util::{cosine_train, cosine_train_path, mpirun, run, show, stdout};

const LIMIT: Duration = Duration::from_secs(120);

/// Runs `check-dist` on `np` ranks and returns each rank's report, ordered by rank.
fn check_dist(np: usize, elements: usize, bytes: usize) -> Vec<Value> {
    let out = run(
        mpirun(np).arg(cosine_train_path()).args([
            "check-dist",
            "--dist",
            "mpi",
            "--elements",
            &elements.to_string(),
            "--bytes",
            &bytes.to_string(),
        ]),
        LIMIT,
    );
    assert!(out.status.success(), "{}", show(&out));
    let mut reports: Vec<Value> = stdout(&out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect();
    reports.sort_by_key(|r| r["rank"].as_u64());
    assert_eq!(reports.len(), np, "{}", show(&out));
    reports
}

#[test]
fn two_ranks_all_reduce_broadcast_and_local_ranks() {
    let elements = 1_000_003; // odd, larger than one cache line of anything
    let bytes = (1 << 20) + 3;
    let reports = check_dist(2, elements, bytes);
    // Rank r contributes (r + 1) * (i % 7 + 1); two ranks sum to 3 * (i % 7 + 1).
    let expected_head: Vec<f64> = (0..8).map(|i| (3 * (i % 7 + 1)) as f64).collect();
    let expected_total: f64 = (0..elements).map(|i| (3 * (i % 7 + 1)) as f64).sum();
    for (rank, r) in reports.iter().enumerate() {
        assert_eq!(r["rank"], rank);
        assert_eq!(r["size"], 2);
        assert_eq!(r["local_size"], 2, "both ranks share this node");
        assert_eq!(
            r["local_rank"], rank,
            "local rank follows world rank on one node"
        );
        assert_eq!(r["backend"], "mpi");
        let head: Vec<f64> = r["all_reduce_head"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(head, expected_head, "rank {rank}");
        assert_eq!(
            r["all_reduce_total"].as_f64().unwrap(),
            expected_total,
            "rank {rank}"
        );
        assert_eq!(r["all_reduce_exact"], true, "rank {rank}");
        assert_eq!(r["broadcast_len"], bytes, "rank {rank}");
        assert_eq!(r["broadcast_intact"], true, "rank {rank}");
    }
}

#[test]
fn three_ranks_sum_exactly() {
    let reports = check_dist(3, 101, 0);
    for r in &reports {
        // 1 + 2 + 3 = 6 times (i % 7 + 1).
        assert_eq!(r["all_reduce_head"][0].as_f64(), Some(6.0));
        assert_eq!(r["all_reduce_head"][6].as_f64(), Some(42.0));
        assert_eq!(r["all_reduce_exact"], true);
        assert_eq!(r["broadcast_len"], 0);
        assert_eq!(r["broadcast_intact"], true);
    }
}

#[test]
fn singleton_without_mpirun_is_one_rank() {
    for dist in ["mpi", "single"] {
        let out = run(
            cosine_train().args(["check-dist", "--dist", dist, "--elements", "9"]),
            LIMIT,
        );
        assert!(out.status.success(), "{}", show(&out));
        let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(r["size"], 1);
        assert_eq!(r["rank"], 0);
        assert_eq!(r["local_rank"], 0);
        assert_eq!(r["all_reduce_head"][1].as_f64(), Some(2.0));
        assert_eq!(r["backend"], dist);
    }
}
