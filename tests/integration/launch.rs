//! The launch scripts users run: the mpirun wrapper and the learning-rate sweep, for real (the
//! Slurm template's real test runs on a Slurm cluster, see the cluster tests).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::training::fashion;
use crate::util::{cosine_train_path, repo_root, run, show, stderr, stdout};

const LIMIT: Duration = Duration::from_secs(300);

fn script(name: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("launch").join(name))
        .env("COSINE_TRAIN", cosine_train_path());
    crate::util::share_cores(&mut cmd);
    cmd
}

#[test]
fn mpirun_wrapper_adds_placement_keepalive_interface_and_environment() {
    let o = run(
        script("mpirun.sh")
            .env("NCCL_DEBUG", "INFO")
            .args([
                "--dry-run",
                "-n",
                "3",
                "--iface",
                "lo",
                "--oversubscribe",
                "--",
            ])
            .args(["train", "--data", "d", "--out", "o"]),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let line = stdout(&o);
    for part in [
        "mpirun -np 3 --map-by slot --bind-to none",
        "--mca oob_tcp_keepalive_time 10",
        "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo",
        "-x LD_LIBRARY_PATH",
        "-x NCCL_DEBUG",
        "-x NCCL_SOCKET_IFNAME",
        "--oversubscribe",
        "cosine-train train --data d --out o",
    ] {
        assert!(line.contains(part), "missing {part:?} in {line}");
    }
    let o = run(
        script("mpirun.sh").args(["-n", "zero", "--", "train"]),
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        stderr(&o).contains("expected a positive number of ranks"),
        "{}",
        show(&o)
    );
    let o = run(script("mpirun.sh").args(["-n", "2"]), LIMIT);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        stderr(&o).contains("put cosine-train's arguments after --"),
        "{}",
        show(&o)
    );
}

const TINY_RUN: [&str; 12] = [
    "--arch",
    "tiny-cnn",
    "--loss",
    "ce",
    "--epochs",
    "1",
    "--batch-size",
    "50",
    "--threads",
    "1",
    "--workers",
    "1",
];

#[test]
fn mpirun_wrapper_launches_a_two_rank_training_job() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run(
        script("mpirun.sh")
            .args(["-n", "2", "--oversubscribe", "--", "train", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(TINY_RUN),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["world_size"], 2);
    assert!(out.join("model.safetensors").is_file());
}

fn sweep(data: &Path, out: &Path) -> std::process::Output {
    run(
        script("lr-sweep.sh")
            .env("COSINE_MPIRUN_ARGS", "--oversubscribe")
            .args(["--np", "2", "--rates", "0.05 0.01", "--out"])
            .arg(out)
            .args(["--", "--data"])
            .arg(data)
            .args(TINY_RUN),
        LIMIT,
    )
}

#[test]
fn lr_sweep_is_a_sweep_over_the_rates_that_reports_the_best_and_continues() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let o = sweep(&data, &out);
    assert!(o.status.success(), "{}", show(&o));
    let table = stdout(&o);
    let mut best = (f64::MIN, "");
    for rate in ["0.05", "0.01"] {
        let run = out.join(format!("lr-max-{rate}"));
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let summary: Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        let top1 = summary["best_top1"].as_f64().unwrap();
        if top1 > best.0 {
            best = (top1, rate);
        }
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["world_size"], 2);
    }
    // No validation split: the rate is chosen on test, as the paper did, and said so.
    assert!(table.contains("on the test split"), "{table}");
    let entry = format!("{:.1} (lr {}, n=1)", 100.0 * best.0, best.1);
    assert!(table.contains(&entry), "{entry} not in {table}");
    assert_eq!(
        std::fs::read_to_string(out.join("sweep.md")).unwrap(),
        table
    );

    // A second call finds both runs finished and trains nothing.
    let o = sweep(&data, &out);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stderr(&o).contains("0 to train, 2 finished"),
        "{}",
        show(&o)
    );

    let o = run(
        script("lr-sweep.sh").args(["--out", "x", "--", "--lr-max", "1"]),
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stderr(&o).contains("do not pass --lr-max"), "{}", show(&o));
}

/// The GPU check carries Open MPI's launcher for machines without one: relocated into a
/// bundle, it runs a one-rank and a two-rank job with the system's Open MPI hidden (a private
/// mount namespace, so only as root).
#[test]
fn the_gpu_checks_bundled_mpirun_runs_without_the_systems_open_mpi() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: hiding the system's Open MPI needs root");
        return;
    }
    let o = run(
        Command::new("bash")
            .arg(repo_root().join("bench/gpu-check.sh"))
            .arg("mpi-rehearsal")
            .env("COSINE_TRAIN", cosine_train_path()),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let out = stdout(&o);
    let lines: Vec<Value> = (out.lines())
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", show(&o));
    assert_eq!(lines[0]["all_reduce_exact"], true, "{}", show(&o));
    assert_eq!(lines[1]["world_size"], 2, "{}", show(&o));
    assert!(
        out.contains("ran without the system Open MPI"),
        "{}",
        show(&o)
    );
}

#[test]
fn sbatch_template_is_valid_bash_and_launches_with_pmix() {
    let path = repo_root().join("launch/sbatch.sh");
    let o = run(Command::new("bash").arg("-n").arg(&path), LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("srun --mpi=pmix --kill-on-bad-exit=1"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("#SBATCH --ntasks-per-node="))
    );
}

#[test]
fn launch_scripts_answer_help_with_status_0_and_sbatch_outside_slurm_with_2() {
    for name in ["mpirun.sh", "lr-sweep.sh", "sbatch.sh"] {
        let o = run(script(name).arg("--help"), LIMIT);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).len() > 200,
            "{name} --help prints its header on stdout: {}",
            show(&o)
        );
    }
    let o = run(
        script("sbatch.sh")
            .env_remove("SLURM_JOB_ID")
            .args(["train", "--data", "x", "--out", "y"]),
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        stderr(&o).contains("not inside a Slurm job"),
        "{}",
        show(&o)
    );
}

/// At launch, `env.sh` takes the libtorch the binary was linked with (its RUNPATH), not the
/// first install it finds: a CUDA build must not be started on the CPU libtorch.
#[test]
fn env_sh_follows_the_binarys_own_libtorch() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("torch-cuda/torch/lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("libtorch_cpu.so"), b"").unwrap();
    let src = tmp.path().join("main.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let bin = tmp.path().join("linked");
    let o = run(
        Command::new("cc")
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .arg(format!("-Wl,--enable-new-dtags,-rpath,{}", lib.display())),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let o = run(
        Command::new("bash")
            .arg("-c")
            .arg("unset LIBTORCH; source launch/env.sh; echo \"$LIBTORCH\"")
            .current_dir(repo_root())
            .env("COSINE_ENV_FOR", &bin),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let found = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(
        std::fs::canonicalize(found).unwrap(),
        std::fs::canonicalize(lib.parent().unwrap()).unwrap()
    );
}
