//! The cluster paths for real: a one-node Slurm cluster started on this machine
//! (`tests/cluster/slurm.sh`), jobs submitted with the project's own `launch/sbatch.sh` (only the
//! resources overridden on the command line), preempted with a signal, requeued and resumed.
//! Needs root (CI runs as root); elsewhere the test is skipped, said so on stderr and counted in
//! `target/skipped-tests.txt`, which `make test` prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::distributed::train_ranks;
use crate::training::{deterministic, fashion, metrics};
use crate::util::{cosine_train_path, repo_root, run, show};

/// Records a skipped test where `make test` reports it, and says so now.
fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    let path = repo_root().join("target/skipped-tests.txt");
    let line = format!("{test}: {why}\n");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// The cluster's daemons, stopped when dropped (also when an assertion fails).
struct Slurm {
    dir: PathBuf,
}

impl Slurm {
    fn start(dir: &Path) -> Slurm {
        let o = run(
            Command::new("bash")
                .arg(repo_root().join("tests/cluster/slurm.sh"))
                .arg("start")
                .arg(dir),
            Duration::from_secs(300),
        );
        assert!(o.status.success(), "starting Slurm: {}", show(&o));
        Slurm {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("tests/cluster/slurm.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// `sbatch launch/sbatch.sh ARGS` for 2 tasks on this node; returns the job id.
fn submit(out_file: &Path, args: &[&str]) -> String {
    let o = Command::new("sbatch")
        .args([
            "--parsable",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
        ])
        .arg(format!("--output={}", out_file.display()))
        .arg(repo_root().join("launch/sbatch.sh"))
        .args(args)
        .env("COSINE_TRAIN", cosine_train_path())
        .env("COSINE_REPO", repo_root())
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "sbatch: {}", show(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn wait_for(job: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let o = Command::new("squeue")
            .args(["-h", "-j", job])
            .output()
            .unwrap();
        if o.stdout.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "job {job} still queued after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn job_field(job: &str, field: &str) -> String {
    let o = Command::new("scontrol")
        .args(["show", "job", job])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{field}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {field} in {text}"))
}

/// Everything that needs the cluster, in one test that owns it: a 2-task job through the
/// sbatch template matches the same job under mpirun; a job preempted with USR1 checkpoints,
/// exits 75, requeues itself, resumes and ends bit-identical to an uninterrupted run.
#[test]
fn slurm_jobs_match_mpirun_and_survive_preemption_with_requeue() {
    let name = "cluster::slurm_jobs_match_mpirun_and_survive_preemption_with_requeue";
    if !is_root() {
        skip(name, "needs root to run Slurm's daemons");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _slurm = Slurm::start(&tmp.path().join("slurm"));
    let data = fashion(20);
    let data = data.to_str().unwrap();

    // 1. The same job under sbatch + srun --mpi=pmix and under mpirun.
    let tiny = [
        "--data",
        data,
        "--arch",
        "tiny-cnn",
        "--loss",
        "ce",
        "--epochs",
        "2",
        "--batch-size",
        "25",
        "--threads",
        "1",
        "--workers",
        "1",
    ];
    let via_slurm = tmp.path().join("via-slurm");
    let job = submit(
        &tmp.path().join("job-1.out"),
        &[&["train", "--out", via_slurm.to_str().unwrap()], &tiny[..]].concat(),
    );
    wait_for(&job, Duration::from_secs(300));
    let log = std::fs::read_to_string(tmp.path().join("job-1.out")).unwrap_or_default();
    assert_eq!(job_field(&job, "JobState"), "COMPLETED", "{log}");
    let via_mpirun = tmp.path().join("via-mpirun");
    // (train_ranks adds the thread options itself)
    let o = train_ranks(2, Path::new(data), &via_mpirun, &tiny[2..tiny.len() - 4]);
    assert!(o.status.success(), "{}", show(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(via_slurm.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["world_size"], 2, "{log}");
    assert_eq!(
        deterministic(&metrics(&via_slurm)),
        deterministic(&metrics(&via_mpirun))
    );

    // 2. Preemption: USR1 to the batch shell (as `--signal=B:USR1@N` or a preempting job
    // would), checkpoint, exit 75, requeue, resume.
    let resnet = [
        "--data",
        data,
        "--arch",
        "resnet8",
        "--loss",
        "cosine-ce",
        "--epochs",
        "4",
        "--batch-size",
        "25",
        "--checkpoint-every",
        "5",
        "--eval-every",
        "2",
        "--threads",
        "1",
        "--workers",
        "1",
    ];
    let preempted = tmp.path().join("preempted");
    let out_file = tmp.path().join("job-2.out");
    let job = submit(
        &out_file,
        &[
            &[
                "train",
                "--out",
                preempted.to_str().unwrap(),
                "--resume",
                "auto",
            ],
            &resnet[..],
        ]
        .concat(),
    );
    let start = Instant::now();
    while !preempted.join("checkpoints/step-000000000005").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = Command::new("scancel")
        .args(["--signal=USR1", "--batch", &job])
        .output()
        .unwrap();
    assert!(o.status.success(), "scancel: {}", show(&o));
    wait_for(&job, Duration::from_secs(300));
    let log = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert_eq!(job_field(&job, "JobState"), "COMPLETED", "{log}");
    assert_eq!(job_field(&job, "Restarts"), "1", "{log}");
    assert!(log.contains("Exited with exit code 75"), "{log}");
    assert!(log.contains("requeueing job"), "{log}");
    assert!(log.contains("resumed from"), "{log}");

    let reference = tmp.path().join("uninterrupted");
    let o = train_ranks(2, Path::new(data), &reference, &resnet[2..resnet.len() - 4]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        std::fs::read(preempted.join("model.safetensors")).unwrap()
            == std::fs::read(reference.join("model.safetensors")).unwrap(),
        "the preempted and requeued job ended with other weights than an uninterrupted run"
    );
}
