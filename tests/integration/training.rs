//! `cosine-train train` through the real binary on real data (Fashion-MNIST from the Debian
//! package, packed here with the datasets-prep library).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use datasets_prep::pack::{PackOptions, pack};
use datasets_prep::sources::Source;
use serde_json::Value;

use crate::util::{cosine_train, run, show, stderr, stdout};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
const LIMIT: Duration = Duration::from_secs(600);

/// Fashion-MNIST with `k` training images per class (seed 0), packed once per test process.
pub(crate) fn fashion(k: usize) -> PathBuf {
    static DIRS: OnceLock<tempfile::TempDir> = OnceLock::new();
    let root = DIRS.get_or_init(|| tempfile::tempdir().unwrap()).path();
    let out = root.join(format!("fmnist-k{k}"));
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    if !out.exists() {
        assert!(
            Path::new(FASHION_MNIST).is_dir(),
            "{FASHION_MNIST} missing: run `make setup`"
        );
        let mut opts = PackOptions::new(Source::Idx, FASHION_MNIST.into(), out.clone());
        opts.per_class = Some(k);
        pack(&opts).unwrap();
    }
    out
}

pub(crate) fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Metrics without the wall-clock fields, the only ones that may differ between equal runs.
pub(crate) fn deterministic(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .map(|v| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                for k in [
                    "images_per_sec",
                    "train_seconds",
                    "eval_seconds",
                    "seconds",
                    "sync_seconds",
                ] {
                    o.remove(k);
                }
            }
            v
        })
        .collect()
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run(
        cosine_train()
            .arg("train")
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(out)
            .args(extra),
        LIMIT,
    )
}

/// The small learning recipe of these tests: resnet8, 12 epochs of batch 25 in one SGDR cycle,
/// evaluation at the end only, one libtorch thread and one loader thread.
fn small_recipe<'a>(loss: &'a str, lr: &'a str) -> Vec<&'a str> {
    vec![
        "--arch",
        "resnet8",
        "--loss",
        loss,
        "--lr-max",
        lr,
        "--epochs",
        "12",
        "--sgdr-base",
        "12",
        "--batch-size",
        "25",
        "--eval-every",
        "100",
        "--threads",
        "1",
        "--workers",
        "1",
    ]
}

/// Each objective learns for real: 100 training images per class, a small ResNet, 480 steps
/// (12 epochs of batch 25, one libtorch thread: about 20 s per objective).
/// The bar, 50% top-1 on the full 10,000-image test set, is five times chance; PyTorch on
/// the same recipe reaches 63-68% (findings.md), and our runs land at 65-78%, so the margin
/// covers seed noise while any broken loss, gradient, schedule or BatchNorm fails it.
#[test]
fn every_objective_learns_fashion_mnist_from_100_images_per_class() {
    let data = fashion(100);
    let tmp = tempfile::tempdir().unwrap();
    for (loss, lr) in [
        ("ce", "0.1"),
        ("ce-ls", "0.1"),
        ("cosine", "0.5"),
        ("cosine-ce", "0.5"),
    ] {
        let out = tmp.path().join(loss);
        let o = train(&data, &out, &small_recipe(loss, lr));
        assert!(o.status.success(), "{}", show(&o));
        let lines = metrics(&out);
        let summary = lines.last().unwrap();
        assert_eq!(summary["summary"], true);
        let best = summary["best_top1"].as_f64().unwrap();
        assert!(best > 0.5, "{loss}: best test top-1 {best}");
        let last = &lines[lines.len() - 2];
        assert_eq!(last["epoch"], 12);
        assert!(
            last["test_balanced"].as_f64().unwrap() > 0.45,
            "{loss}: {last}"
        );
        if loss == "cosine-ce" {
            assert!(
                last["test_embedding_top1"].as_f64().unwrap() > 0.3,
                "{last}"
            );
            assert_eq!(last["test_head_top1"], last["test_top1"]);
        }
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["config"]["objective"]["loss"], loss);
        assert!(
            std::fs::read_to_string(out.join("log.txt"))
                .unwrap()
                .contains("done: best test top-1")
        );
    }
}

/// Defaults do not collapse on short runs: 3 epochs (30 steps) of 100 images per class with
/// nothing but the objective chosen (resnet20, batch 100, the default learning rate and, for
/// so few steps, precise BatchNorm statistics). With the reference's moving average these runs
/// evaluated at chance (10-11%). Measured here: ce 66.8%, ce-ls 66.2%, cosine 52.7%,
/// cosine-ce 60.0%; the bar is four times chance, so thread counts and CPUs cannot cross it
/// while a collapse to chance cannot pass.
#[test]
fn three_default_epochs_already_learn_for_every_objective() {
    let data = fashion(100);
    let tmp = tempfile::tempdir().unwrap();
    for loss in ["ce", "ce-ls", "cosine", "cosine-ce"] {
        let out = tmp.path().join(loss);
        let o = train(
            &data,
            &out,
            &[
                "--loss",
                loss,
                "--epochs",
                "3",
                "--eval-every",
                "3",
                "--threads",
                "1",
                "--workers",
                "1",
            ],
        );
        assert!(o.status.success(), "{}", show(&o));
        let best = metrics(&out).last().unwrap()["best_top1"].as_f64().unwrap();
        assert!(
            best > 0.4,
            "{loss}: best test top-1 {best} after 3 default epochs"
        );
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["config"]["bn_stats"], "precise", "{loss}");
        let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
        assert!(
            log.contains("BatchNorm statistics precise in evaluation"),
            "{log}"
        );
    }
}

/// Mixed precision and channels-last memory order on a CPU: bf16 autocast (which `tch::autocast`
/// cannot give: it switches on CUDA fp16) still learns, and the weights saved from
/// channels-last kernels evaluate like the run's own last evaluation in plain NCHW fp32.
#[test]
fn bf16_autocast_and_channels_last_learn_and_save_usable_weights() {
    let data = fashion(100);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let mut args = small_recipe("cosine", "0.5");
    args.extend(["--precision", "bf16", "--channels-last", "on"]);
    let o = train(&data, &out, &args);
    assert!(o.status.success(), "{}", show(&o));
    let lines = metrics(&out);
    let best = lines.last().unwrap()["best_top1"].as_f64().unwrap();
    assert!(best > 0.5, "bf16 + channels-last: best test top-1 {best}");
    let last = lines[lines.len() - 2]["test_top1"].as_f64().unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["precision"], "bf16");

    let o = run(
        cosine_train().args(["eval", "--run", out.to_str().unwrap(), "--threads", "1"]),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let report: Value = stdout(&o)
        .lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no report: {}", show(&o)));
    let evaluated = report["test_top1"].as_f64().unwrap();
    // Only summation order differs between the layouts: a handful of the 10,000 test images
    // may flip, no more.
    assert!(
        (evaluated - last).abs() <= 0.002,
        "eval of the saved weights {evaluated} vs the run's last evaluation {last}"
    );
}

#[test]
fn same_seed_same_metrics_whatever_the_loader_threads() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--arch",
        "resnet8",
        "--loss",
        "cosine-ce",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--seed",
        "5",
        "--eval-every",
        "2",
        "--threads",
        "1",
    ];
    let mut runs = Vec::new();
    for workers in ["1", "2", "2"] {
        let out = tmp.path().join(format!("w{workers}-{}", runs.len()));
        let o = train(&data, &out, &[&args[..], &["--workers", workers]].concat());
        assert!(o.status.success(), "{}", show(&o));
        runs.push(deterministic(&metrics(&out)));
    }
    assert_eq!(runs[0].len(), 4, "3 epochs and a summary");
    assert!(
        runs[0][1].get("test_top1").is_some() && runs[0][0].get("test_top1").is_none(),
        "evaluated every 2nd epoch and at the end"
    );
    assert_eq!(runs[0], runs[1], "1 vs 2 loader threads");
    assert_eq!(runs[1], runs[2], "the same run twice");
    let other = tmp.path().join("seed6");
    let o = train(
        &data,
        &other,
        &[&args[..8], &args[10..], &["--seed", "6"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_ne!(
        deterministic(&metrics(&other)),
        runs[0],
        "another seed, another run"
    );
}

/// `--out` never costs the user a file: a folder of their own files is refused untouched (even
/// with --force); a run that died at its first step keeps its error in log.txt and is simply
/// started again, without --force.
#[test]
fn the_run_directory_removes_only_what_a_run_wrote() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let own = tmp.path().join("mine");
    std::fs::create_dir_all(own.join("checkpoints")).unwrap();
    std::fs::write(own.join("checkpoints/results.csv"), "precious").unwrap();
    std::fs::write(own.join("log.txt"), "my notes").unwrap();
    for force in [false, true] {
        let extra: &[&str] = if force { &["--force"] } else { &[] };
        let o = train(&data, &own, &[&["--epochs", "1"][..], extra].concat());
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(stderr(&o).contains("holds no run"), "{}", show(&o));
    }
    assert_eq!(
        std::fs::read_to_string(own.join("checkpoints/results.csv")).unwrap(),
        "precious"
    );
    assert_eq!(
        std::fs::read_to_string(own.join("log.txt")).unwrap(),
        "my notes"
    );

    let out = tmp.path().join("run");
    let o = run(
        cosine_train()
            .env("COSINE_FAULT", "rank=0,step=1,kind=error")
            .arg("train")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--epochs", "1", "--threads", "1"]),
        Duration::from_secs(300),
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert!(log.contains("error: "), "the error is in log.txt: {log}");
    let o = train(&data, &out, &["--epochs", "1", "--threads", "1"]);
    assert!(
        o.status.success(),
        "restarted without --force: {}",
        show(&o)
    );
    assert_eq!(metrics(&out).len(), 2, "1 epoch and a summary");
    // The epoch's scalars are in one TensorBoard event file (the failed start's was removed).
    let events: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let bytes = std::fs::read(&events[0]).unwrap();
    let has = |tag: &str| bytes.windows(tag.len()).any(|w| w == tag.as_bytes());
    assert!(has("brain.Event:2") && has("test/top1") && has("train/loss"));
}

/// `--init-from` starts a new run from saved weights: with a negligible learning rate it
/// evaluates where the first run ended; weights of another model are refused, naming what does
/// not fit; `--new-head` keeps the head's fresh initialisation.
#[test]
fn a_run_starts_from_saved_weights() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "--arch",
        "resnet8",
        "--loss",
        "ce",
        "--bn-stats",
        "precise",
        "--threads",
        "1",
    ];
    let first = tmp.path().join("first");
    let o = train(&data, &first, &[&base[..], &["--epochs", "3"]].concat());
    assert!(o.status.success(), "{}", show(&o));
    let weights = first.join("model.safetensors");
    let w = weights.to_str().unwrap();
    let still = [
        &base[..],
        &["--epochs", "1", "--lr-max", "1e-9", "--lr-min", "0"],
    ]
    .concat();
    let second = tmp.path().join("second");
    let o = train(&data, &second, &[&still[..], &["--init-from", w]].concat());
    assert!(o.status.success(), "{}", show(&o));
    let (a, b) = (metrics(&first), metrics(&second));
    let (ended, started) = (
        a[2]["test_top1"].as_f64().unwrap(),
        b[0]["test_top1"].as_f64().unwrap(),
    );
    assert!((ended - started).abs() < 0.01, "{ended} then {started}");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("config.json")).unwrap())
            .unwrap();
    assert!(
        record["config"]["init_from"]["xxh3"].is_string(),
        "{record}"
    );

    let o = train(
        &data,
        &tmp.path().join("other"),
        &["--arch", "resnet20", "--epochs", "1", "--init-from", w],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("does not fit this model"),
        "{}",
        show(&o)
    );
    let fresh_head = tmp.path().join("fresh-head");
    let o = train(
        &data,
        &fresh_head,
        &[&still[..], &["--init-from", w, "--new-head"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        metrics(&fresh_head)[0]["test_top1"].as_f64().unwrap() < ended - 0.05,
        "a fresh head forgets the classes"
    );
}

#[test]
fn bad_options_and_data_are_refused_with_the_valid_choices() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Every option with a fixed set of values: a usage error (exit 2) that names the option
    // and lists what it accepts, before anything is read or written.
    for (flag, value, expect) in [
        ("--preset", "paper-imagenet-ce", "paper-cub-cosine"),
        ("--arch", "vgg16", "resnet110-wfc"),
        ("--loss", "hinge", "cosine-ce"),
        ("--schedule", "step", "cosine-steps"),
        ("--bn-stats", "batch", "precise"),
        ("--precision", "fp16", "bf16"),
        ("--channels-last", "maybe", "auto"),
        ("--dist", "gloo", "nccl"),
        ("--device", "tpu", "cuda:N"),
        ("--flip", "sometimes", "on or off"),
    ] {
        let o = train(&data, &out, &[flag, value]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", show(&o));
        let err = stderr(&o);
        assert!(
            err.contains(expect) && err.contains(flag),
            "{flag} {value}: {}",
            show(&o)
        );
    }
    // Values no run can have are usage errors too, naming the option.
    for (args, expect) in [
        (&["--lr-max", "0.1", "--lr-min", "0.5"][..], "--lr-min"),
        (&["--epochs", "0"][..], "--epochs 0"),
        (&["--shift", "0.9"][..], "--shift 0.9"),
        (&["--sgdr-base", "0"][..], "--sgdr-base 0"),
        (&["--crop", "100000"][..], "--crop 100000"),
        (
            &["--preset", "paper-cub-ce"][..],
            "is for data packed from source cub, but this data was packed from idx",
        ),
    ] {
        let o = train(&data, &out, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
        assert!(stderr(&o).contains(expect), "{args:?}: {}", show(&o));
    }
    assert!(!out.exists(), "nothing written for refused options");
    // An embedding with the wrong number of rows names both counts.
    let npy = tmp.path().join("e.npy");
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (7, 4), }";
    let padded = format!("{header:<117}\n");
    bytes.extend((padded.len() as u16).to_le_bytes());
    bytes.extend(padded.as_bytes());
    bytes.extend(std::iter::repeat_n(1.0f64.to_le_bytes(), 28).flatten());
    std::fs::write(&npy, bytes).unwrap();
    let o = train(
        &data,
        &out,
        &[
            "--loss",
            "cosine",
            "--embedding",
            npy.to_str().unwrap(),
            "--epochs",
            "1",
            "--threads",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("7 rows, but the data has 10 classes"),
        "{}",
        show(&o)
    );
    // A NaN in the embedding is named at load, with its row and column.
    let nan_npy = tmp.path().join("nan.npy");
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (10, 2), }";
    let padded = format!("{header:<117}\n");
    bytes.extend((padded.len() as u16).to_le_bytes());
    bytes.extend(padded.as_bytes());
    let mut values = [1.0f64; 20];
    values[7] = f64::NAN;
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(&nan_npy, bytes).unwrap();
    let o = train(
        &data,
        &out,
        &[
            "--loss",
            "cosine",
            "--embedding",
            nan_npy.to_str().unwrap(),
            "--epochs",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("row 3, column 1 is NaN"),
        "{}",
        show(&o)
    );

    // A crop larger than the stored images is refused before training, not padded.
    let o = train(&data, &out, &["--crop", "40", "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("--crop 40: train record 0 of") && stderr(&o).contains("28x28"),
        "{}",
        show(&o)
    );

    // A damaged shard directory stops before training.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, broken.join(p.file_name().unwrap())).unwrap();
    }
    let shard = broken.join("train-00000.shard");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let o = train(&broken, &tmp.path().join("r2"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("train-00000.shard: file is"),
        "{}",
        show(&o)
    );
    assert!(
        !tmp.path().join("r2").exists(),
        "nothing written for a refused run"
    );

    // A non-finite loss stops the run, naming epoch and step, and keeps what was written.
    let diverging = [
        "--loss",
        "ce",
        "--lr-max",
        "1e30",
        "--clip-norm",
        "0",
        "--epochs",
        "3",
        "--threads",
        "1",
    ];
    let nan = tmp.path().join("nan");
    let o = train(&data, &nan, &diverging);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("the loss became") && err.contains("epoch") && err.contains("step"),
        "{err}"
    );
    assert!(nan.join("config.json").exists());
    // Read every 4 steps, the same step is named, and when the loss was seen.
    let position = |err: &str| {
        let at = err.find(" at epoch").expect("a position");
        err[at..]
            .split(" (lr")
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let o = train(
        &data,
        &tmp.path().join("nan-every-4"),
        &[&diverging[..], &["--totals-every", "4"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let late = stderr(&o);
    assert_eq!(position(&late), position(&err), "{late}");
}
