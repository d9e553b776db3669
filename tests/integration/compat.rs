//! Run directories written by earlier versions keep working: `tests/fixtures/run-0.1-main` was
//! written by `cosine-train train` at commit 1bc2ab9 (before the run directory became typed
//! records): resnet8, cosine-ce, 6 epochs on Fashion-MNIST with 10 images per class, seed 0.

use std::time::Duration;

use crate::training::{fashion, metrics};
use crate::util::{cosine_train, repo_root, run, show, stdout};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn an_old_run_directory_still_reports_and_evaluates() {
    let old = repo_root().join("tests/fixtures/run-0.1-main");
    let o = run(cosine_train().arg("report").arg(&old), LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    let row = stdout(&o)
        .lines()
        .find(|l| l.starts_with("| run-0.1-main |"))
        .unwrap_or_else(|| panic!("no row: {}", show(&o)))
        .to_string();
    for cell in [
        "| cosine-ce | resnet8 | idx (data) | 1 |",
        "| 41.18% | 6 | 41.18% | 41.18% | 6/6 |",
        "| finished |",
    ] {
        assert!(row.contains(cell), "{cell} not in {row}");
    }
    // The weights evaluate to exactly what the old run measured after its last epoch (the
    // fixture's data path was a temporary directory: the same pack is made here).
    let o = run(
        cosine_train()
            .args(["eval", "--threads", "1", "--run"])
            .arg(&old)
            .arg("--data")
            .arg(fashion(10)),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let last = metrics(&old)
        .into_iter()
        .rev()
        .find(|l| l.get("test_top1").is_some())
        .unwrap();
    assert_eq!(report["test_top1"], last["test_top1"]);
    assert_eq!(report["test_embedding_top1"], last["test_embedding_top1"]);
    assert_eq!(report["test_images"], 10000);
}
