//! `cosine-train predict` on image files: the same preprocessing as evaluation (the pack's
//! resize, the centre crop, the normalisation), so that its top-1 over the test images of a
//! folder dataset is exactly what `eval` counts; eval's per-class table and confusion matrix;
//! self-describing weights.

use std::path::Path;
use std::time::Duration;

use datasets_prep::pack::{PackOptions, pack};
use datasets_prep::sources::Source;
use datasets_prep::{ShardDir, Split};
use serde_json::Value;

use crate::training::fashion;
use crate::util::{cosine_train, run, show};

const LIMIT: Duration = Duration::from_secs(300);

/// Writes `count` records of `split` of `shards` as grey PNGs under `dir/<class id>/`.
fn write_pngs(shards: &ShardDir, split: Split, count: usize, dir: &Path) {
    let reader = shards.split(split);
    let classes = &shards.manifest().classes;
    for i in 0..count.min(reader.len()) {
        let r = reader.record(i).unwrap();
        let class_dir = dir.join(&classes[r.label as usize].id);
        std::fs::create_dir_all(&class_dir).unwrap();
        let file = std::fs::File::create(class_dir.join(format!("{i:05}.png"))).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), r.width, r.height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&r.pixels().unwrap()).unwrap();
    }
}

#[test]
fn predict_agrees_with_eval_on_every_test_image_and_weights_describe_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = ShardDir::open(&fashion(10)).unwrap();
    let images = tmp.path().join("images");
    write_pngs(&idx, Split::Train, 100, &images.join("train"));
    write_pngs(&idx, Split::Test, 300, &images.join("test"));
    // Resized 28 -> 36 at pack time, centre-cropped to 32 at evaluation.
    let data = tmp.path().join("data");
    let mut opts = PackOptions::new(Source::Folder, images.clone(), data.clone());
    opts.short_side = Some(Some(36));
    pack(&opts).unwrap();
    let out = tmp.path().join("run");
    let o = run(
        cosine_train()
            .arg("train")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--arch", "resnet8", "--loss", "ce", "--epochs", "3"])
            .args(["--crop", "32", "--threads", "2", "--batch-size", "25"]),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));

    let (per_class, confusion) = (tmp.path().join("pc.csv"), tmp.path().join("cm.csv"));
    let o = run(
        cosine_train()
            .args(["eval", "--threads", "2", "--run"])
            .arg(&out)
            .arg("--per-class")
            .arg(&per_class)
            .arg("--confusion")
            .arg(&confusion),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let eval: Value = serde_json::from_slice(&o.stdout).unwrap();
    // Per-class rows and the confusion matrix add up to the totals; top-5 >= top-1.
    let rows: Vec<Vec<String>> = std::fs::read_to_string(&per_class)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    assert_eq!(rows.len(), 10);
    let cells: Vec<Vec<u64>> = std::fs::read_to_string(&confusion)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').skip(1).map(|c| c.parse().unwrap()).collect())
        .collect();
    let mut diagonal = 0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(cells[i].iter().sum::<u64>(), row[2].parse::<u64>().unwrap());
        assert_eq!(cells[i][i], row[3].parse::<u64>().unwrap());
        diagonal += cells[i][i];
    }
    assert_eq!(diagonal, eval["correct"].as_u64().unwrap());
    assert!(eval["test_top5"].as_f64().unwrap() >= eval["test_top1"].as_f64().unwrap());
    let o = run(
        cosine_train()
            .args([
                "predict",
                "--format",
                "json",
                "--top-k",
                "3",
                "--threads",
                "2",
            ])
            .arg("--run")
            .arg(&out)
            .arg(images.join("test")),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 300);
    let correct = lines
        .iter()
        .filter(|p| {
            let truth = Path::new(p["image"].as_str().unwrap())
                .parent()
                .and_then(|d| d.file_name())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert_eq!(p["top"].as_array().unwrap().len(), 3);
            p["top"][0]["id"] == truth.as_str()
        })
        .count();
    assert_eq!(
        correct as u64,
        eval["correct"].as_u64().unwrap(),
        "predict and eval disagree"
    );
    let sum: f64 = lines[0]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .sum();
    assert!(sum > 0.0 && sum <= 1.0 + 1e-6, "softmax scores: {sum}");

    // The final weights carry what is needed to use them without the run directory.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &header["__metadata__"];
    assert_eq!(meta["format"], "cosine-train-weights/1");
    assert_eq!(meta["arch"], "resnet8");
    assert_eq!(meta["loss"], "ce");
    assert_eq!(meta["crop"], "32");
    assert_eq!(meta["short_side"], "36");
    let classes: Value = serde_json::from_str(meta["classes"].as_str().unwrap()).unwrap();
    assert_eq!(classes.as_array().unwrap().len(), 10);
}
