//! `cosine-train sweep` through the real binary and a real `mpirun`: cells equal standalone
//! runs bit for bit, on groups of one rank and on one group of two; a killed sweep continues to
//! the uninterrupted result; changed settings are refused; failing cells are recorded while the
//! others finish.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::distributed::{fashion_with_test_images, train_ranks};
use crate::training::{deterministic, metrics};
use crate::util::{cosine_train, cosine_train_path, mpirun, run, show, stderr};

const LIMIT: Duration = Duration::from_secs(400);

/// Options of every cell: a small model, 2 epochs of 8 steps.
const COMMON: [&str; 6] = ["--arch", "tiny-cnn", "--epochs", "2", "--batch-size", "25"];

fn data() -> PathBuf {
    fashion_with_test_images(301)
}

/// `cosine-train sweep` on `np` ranks (0: a plain process) with `env` set.
fn sweep(
    np: usize,
    out: &Path,
    sweep_options: &[&str],
    train: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = if np == 0 {
        cosine_train()
    } else {
        let mut c = mpirun(np);
        for (k, _) in env {
            c.args(["-x", k]);
        }
        c.arg(cosine_train_path());
        c
    };
    cmd.envs(env.iter().copied())
        .arg("sweep")
        .arg("--out")
        .arg(out)
        .args(sweep_options)
        .arg("--")
        .arg("--data")
        .arg(data())
        .args(["--threads", "1", "--workers", "1"])
        .args(train);
    run(&mut cmd, LIMIT)
}

fn record(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("sweep.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn cells(out: &Path) -> Vec<Value> {
    record(out)["cells"].as_array().unwrap().clone()
}

fn states(out: &Path) -> Vec<String> {
    cells(out)
        .iter()
        .map(|c| c["state"].as_str().unwrap().to_string())
        .collect()
}

/// The cell's own options, from sweep.json.
fn cell_args(cell: &Value) -> Vec<String> {
    cell["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Two run directories hold the same weights, byte for byte, and the same metrics but for
/// wall-clock times.
fn assert_same_run(a: &Path, b: &Path) {
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        weights(a) == weights(b),
        "{} and {} hold different weights",
        a.display(),
        b.display()
    );
    assert_eq!(deterministic(&metrics(a)), deterministic(&metrics(b)));
}

#[test]
fn two_groups_train_a_grid_exactly_as_standalone_runs_and_a_rerun_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let axes = [
        "--axis",
        "loss=ce,cosine",
        "--axis",
        "lr-max=0.05,0.1",
        "--ranks-per-run",
        "1",
    ];
    let o = sweep(2, &out, &axes, &COMMON, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(states(&out), ["finished"; 4]);
    let groups: std::collections::BTreeSet<u64> = cells(&out)
        .iter()
        .map(|c| c["group"].as_u64().unwrap())
        .collect();
    assert_eq!(groups.len(), 2, "both groups trained cells: {groups:?}");
    assert_eq!(record(&out)["groups"], 2);

    for cell in cells(&out) {
        let name = cell["name"].as_str().unwrap();
        let alone = tmp.path().join("alone").join(name);
        let own = cell_args(&cell);
        let own: Vec<&str> = own.iter().map(String::as_str).collect();
        let o = train_ranks(0, &data(), &alone, &[&COMMON[..], &own].concat());
        assert!(o.status.success(), "{}", show(&o));
        assert_same_run(&out.join(name), &alone);
    }

    let o = sweep(2, &out, &axes, &COMMON, &[]);
    assert!(o.status.success(), "{}", show(&o));
    let err = stderr(&o);
    assert!(err.contains("0 to train, 4 finished"), "{err}");
    assert!(
        !err.contains("trains"),
        "a finished cell was trained again: {err}"
    );
}

#[test]
fn one_group_of_two_ranks_trains_each_cell_as_a_two_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let train = ["--arch", "resnet8", "--epochs", "1", "--batch-size", "25"];
    let o = sweep(
        2,
        &out,
        &["--axis", "seed=0,1", "--ranks-per-run", "2"],
        &train,
        &[],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(record(&out)["groups"], 1);
    let alone = tmp.path().join("alone");
    let o = train_ranks(2, &data(), &alone, &[&train[..], &["--seed", "1"]].concat());
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out.join("seed-1"), &alone);
}

#[test]
fn a_killed_sweep_continues_to_the_uninterrupted_result_and_refuses_changed_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let train = [
        "--arch",
        "resnet8",
        "--epochs",
        "2",
        "--batch-size",
        "25",
        "--checkpoint-every",
        "5",
    ];
    let axes = ["--axis", "loss=ce,cosine-ce"];
    let whole = tmp.path().join("whole");
    let o = sweep(0, &whole, &axes, &train, &[]);
    assert!(o.status.success(), "{}", show(&o));

    let killed = tmp.path().join("killed");
    let o = sweep(
        0,
        &killed,
        &axes,
        &train,
        &[("COSINE_FAULT", "rank=0,step=6,kind=kill")],
    );
    assert!(!o.status.success(), "{}", show(&o));
    assert_eq!(states(&killed), ["running", "pending"]);
    let o = sweep(0, &killed, &axes, &train, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("(Resume)"), "{}", show(&o));
    assert_eq!(states(&killed), ["finished", "finished"]);
    for cell in ["loss-ce", "loss-cosine-ce"] {
        assert_same_run(&whole.join(cell), &killed.join(cell));
    }

    let mut changed = train.to_vec();
    changed[3] = "3";
    let o = sweep(0, &killed, &axes, &changed, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("2 cell(s)") && err.contains("loss-ce (epochs: 2 -> 3"),
        "{err}"
    );
    assert_eq!(
        states(&killed),
        ["finished", "finished"],
        "the record is kept"
    );
}

#[test]
fn failing_cells_are_recorded_while_the_others_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let axes = [
        "--axis",
        "val-per-class=2,20",
        "--axis",
        "lr-max=0.05,1e30",
        "--ranks-per-run",
        "1",
    ];
    // Cross-entropy overflows at lr 1e30 (the cosine loss is bounded and would not).
    let train = [&COMMON[..], &["--loss", "ce"]].concat();
    let o = sweep(2, &out, &axes, &train, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let cells = cells(&out);
    let by_name = |n: &str| cells.iter().find(|c| c["name"] == n).unwrap().clone();
    assert_eq!(by_name("val-per-class-2_lr-max-0.05")["state"], "finished");
    let diverged = by_name("val-per-class-2_lr-max-1e30");
    assert_eq!(diverged["state"], "failed");
    assert!(
        diverged["error"]
            .as_str()
            .unwrap()
            .contains("the loss became"),
        "{diverged}"
    );
    // All 20 images of each class held out: none left to train on.
    for name in [
        "val-per-class-20_lr-max-0.05",
        "val-per-class-20_lr-max-1e30",
    ] {
        let cell = by_name(name);
        assert_eq!(cell["state"], "failed");
        assert!(
            cell["error"]
                .as_str()
                .unwrap()
                .contains("--val-per-class 20"),
            "{cell}"
        );
    }
    let o = sweep(2, &out, &axes, &train, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("0 to train, 1 finished, 3 failed"),
        "{}",
        show(&o)
    );
}

/// The last line of a run's metrics: its summary.
fn summary(run: &Path) -> Value {
    metrics(run).pop().unwrap()
}

#[test]
fn the_sweep_report_chooses_rates_on_validation_and_gives_intervals_over_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let axes = [
        "--axis",
        "per-class=5,10",
        "--axis",
        "lr-max=0.05,0.1",
        "--axis",
        "seed=0,1",
    ];
    let train = [&COMMON[..], &["--val-per-class", "2"]].concat();
    let o = sweep(0, &out, &axes, &train, &[]);
    assert!(o.status.success(), "{}", show(&o));

    let (csv, png) = (tmp.path().join("r.csv"), tmp.path().join("r.png"));
    let o = run(
        cosine_train()
            .arg("report")
            .arg(&out)
            .arg("--csv")
            .arg(&csv)
            .arg("--plot")
            .arg(&png),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let table = crate::util::stdout(&o);
    assert!(
        table.contains("| loss | idx per-class=5 | idx per-class=10 |"),
        "{table}"
    );
    assert!(table.contains("on the validation split"), "{table}");

    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 8);
    for k in ["5", "10"] {
        // By hand: per rate, the seeds' test and validation top-1 from the runs' summaries.
        let mut best: Option<(f64, &str)> = None;
        for rate in ["0.05", "0.1"] {
            let (tests, vals): (Vec<f64>, Vec<f64>) = ["0", "1"]
                .iter()
                .map(|seed| {
                    let s = summary(&out.join(format!("per-class-{k}_lr-max-{rate}_seed-{seed}")));
                    (
                        100.0 * s["best_top1"].as_f64().unwrap(),
                        100.0 * s["best_val_top1"].as_f64().unwrap(),
                    )
                })
                .unzip();
            let mean = (tests[0] + tests[1]) / 2.0;
            let sd = ((tests[0] - mean).powi(2) + (tests[1] - mean).powi(2)).sqrt();
            let half = 12.706 * sd / 2f64.sqrt();
            let row = rows
                .iter()
                .find(|r| r[0] == format!("per-class-{k}_lr-max-{rate}_seed-0"))
                .unwrap();
            let number = |i: usize| row[i].parse::<f64>().unwrap();
            assert!((number(10) - mean).abs() < 1e-3, "{row:?}: mean {mean}");
            assert!(
                (number(11) - half).abs() < 1e-3,
                "{row:?}: half-width {half}"
            );
            let val = (vals[0] + vals[1]) / 2.0;
            if best.is_none_or(|(b, _)| val > b) {
                best = Some((val, rate));
            }
        }
        let chosen = best.unwrap().1;
        for row in rows
            .iter()
            .filter(|r| r[0].starts_with(&format!("per-class-{k}_")))
        {
            assert_eq!(row[8], chosen, "{row:?}");
            assert_eq!(row[9], "val");
        }
    }
    for plot in [png, tmp.path().join("r-per-class.png")] {
        let bytes = std::fs::read(&plot).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{}",
            plot.display()
        );
    }
}

/// SIGUSR1 to `mpirun` (what sbatch.sh sends the ranks before a time limit) reaches every rank: each
/// group checkpoints its cell and the job exits 75; the same command finishes the grid, and a
/// resumed cell ends bit-identical to the same run trained alone.
#[test]
fn a_preempted_sweep_exits_75_and_the_same_command_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let train = [
        "--arch",
        "resnet8",
        "--epochs",
        "3",
        "--batch-size",
        "25",
        "--checkpoint-every",
        "5",
    ];
    let axes = ["--axis", "loss=ce,cosine", "--ranks-per-run", "1"];
    let mut cmd = mpirun(2);
    cmd.arg(cosine_train_path())
        .arg("sweep")
        .arg("--out")
        .arg(&out)
        .args(axes)
        .arg("--")
        .arg("--data")
        .arg(data())
        .args(["--threads", "1", "--workers", "1"])
        .args(train)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let start = std::time::Instant::now();
    let checkpointed = |cell: &str| {
        out.join(cell)
            .join("checkpoints/step-000000000005")
            .exists()
    };
    while !(checkpointed("loss-ce") && checkpointed("loss-cosine")) {
        assert!(start.elapsed() < LIMIT, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    let now = states(&out);
    assert!(!now.iter().any(|s| s == "running"), "{now:?}");

    let o = sweep(2, &out, &axes, &train, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(states(&out), ["finished", "finished"]);
    let resumed: Vec<&str> = ["loss-ce", "loss-cosine"]
        .into_iter()
        .filter(|c| stderr(&o).contains(&format!("{c} (Resume)")))
        .collect();
    assert!(!resumed.is_empty(), "{}", show(&o));
    let alone = tmp.path().join("alone");
    let loss = resumed[0].trim_start_matches("loss-");
    let o = train_ranks(
        0,
        &data(),
        &alone,
        &[&train[..], &["--loss", loss]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&out.join(resumed[0]), &alone);
}

/// A copy of the test data whose manifest says it was packed from `source` (what
/// `--grid paper-table2` looks for; no cell of it is trained).
fn relabelled_copy(to: &Path, source: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(data()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    let manifest = to.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let relabelled = text.replacen(
        "\"source\": \"idx\"",
        &format!("\"source\": \"{source}\""),
        1,
    );
    assert_ne!(text, relabelled, "the manifest names its source");
    std::fs::write(&manifest, relabelled).unwrap();
}

/// `--dry-run` through the real binary: lines of `name \t what \t options`.
fn dry_run(out: &Path, sweep_options: &[&str]) -> (Output, Vec<Vec<String>>) {
    let o = run(
        cosine_train()
            .arg("sweep")
            .arg("--out")
            .arg(out)
            .args(sweep_options)
            .arg("--dry-run"),
        LIMIT,
    );
    let lines = crate::util::stdout(&o)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    (o, lines)
}

#[test]
fn paper_table2_expands_over_the_datasets_found_and_grid_files_link_options() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    relabelled_copy(&root.join("c100"), "cifar100");
    relabelled_copy(&root.join("flw"), "flowers");
    std::os::unix::fs::symlink(data(), root.join("fashion")).unwrap();
    std::fs::create_dir_all(root.join("notes")).unwrap();
    let out = tmp.path().join("table2");
    let grid = ["--grid", "paper-table2", "--data-root"];
    let (o, lines) = dry_run(&out, &[&grid[..], &[root.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", show(&o));
    // Flowers before CIFAR-100 (the paper's order), 4 presets each, 8 rates each.
    assert_eq!(lines.len(), 2 * 4 * 8, "{}", show(&o));
    assert_eq!(lines[0][0], "data-flw_preset-paper-flowers-ce_lr-max-2.5");
    assert_eq!(lines[0][1], "train");
    assert_eq!(
        lines[63][0],
        "data-c100_preset-paper-cifar100-cosine-ce_lr-max-0.001"
    );
    let c100 = std::fs::canonicalize(root.join("c100")).unwrap();
    assert!(
        lines[63][2].starts_with(&format!("--data {}", root.join("c100").display()))
            || lines[63][2].starts_with(&format!("--data {}", c100.display())),
        "{:?}",
        lines[63]
    );
    let err = stderr(&o);
    assert!(
        err.contains("not in") && err.contains("cub, nab, cars, mit67"),
        "{err}"
    );
    assert!(!out.exists(), "a dry run writes nothing");

    // Without --data-root, or with none of the paper's datasets there: usage errors.
    let (o, _) = dry_run(&out, &grid[..2]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stderr(&o).contains("needs --data-root"), "{}", show(&o));
    let (o, _) = dry_run(
        &out,
        &[&grid[..], &[tmp.path().join("none").to_str().unwrap()]].concat(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));

    // The grid file shipped in docs/ expands (3 datasets x 4 losses x 8 rates x 3 seeds).
    let example = crate::util::repo_root().join("docs/sweep-grid.toml");
    let (o, lines) = dry_run(&out, &["--grid", example.to_str().unwrap()]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(lines.len(), 288);
    assert_eq!(
        lines[0][0],
        "data-cub_preset-paper-cub-ce_loss-ce_lr-max-2.5_seed-0"
    );

    // A grid file whose linked options train: value i of each axis key with value i of the
    // others, each cell exactly the standalone run.
    let file = tmp.path().join("grid.toml");
    std::fs::write(
        &file,
        format!(
            "[train]\ndata = \"{}\"\narch = \"tiny-cnn\"\nepochs = 2\nbatch-size = 25\n\
             threads = 1\nworkers = 1\n\n[[axis]]\nseed = [0, 1]\nlr-max = [0.1, 0.05]\n",
            data().display()
        ),
    )
    .unwrap();
    let grid_out = tmp.path().join("linked");
    let o = run(
        cosine_train()
            .arg("sweep")
            .arg("--out")
            .arg(&grid_out)
            .arg("--grid")
            .arg(&file),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(states(&grid_out), ["finished"; 2]);
    let alone = tmp.path().join("alone");
    let o = train_ranks(
        0,
        &data(),
        &alone,
        &[&COMMON[..], &["--seed", "1", "--lr-max", "0.05"]].concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_same_run(&grid_out.join("seed-1_lr-max-0.05"), &alone);
}
