//! The demo script (reduced) and `cosine-train report` on complete, unfinished and broken runs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::training::fashion;
use crate::util::{cosine_train, cosine_train_path, repo_root, run, show, stdout};

/// Decodes a PNG fully and returns its size and how many distinct colours it uses.
fn png_info(path: &Path) -> (u32, u32, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()]
        .chunks(px)
        .take(2_000_000)
        .collect();
    (info.width, info.height, colours.len())
}

/// The demo, reduced to 2 epochs on 10 images per class, on 2 real MPI ranks: four runs, the
/// table and a real 1200x900 PNG with lines in several colours.
#[test]
fn demo_script_trains_four_objectives_on_two_ranks_and_reports() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let bin_dir = cosine_train_path().parent().unwrap().to_path_buf();
    let o = run(
        Command::new("bash")
            .arg(repo_root().join("launch/demo.sh"))
            .env("K", "10")
            .env("EPOCHS", "2")
            .env("EVAL_EVERY", "1")
            .env("RANKS", "2")
            .env("DATA", &data)
            .env("OUT", &out)
            .env("COSINE_BIN_DIR", &bin_dir)
            .env("COSINE_MPIRUN_ARGS", "--oversubscribe")
            .env("OMPI_MCA_mpi_yield_when_idle", "1"),
        Duration::from_secs(600),
    );
    assert!(o.status.success(), "{}", show(&o));
    let table = stdout(&o);
    for loss in ["ce", "ce-ls", "cosine", "cosine-ce"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| {loss} |")))
            .unwrap_or_else(|| panic!("no row for {loss}: {table}"));
        assert!(
            row.contains("| resnet8 |") && row.contains("| 2 |") && row.contains("| 2/2 |"),
            "{row}"
        );
        assert!(row.ends_with("| finished |"), "{row}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("report.md"))
            .unwrap()
            .lines()
            .count(),
        6
    );
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(
        csv.starts_with("run,objective,arch,data,ranks,best top-1 (%)"),
        "{csv}"
    );
    let (w, h, colours) = png_info(&out.join("report.png"));
    assert_eq!((w, h), (1200, 900));
    assert!(colours > 10, "an empty-looking plot: {colours} colours");
}

/// `report` on a finished run, a run that stopped after one epoch with a torn last line, a
/// directory without metrics and a path that does not exist: exit 0, one row each saying what
/// is wrong, and a plot of what there is.
#[test]
fn report_degrades_gracefully_on_missing_and_crashed_runs() {
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    let done = tmp.path().join("done");
    let o = run(
        cosine_train()
            .args(["train", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&done)
            .args([
                "--arch",
                "tiny-cnn",
                "--loss",
                "ce",
                "--epochs",
                "3",
                "--threads",
                "1",
            ]),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", show(&o));
    let crashed = tmp.path().join("crashed");
    std::fs::create_dir_all(&crashed).unwrap();
    std::fs::copy(done.join("config.json"), crashed.join("config.json")).unwrap();
    let first = std::fs::read_to_string(done.join("metrics.jsonl")).unwrap();
    let first = first.lines().next().unwrap();
    std::fs::write(
        crashed.join("metrics.jsonl"),
        format!("{first}\n{{\"epoch\":2,\"lr\""),
    )
    .unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let plot = tmp.path().join("plot.png");
    let csv = tmp.path().join("table.csv");
    let o = run(
        cosine_train()
            .arg("report")
            .args([&done, &crashed, &empty, &tmp.path().join("missing")])
            .arg("--plot")
            .arg(&plot)
            .arg("--csv")
            .arg(&csv),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", show(&o));
    let table = stdout(&o);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row {name}: {table}"))
            .to_string()
    };
    assert!(row("done").ends_with("| finished |"), "{table}");
    let c = row("crashed");
    assert!(
        c.contains("stopped at epoch 1/3") && c.contains("line 2: not JSON"),
        "{c}"
    );
    assert!(c.contains("| 1/3 |"), "{c}");
    assert!(
        row("empty").contains("metrics.jsonl: No such file"),
        "{table}"
    );
    assert!(
        row("missing").contains("config.json: No such file"),
        "{table}"
    );
    let (w, h, _) = png_info(&plot);
    assert_eq!((w, h), (1200, 900));
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 5);
}
