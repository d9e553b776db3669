//! The trainer as a library: what `cosine-train train` does, called in-process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cosine_train::config::{BnStats, Overrides, RunConfig};
use cosine_train::dist::single::SingleProcess;
use cosine_train::dist::watchdog::Watched;
use cosine_train::objective::LossKind;
use cosine_train::train::{RunOptions, Trainer};
use datasets_prep::sources::Source;

use crate::training::{deterministic, fashion, metrics};
use crate::util::{cosine_train, run, show, stdout};

const LIMIT: Duration = Duration::from_secs(600);
const IN_PROCESS: &str = "COSINE_TEST_IN_PROCESS";
const MATCHED: &str = "in-process trainers matched their processes";

/// The runs of the test: resnet8 (BatchNorm), 3 epochs of batch 25 on 100 images, one thread.
fn recipe(loss: &str, lr: &str) -> Vec<String> {
    [
        "--arch",
        "resnet8",
        "--loss",
        loss,
        "--lr-max",
        lr,
        "--epochs",
        "3",
        "--sgdr-base",
        "3",
        "--batch-size",
        "25",
        "--bn-stats",
        "precise",
        "--threads",
        "1",
        "--workers",
        "1",
        "--dist",
        "single",
    ]
    .map(String::from)
    .to_vec()
}

/// Two trainers, one after the other in one process and each with its own communicator, give
/// exactly (metrics and weights, bit for bit) what two `cosine-train train` processes give.
///
/// libtorch's random generator is one per process and other tests draw from it in parallel
/// threads, so the in-process half runs in a fresh process of this test binary that runs only
/// this test.
#[test]
fn two_trainers_in_one_process_match_two_processes() {
    if std::env::var_os(IN_PROCESS).is_none() {
        let exe = std::env::current_exe().expect("the test binary's path");
        let o = run(
            Command::new(exe)
                .args([
                    "--exact",
                    "library::two_trainers_in_one_process_match_two_processes",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(IN_PROCESS, "1"),
            LIMIT,
        );
        assert!(o.status.success(), "{}", show(&o));
        assert!(
            stdout(&o).contains(MATCHED),
            "the inner test did not run: {}",
            show(&o)
        );
        return;
    }
    tch::set_num_threads(1);
    let data = fashion(10);
    let tmp = tempfile::tempdir().unwrap();
    for (loss, lr) in [("ce", "0.1"), ("cosine-ce", "0.3")] {
        let process = tmp.path().join(format!("process-{loss}"));
        let o = run(
            cosine_train()
                .arg("train")
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&process)
                .args(recipe(loss, lr)),
            LIMIT,
        );
        assert!(o.status.success(), "{}", show(&o));
        let library = tmp.path().join(format!("library-{loss}"));
        let given = Overrides {
            arch: Some("resnet8".parse().unwrap()),
            loss: Some(loss.parse::<LossKind>().unwrap()),
            lr_max: Some(lr.parse().unwrap()),
            epochs: Some(3),
            sgdr_base: Some(3),
            batch_size: Some(25),
            bn_stats: Some(BnStats::Precise),
            ..Default::default()
        };
        let config = RunConfig::resolve(&data, &given, Some(&Source::Idx)).unwrap();
        let opts = RunOptions {
            out: library.clone(),
            device: tch::Device::Cpu,
            workers: 1,
            force: false,
            bucket_mb: 64,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            totals_every: 1,
            resume: None,
            channels_last: false,
        };
        let comm = Watched::new(Box::new(SingleProcess), Duration::from_secs(60));
        let summary = Trainer::new(config, opts, &comm)
            .and_then(Trainer::fit)
            .unwrap();
        assert_same_run(&process, &library);
        let last = metrics(&library).last().unwrap()["last_top1"].as_f64();
        assert_eq!(last, Some(summary.last_top1));
    }
    println!("{MATCHED}");
}

fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(deterministic(&metrics(a)), deterministic(&metrics(b)));
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(a) == weights(b), "weights differ");
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(a)["config"], config(b)["config"]);
}
