//! Checkpoints and resume through the real binary: killed and preempted runs, resumed, end
//! exactly where an uninterrupted run ends; damaged checkpoints, changed settings and unusable
//! run directories are refused clearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::distributed::{fashion_with_test_images, train_ranks};
use crate::training::{deterministic, metrics};
use crate::util::{cosine_train_path, mpirun, run, show, stderr};

/// resnet8 (BatchNorm: per-rank statistics must survive a resume too), 3 epochs of 8 steps,
/// a checkpoint every 5 steps besides the one after each epoch.
const RUN: [&str; 12] = [
    "--arch",
    "resnet8",
    "--loss",
    "cosine-ce",
    "--epochs",
    "3",
    "--batch-size",
    "25",
    "--checkpoint-every",
    "5",
    "--keep-checkpoints",
    "2",
];

fn data() -> PathBuf {
    fashion_with_test_images(301)
}

fn with_fault(np: usize, out: &Path, fault: &str, extra: &[&str]) -> Output {
    let mut cmd = if np == 0 {
        Command::new(cosine_train_path())
    } else {
        let mut c = mpirun(np);
        c.args(["-x", "COSINE_FAULT"]).arg(cosine_train_path());
        c
    };
    cmd.env("COSINE_FAULT", fault)
        .arg("train")
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(out)
        .args(["--threads", "1", "--workers", "1"])
        .args(RUN)
        .args(extra);
    run(&mut cmd, Duration::from_secs(300))
}

/// A one-rank run into `out`, sent `signal` from outside once its first checkpoint (step 5)
/// exists; its output once it has exited.
fn signalled_after_first_checkpoint(out: &Path, signal: i32) -> Output {
    let child = Command::new(cosine_train_path())
        .arg("train")
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(out)
        .args(["--threads", "1", "--workers", "1"])
        .args(RUN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !out.join("checkpoints/step-000000000005").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    child.wait_with_output().unwrap()
}

/// The run directory `out` ends like `reference`: the same metrics (wall-clock fields aside)
/// and bit-identical final weights.
fn assert_same_run(out: &Path, reference: &Path) {
    assert_eq!(
        deterministic(&metrics(out)),
        deterministic(&metrics(reference))
    );
    let (a, b) = (
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(reference.join("model.safetensors")).unwrap(),
    );
    assert!(a == b, "final weights differ from the uninterrupted run");
}

/// A rank killed by SIGKILL in the middle of epoch 2 (step 13, after the checkpoint of step
/// 10), resumed with `--resume auto`, ends bit-identical to the uninterrupted run: on one rank,
/// and on two ranks with rank 1 killed.
#[test]
fn a_run_killed_mid_epoch_resumes_to_the_identical_result() {
    let tmp = tempfile::tempdir().unwrap();
    for np in [0usize, 2] {
        let reference = tmp.path().join(format!("uninterrupted-{np}"));
        let o = train_ranks(np, &data(), &reference, &RUN);
        assert!(o.status.success(), "{}", show(&o));

        let out = tmp.path().join(format!("killed-{np}"));
        let rank = if np == 0 { 0 } else { 1 };
        let o = with_fault(np, &out, &format!("rank={rank},step=13,kind=kill"), &[]);
        assert!(!o.status.success(), "{}", show(&o));
        let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.contains(&"step-000000000010".to_string()),
            "{names:?}"
        );
        assert!(!out.join("model.safetensors").exists());

        let o = train_ranks(
            np,
            &data(),
            &out,
            &[&RUN[..], &["--resume", "auto"]].concat(),
        );
        assert!(o.status.success(), "{}", show(&o));
        assert_same_run(&out, &reference);
        let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
        assert!(
            log.contains("resumed from") && log.contains("step-000000000010"),
            "{log}"
        );
    }
}

/// SIGTERM (what Slurm sends before preemption) makes the run finish its step, checkpoint and
/// exit with 75; `--resume auto` then completes it identically. One rank gets a real SIGTERM
/// from outside; on two ranks only rank 1 is signalled, and both stop at the same step.
#[test]
fn sigterm_checkpoints_exits_75_and_resume_completes_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("uninterrupted");
    let o = train_ranks(0, &data(), &reference, &RUN);
    assert!(o.status.success(), "{}", show(&o));

    // A real signal, from outside, once the first checkpoint exists.
    let out = tmp.path().join("terminated");
    let o = signalled_after_first_checkpoint(&out, libc::SIGTERM);
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    assert!(stderr(&o).contains("stopped by SIGTERM"), "{}", show(&o));
    let o = train_ranks(
        0,
        &data(),
        &out,
        &[&RUN[..], &["--resume", "auto"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out, &reference);

    let reference2 = tmp.path().join("uninterrupted-2");
    let o = train_ranks(2, &data(), &reference2, &RUN);
    assert!(o.status.success(), "{}", show(&o));
    let out2 = tmp.path().join("terminated-2");
    let o = with_fault(2, &out2, "rank=1,step=11,kind=signal", &[]);
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    assert!(
        out2.join("checkpoints/step-000000000011/state.json")
            .is_file()
    );
    let o = train_ranks(
        2,
        &data(),
        &out2,
        &[&RUN[..], &["--resume", "auto"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out2, &reference2);

    // The same checkpoint continues on another world size: same global batches, one rank.
    let other = tmp.path().join("terminated-2-then-1");
    let o = with_fault(2, &other, "rank=1,step=11,kind=signal", &[]);
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    let o = train_ranks(0, &data(), &other, &[&RUN[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", show(&o));
    let m = metrics(&other);
    assert_eq!(m.len(), 4, "3 epochs and a summary");
    let log = std::fs::read_to_string(other.join("log.txt")).unwrap();
    assert!(log.contains("(world size 2 then, 1 now)"), "{log}");
}

/// Reading the step totals every 3 steps instead of every step (a GPU reads every 16, so that
/// it never waits for the host) changes no result. A stop request is acted on at the next read,
/// by every rank alike: rank 1 signalled before step 11 stops both after step 13 (the read
/// after the checkpoint of step 10 comes 3 steps later), and the run resumes to the result of
/// the uninterrupted one.
#[test]
fn step_totals_read_every_few_steps_change_no_result_only_when_a_stop_is_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let every_3 = [&RUN[..], &["--totals-every", "3"]].concat();
    let reference = tmp.path().join("every-step");
    let o = train_ranks(2, &data(), &reference, &RUN);
    assert!(o.status.success(), "{}", show(&o));
    let batched = tmp.path().join("every-3");
    let o = train_ranks(2, &data(), &batched, &every_3);
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&batched, &reference);

    let out = tmp.path().join("signalled");
    let o = with_fault(
        2,
        &out,
        "rank=1,step=11,kind=signal",
        &["--totals-every", "3"],
    );
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    let checkpoint = |step: u32| out.join(format!("checkpoints/step-{step:012}/state.json"));
    assert!(checkpoint(13).is_file(), "{}", show(&o));
    assert!(!checkpoint(11).exists() && !checkpoint(12).exists());
    let o = train_ranks(
        2,
        &data(),
        &out,
        &[&every_3[..], &["--resume", "auto"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out, &reference);

    // A stop read at an epoch's end (signal before step 6, reads after steps 5 and 8): the
    // resumed run has no step of that epoch left, and still records the epoch's last rate
    // (a rate that changes every step shows it).
    let per_step = [&every_3[..], &["--schedule", "cosine-steps"]].concat();
    let reference = tmp.path().join("per-step-rates");
    let o = train_ranks(0, &data(), &reference, &per_step);
    assert!(o.status.success(), "{}", show(&o));
    let out = tmp.path().join("stopped-at-epoch-end");
    let o = with_fault(0, &out, "rank=0,step=6,kind=signal", &per_step[RUN.len()..]);
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    assert!(
        out.join("checkpoints/step-000000000008/state.json")
            .is_file()
    );
    let o = train_ranks(
        0,
        &data(),
        &out,
        &[&per_step[..], &["--resume", "auto"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out, &reference);
}

/// Ctrl-C (SIGINT) checkpoints like SIGTERM but exits 130; `--resume` with nothing but the run
/// directory takes every setting from the run and completes it identically; a larger `--epochs`
/// then extends the finished run, whose first epochs stay as they were.
#[test]
fn ctrl_c_checkpoints_and_the_run_resumes_and_extends_from_its_directory_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("uninterrupted");
    let o = train_ranks(0, &data(), &reference, &RUN);
    assert!(o.status.success(), "{}", show(&o));

    let out = tmp.path().join("interrupted");
    let o = signalled_after_first_checkpoint(&out, libc::SIGINT);
    assert_eq!(o.status.code(), Some(130), "{}", show(&o));
    assert_eq!(
        stderr(&o).matches("stopped by SIGINT").count(),
        1,
        "said once: {}",
        show(&o)
    );

    // An unfinished run evaluates from its newest checkpoint, and says so.
    let o = run(
        Command::new(cosine_train_path())
            .args(["eval", "--threads", "1", "--run"])
            .arg(&out),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stderr(&o).contains("using its newest checkpoint"),
        "{}",
        show(&o)
    );

    // From another directory, with the run directory alone.
    let resume = |extra: &[&str]| {
        let mut cmd = Command::new(cosine_train_path());
        cmd.current_dir(tmp.path())
            .args(["train", "--out", "interrupted", "--resume"])
            .args(["--threads", "1", "--workers", "1"])
            .args(extra);
        run(&mut cmd, Duration::from_secs(300))
    };
    let o = resume(&[]);
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out, &reference);

    let o = resume(&["--seed", "7"]);
    assert!(!o.status.success(), "a changed setting is refused");
    assert!(stderr(&o).contains("seed: 0 -> 7"), "{}", show(&o));

    let o = resume(&["--epochs", "4"]);
    assert!(o.status.success(), "{}", show(&o));
    let (longer, planned) = (metrics(&out), metrics(&reference));
    assert_eq!(longer.len(), 5, "4 epochs and a summary");
    assert_eq!(deterministic(&longer[..3]), deterministic(&planned[..3]));
    assert_eq!(longer[4]["epochs"], 4);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(record["config"]["epochs"], 4);
    let data = record["config"]["data"].as_str().unwrap();
    assert!(Path::new(data).is_absolute(), "config.json records {data}");
}

/// A corrupted newest checkpoint is named and skipped for the one before; when none is valid,
/// `--resume` fails naming them; `--resume auto` on an empty run directory starts fresh.
#[test]
fn damaged_checkpoints_are_named_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = with_fault(0, &out, "rank=0,step=13,kind=kill", &[]);
    assert!(!o.status.success());
    let ckpts = out.join("checkpoints");
    let newest = ckpts.join("step-000000000010/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&newest, bytes).unwrap();
    let o = train_ranks(0, &data(), &out, &[&RUN[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("skipping a damaged checkpoint")
            && err.contains("step-000000000010/model.safetensors: content does not match"),
        "{}",
        show(&o)
    );
    assert!(
        err.contains("resumed from") && err.contains("step-000000000008"),
        "{err}"
    );

    let broken = tmp.path().join("broken");
    let o = with_fault(0, &broken, "rank=0,step=13,kind=kill", &[]);
    assert!(!o.status.success());
    for dir in std::fs::read_dir(broken.join("checkpoints")).unwrap() {
        let f = dir.unwrap().path().join("optimizer.safetensors");
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    }
    let o = train_ranks(0, &data(), &broken, &[&RUN[..], &["--resume"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("no valid checkpoint")
            && err.contains("optimizer.safetensors: is")
            && err.contains("truncated"),
        "{err}"
    );

    let fresh = tmp.path().join("fresh");
    let o = train_ranks(
        0,
        &data(),
        &fresh,
        &[&RUN[..], &["--resume", "auto"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(metrics(&fresh).len(), 4);
}

/// Settings that change the result cannot change on resume; the error lists each difference.
/// Loader threads may change.
#[test]
fn resuming_with_changed_settings_is_refused_with_the_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = with_fault(0, &out, "rank=0,step=6,kind=kill", &[]);
    assert!(!o.status.success());
    let mut changed: Vec<&str> = RUN.to_vec();
    changed[3] = "cosine"; // --loss
    let o = train_ranks(
        0,
        &data(),
        &out,
        &[&changed[..], &["--resume", "--lr-max", "0.3"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("settings differ from the checkpoint's")
            && err.contains("objective.loss: \"cosine-ce\" -> \"cosine\"")
            && err.contains("schedule.max_lr: 0.5 -> 0.3"),
        "{err}"
    );
    let o = Command::new(cosine_train_path())
        .arg("train")
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&out)
        .args(["--threads", "1", "--workers", "2", "--resume"])
        .args(RUN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

/// A long tiny-cnn run into `out` (one checkpoint kept), for the full-disk test.
fn tiny_run_on(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(cosine_train_path());
    cmd.arg("train")
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(out)
        .args([
            "--threads",
            "1",
            "--workers",
            "1",
            "--arch",
            "tiny-cnn",
            "--loss",
            "ce",
        ])
        .args([
            "--epochs",
            "200",
            "--batch-size",
            "50",
            "--keep-checkpoints",
            "1",
        ])
        .args(extra);
    cmd
}

/// A run directory that cannot be written, or that lacks room for the checkpoints, is refused
/// before training; a disk that fills up during the run stops it with an error and leaves the
/// earlier checkpoints loadable. Full disks come from a small tmpfs (needs root, as in CI).
#[test]
fn unwritable_or_full_run_directories_are_clear_errors() {
    let o = train_ranks(0, &data(), Path::new("/proc/cosine-train-run"), &RUN);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("/proc/cosine-train-run: cannot create the run directory"),
        "{}",
        show(&o)
    );

    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=600k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mounting a tmpfs needs root (CI runs as root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());

    // resnet8 checkpoints are ~0.6 MiB: two (keep 1, plus the one being written) do not fit.
    let o = train_ranks(
        0,
        &data(),
        &mnt.join("run"),
        &[&RUN[..10], &["--keep-checkpoints", "1"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("MiB free, but 2 checkpoints of"),
        "{}",
        show(&o)
    );

    // tiny-cnn checkpoints (~0.2 MiB) fit; a filler file then takes the rest of the disk.
    let out = mnt.join("tiny");
    let child = tiny_run_on(&out, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while crate::util::checkpoints(&out).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let filler = mnt.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        show(&o)
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(!crate::util::checkpoints(&out).is_empty());
    // The kept checkpoint loads: a resume starts from it (stopped once it has said so).
    let mut child = tiny_run_on(&out, &["--resume"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let resumed = loop {
        let log = std::fs::read_to_string(out.join("log.txt")).unwrap_or_default();
        if log.contains("resumed from") {
            break true;
        }
        if start.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(resumed, "the resume did not start from the kept checkpoint");
}
