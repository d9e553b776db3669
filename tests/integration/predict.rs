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

use crate::distributed::train_ranks;
use crate::training::fashion;
use crate::util::{cosine_train, run, show, skip};

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

/// A Python with torch, safetensors and numpy (`COSINE_TORCH_PYTHON`, else `python3`).
fn python_with_torch() -> Option<String> {
    let python = std::env::var("COSINE_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import torch, safetensors, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// `python/cosine_train_torch.py` rebuilds every kind of network we train (CIFAR ResNet with
/// both paddings, ResNet-50 v1, tiny-cnn; ce, ce-ls, cosine, cosine-ce heads), loads its
/// `model.safetensors` strictly from the file alone, and gives the scores `cosine-train
/// predict` prints for the same images, within 1e-4 (float32, different convolution code).
#[test]
fn the_pytorch_module_loads_our_weights_and_gives_our_scores() {
    let Some(python) = python_with_torch() else {
        skip(
            "predict::the_pytorch_module_loads_our_weights_and_gives_our_scores",
            "no Python with torch, safetensors and numpy (set COSINE_TORCH_PYTHON)",
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion(10);
    let shards = ShardDir::open(&data).unwrap();
    let images = tmp.path().join("images");
    write_pngs(&shards, Split::Test, 12, &images);
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for class in std::fs::read_dir(&images).unwrap() {
        for f in std::fs::read_dir(class.unwrap().path()).unwrap() {
            files.push(f.unwrap().path());
        }
    }
    files.sort();
    // The same pixels, raw (N, 28, 28, 1), for Python (which then needs no image decoder).
    let mut raw = Vec::new();
    for f in &files {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(f).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        raw.extend_from_slice(&buf[..info.buffer_size()]);
    }
    let raw_path = tmp.path().join("pixels.u8");
    std::fs::write(&raw_path, &raw).unwrap();

    let cases: [(&str, &str, &[&str]); 4] = [
        ("resnet8", "ce", &[]),
        ("resnet8", "cosine-ce", &["--conv-padding", "symmetric"]),
        ("tiny-cnn", "cosine", &[]),
        ("resnet50", "ce-ls", &["--crop", "24"]),
    ];
    for (arch, loss, extra) in cases {
        let out = tmp.path().join(format!("{arch}-{loss}"));
        let own = [
            &["--arch", arch, "--loss", loss, "--epochs", "1"][..],
            extra,
        ]
        .concat();
        let o = train_ranks(
            0,
            &data,
            &out,
            &[&own[..], &["--batch-size", "25"]].concat(),
        );
        assert!(o.status.success(), "{}", show(&o));
        let o = run(
            cosine_train()
                .arg("predict")
                .arg("--run")
                .arg(&out)
                .args(["--format", "json", "--top-k", "10"])
                .args(&files),
            LIMIT,
        );
        assert!(o.status.success(), "{}", show(&o));
        let ours: Vec<Value> = crate::util::stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(ours.len(), files.len());

        let script = format!(
            "import sys, json, numpy as np, torch\n\
             torch.set_num_threads(2)\n\
             sys.path.insert(0, {python_dir:?})\n\
             from cosine_train_torch import load\n\
             model, meta = load({weights:?})\n\
             x = np.fromfile({raw:?}, np.uint8).reshape({n}, 28, 28, 1)\n\
             with torch.no_grad():\n    s = model(model.preprocess(x))\n\
             print(json.dumps({{'ids': [c['id'] for c in meta['classes']], 'scores': s.tolist()}}))\n",
            python_dir = crate::util::repo_root()
                .join("python")
                .display()
                .to_string(),
            weights = out.join("model.safetensors").display().to_string(),
            raw = raw_path.display().to_string(),
            n = files.len(),
        );
        let o = std::process::Command::new(&python)
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{arch} {loss}: {}", show(&o));
        let theirs: Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: Vec<&str> = theirs["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let mut worst = 0f64;
        for (i, (prediction, file)) in ours.iter().zip(&files).enumerate() {
            assert_eq!(prediction["image"], file.display().to_string());
            let top = prediction["top"].as_array().unwrap();
            assert_eq!(top.len(), ids.len());
            for entry in top {
                let c = ids.iter().position(|id| *id == entry["id"]).unwrap();
                let theirs = theirs["scores"][i][c].as_f64().unwrap();
                worst = worst.max((entry["score"].as_f64().unwrap() - theirs).abs());
            }
        }
        eprintln!("{arch} {loss}: largest score difference {worst:.2e}");
        assert!(worst < 1e-4, "{arch} {loss}: scores differ by {worst}");
    }
}
