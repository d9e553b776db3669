//! Real data from the machine's packages (installed by `make setup`): Fashion-MNIST through the
//! `idx` source, the foolbox sample photos (real PNG and JPEG files) through `folder`.

use std::io::Read;
use std::path::Path;

use datasets_prep::{ShardDir, Split};

use crate::fixtures::*;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
const PHOTOS: &str = "/opt/cosine-train/data/foolbox";

fn require(path: &str) -> &Path {
    let p = Path::new(path);
    assert!(
        p.is_dir(),
        "{path} is missing: run `make setup` (launch/setup.sh installs it)"
    );
    p
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn fashion_mnist_small_data_selection_is_exact_and_deterministic() {
    let root = require(FASHION_MNIST);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    pack_ok(
        "idx",
        root,
        &a,
        &["--per-class", "10", "--seed", "1", "--threads", "1"],
    );
    pack_ok(
        "idx",
        root,
        &b,
        &["--per-class", "10", "--seed", "1", "--threads", "2"],
    );
    pack_ok("idx", root, &c, &["--per-class", "10", "--seed", "2"]);
    assert_eq!(
        dir_bytes(&a),
        dir_bytes(&b),
        "byte-identical whatever the thread count"
    );
    assert_ne!(
        dir_bytes(&a)[2].1,
        dir_bytes(&c)[2].1,
        "another seed selects other images"
    );

    let shards = ShardDir::open(&a).unwrap();
    let m = shards.manifest();
    assert_eq!(m.train.per_class, vec![10; 10]);
    assert_eq!(m.test.count, 10_000);
    assert_eq!(m.test.per_class, vec![1000; 10]);
    assert!(shards.verify_checksums().is_empty());

    // Test record i is exactly image i of the IDX file, with its label.
    let images = gunzip(&root.join("t10k-images-idx3-ubyte.gz"));
    let labels = gunzip(&root.join("t10k-labels-idx1-ubyte.gz"));
    let test = shards.split(Split::Test);
    for i in [0usize, 1, 4321, 9999] {
        let r = test.record(i).unwrap();
        assert_eq!(
            r.bytes,
            &images[16 + i * 784..16 + (i + 1) * 784],
            "image {i}"
        );
        assert_eq!(r.label, u32::from(labels[8 + i]), "label {i}");
    }
    // Fashion-MNIST's published pixel mean is about 72.9 (0.286 x 255) over the full train set;
    // 100 images land near it.
    assert!(
        (m.train_mean[0] - 72.9).abs() < 10.0,
        "mean {}",
        m.train_mean[0]
    );
}

#[test]
fn real_photos_through_the_folder_source() {
    let photos = require(PHOTOS);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    let mut n = 0;
    for entry in std::fs::read_dir(photos).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // imagenet_07_559.jpg -> class 559 of "imagenet"; cifar10_03_0.png -> class 0.
        let Some(stem) = name
            .strip_suffix(".jpg")
            .or_else(|| name.strip_suffix(".png"))
        else {
            continue;
        };
        let parts: Vec<&str> = stem.split('_').collect();
        if !matches!(parts[0], "imagenet" | "cifar10") {
            continue;
        }
        let index: u32 = parts[1].parse().unwrap();
        let split = if index.is_multiple_of(4) {
            "test"
        } else {
            "train"
        };
        let dest = root.join(split).join(parts[0]).join(&name);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&path, dest).unwrap();
        n += 1;
    }
    assert_eq!(n, 40, "20 ImageNet JPEGs and 20 CIFAR-10 PNGs");
    let out = tmp.path().join("packed");
    pack_ok(
        "folder",
        &root,
        &out,
        &["--short-side", "48", "--encoding", "jpeg"],
    );
    let o = run(datasets_prep().arg("verify").arg(&out));
    assert!(o.status.success(), "{}", show(&o));
    let info = run(datasets_prep().arg("info").arg(&out));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["classes"], 2);
    assert_eq!(info["train"]["count"], 30);
    assert_eq!(info["test"]["count"], 10);
    assert_eq!(info["storage"]["encoding"], "jpeg");
    let shards = ShardDir::open(&out).unwrap();
    for i in 0..30 {
        let r = shards.split(Split::Train).record(i).unwrap();
        assert_eq!(r.height.min(r.width), 48);
        assert_eq!(r.pixels().unwrap().len(), (r.height * r.width * 3) as usize);
    }
}
