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
use crate::util::{cosine_train_path, repo_root, run, show, skip};

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
    submit_to(&[], out_file, args)
}

/// `submit` with more sbatch options (`--partition=high`).
fn submit_to(extra: &[&str], out_file: &Path, args: &[&str]) -> String {
    let o = Command::new("sbatch")
        .args([
            "--parsable",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
        ])
        .args(extra)
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
/// sbatch template matches the same job under mpirun; a job signalled with USR1, and a job
/// preempted by one in a higher-priority partition, checkpoint, exit 75, requeue, resume and
/// end bit-identical to an uninterrupted run.
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
    let same_weights = |dir: &Path| {
        std::fs::read(dir.join("model.safetensors")).unwrap()
            == std::fs::read(reference.join("model.safetensors")).unwrap()
    };
    assert!(
        same_weights(&preempted),
        "the signalled and requeued job ended with other weights than an uninterrupted run"
    );

    // 3. Real preemption: a job in the high-priority partition needs the low job's CPUs.
    let low = tmp.path().join("low");
    let low_file = tmp.path().join("job-3.out");
    let job = submit(
        &low_file,
        &[
            &["train", "--out", low.to_str().unwrap(), "--resume", "auto"],
            &resnet[..],
        ]
        .concat(),
    );
    let start = Instant::now();
    while !low.join("checkpoints/step-000000000005").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let high = tmp.path().join("high");
    let high_job = submit_to(
        &["--partition=high"],
        &tmp.path().join("job-4.out"),
        &[&["train", "--out", high.to_str().unwrap()], &tiny[..]].concat(),
    );
    wait_for(&high_job, Duration::from_secs(300));
    wait_for(&job, Duration::from_secs(300));
    let log = std::fs::read_to_string(&low_file).unwrap_or_default();
    assert_eq!(job_field(&high_job, "JobState"), "COMPLETED");
    assert_eq!(job_field(&job, "JobState"), "COMPLETED", "{log}");
    assert_eq!(job_field(&job, "Restarts"), "1", "{log}");
    assert!(log.contains("Exited with exit code 75"), "{log}");
    assert!(
        same_weights(&low),
        "the preempted job ended with other weights: {log}"
    );
}

/// Two network-namespace "hosts" (`tests/cluster/netns.sh`), deleted when dropped.
struct TwoHosts {
    dir: PathBuf,
    prefix: String,
}

impl TwoHosts {
    fn up(dir: &Path) -> TwoHosts {
        // Short and unique per test process: namespace and interface names are global.
        let prefix = format!("cz{}", std::process::id() % 100_000);
        let hosts = TwoHosts {
            dir: dir.to_path_buf(),
            prefix,
        };
        let o = hosts.script("up").output().unwrap();
        assert!(o.status.success(), "netns up: {}", show(&o));
        hosts
    }

    fn script(&self, step: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("tests/cluster/netns.sh"))
            .arg(step)
            .arg(&self.dir)
            .arg(&self.prefix);
        cmd
    }

    /// `launch/mpirun.sh` started in host 1, one rank on each host, MPI over eth0 only.
    fn mpirun(&self, args: &[&str]) -> Command {
        let mut cmd = self.script("run");
        cmd.args([
            "bash",
            repo_root().join("launch/mpirun.sh").to_str().unwrap(),
        ])
        .args([
            "-n",
            "2",
            "--hosts",
            "10.77.0.1:1,10.77.0.2:1",
            "--iface",
            "eth0",
            "--",
        ])
        .args(args)
        .env("COSINE_TRAIN", cosine_train_path());
        cmd
    }

    fn pids_of(&self, host: usize, comm: &str) -> Vec<i32> {
        let o = Command::new("ip")
            .args(["netns", "pids", &format!("{}n{host}", self.prefix)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect()
    }

    fn leftovers(&self) -> usize {
        (1..=2)
            .map(|h| {
                let o = Command::new("ip")
                    .args(["netns", "pids", &format!("{}n{h}", self.prefix)])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .count()
            })
            .sum()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = self.script("down").status();
    }
}

/// Starts a long 2-host training job, waits for its first epoch, applies `fault`, and returns
/// the job's exit status, its output and the seconds from the fault to the job's end (at most
/// 90 s: a job that does not notice is killed and fails the test).
fn fault_after_first_epoch(
    hosts: &TwoHosts,
    data: &str,
    out: &Path,
    fault: impl FnOnce(),
) -> (std::process::ExitStatus, String, f64) {
    let log = out.with_extension("log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = hosts
        .mpirun(&[
            "train",
            "--data",
            data,
            "--out",
            out.to_str().unwrap(),
            "--arch",
            "tiny-cnn",
            "--loss",
            "ce",
            "--epochs",
            "1000",
            "--batch-size",
            "25",
            "--threads",
            "1",
            "--workers",
            "1",
        ])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::metadata(out.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0) {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!(
                "the job never finished an epoch: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    fault();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = t.elapsed().as_secs_f64();
    (
        status,
        std::fs::read_to_string(&log).unwrap_or_default(),
        secs,
    )
}

/// Two hosts over TCP only: the 2-rank job gives the same result as 2 ranks on one host; a rank
/// killed on host 2 ends the job within 30 s naming it; a cut link ends it within 30 s too (the
/// keepalive settings of `launch/mpirun.sh`), and nothing is left running.
#[test]
fn two_hosts_over_tcp_match_one_host_and_end_fast_on_failures() {
    let name = "cluster::two_hosts_over_tcp_match_one_host_and_end_fast_on_failures";
    if !is_root() {
        skip(name, "needs root to create network namespaces");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hosts = TwoHosts::up(tmp.path());
    let data = fashion(20);
    let data = data.to_str().unwrap();

    let o = run(
        &mut hosts.mpirun(&["check-dist", "--elements", "1000"]),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    for host in ["\"hostname\":\"node1\"", "\"hostname\":\"node2\""] {
        assert!(text.contains(host), "ranks not on two hosts: {text}");
    }
    assert_eq!(text.matches("\"local_size\":1").count(), 2, "{text}");

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
    ];
    let two_hosts = tmp.path().join("two-hosts");
    let o = run(
        &mut hosts.mpirun(
            &[
                &[
                    "train",
                    "--out",
                    two_hosts.to_str().unwrap(),
                    "--threads",
                    "1",
                    "--workers",
                    "1",
                ],
                &tiny[..],
            ]
            .concat(),
        ),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", show(&o));
    let one_host = tmp.path().join("one-host");
    let o = train_ranks(2, Path::new(data), &one_host, &tiny[2..]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        deterministic(&metrics(&two_hosts)),
        deterministic(&metrics(&one_host))
    );

    // A rank that hangs (alive, not dead) on the other host is named by rank 0.
    let hung = tmp.path().join("hung");
    let start = Instant::now();
    let o = run(
        hosts
            .mpirun(
                &[
                    &["train", "--out", hung.to_str().unwrap(), "--threads", "1"][..],
                    &["--workers", "1", "--collective-timeout", "3"][..],
                    &tiny[..],
                ]
                .concat(),
            )
            .env("COSINE_FAULT", "rank=1,step=3,kind=hang"),
        Duration::from_secs(120),
    );
    assert!(!o.status.success(), "{}", show(&o));
    assert!(start.elapsed() < Duration::from_secs(40), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(
            "rank 1 did not arrive: its last collective was #4 (all-reduce: gradient all-reduce, epoch 1 step 2)"
        ),
        "the hung rank is not named: {}",
        show(&o)
    );

    let (status, output, secs) =
        fault_after_first_epoch(&hosts, data, &tmp.path().join("killed"), || {
            for pid in hosts.pids_of(2, "cosine-train") {
                // SAFETY: killing our own test job's rank.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
    assert!(!status.success(), "{output}");
    assert!(
        secs < 30.0,
        "the job took {secs:.1} s to end after its rank died"
    );
    assert!(
        output.contains("process rank 1") && output.contains("10.77.0.2"),
        "the failing rank is not named: {output}"
    );

    let (status, output, secs) =
        fault_after_first_epoch(&hosts, data, &tmp.path().join("cut"), || {
            let s = Command::new("ip")
                .args([
                    "-n",
                    &format!("{}sw", hosts.prefix),
                    "link",
                    "set",
                    "port2",
                    "down",
                ])
                .status()
                .unwrap();
            assert!(s.success());
        });
    assert!(!status.success(), "{output}");
    assert!(
        secs < 30.0,
        "the job took {secs:.1} s to end after its link was cut"
    );
    assert!(output.contains("lost communication"), "{output}");
    // Host 2's daemon and rank notice on their own a moment later.
    let start = Instant::now();
    while hosts.leftovers() > 0 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(hosts.leftovers(), 0, "processes left in the namespaces");
}
