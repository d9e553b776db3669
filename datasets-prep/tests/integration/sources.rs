//! Every source, from fixtures in its exact on-disk layout, through the real binary; the packed
//! records are read back with the library's reader and compared with what was written.

use std::path::Path;

use datasets_prep::{Encoding, ShardDir, Split};

use crate::fixtures::*;

/// CUB layout: 3 classes (ids 1, 2, 10 to check numeric order), 4 images each, the first 3 of
/// each class for training; image sizes vary.
fn make_cub(root: &Path, split_file: &str, string_ids: bool) {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut split = Vec::new();
    let mut n = 0;
    for class in [10, 2, 1] {
        for k in 0..4 {
            n += 1;
            let id = if string_ids {
                format!("0a{n:02}f-uuid")
            } else {
                n.to_string()
            };
            let rel = format!("{class:03}.cls/img_{n}.jpg");
            write_jpeg(&root.join("images").join(&rel), n, 20 + k, 30, 3);
            images.push(format!("{id} {rel}"));
            labels.push(format!("{id} {class}"));
            split.push(format!("{id} {}", if k < 3 { 1 } else { 0 }));
        }
    }
    write_text(&root.join("images.txt"), &images);
    write_text(&root.join("image_class_labels.txt"), &labels);
    write_text(&root.join(split_file), &split);
    write_text(
        &root.join("classes.txt"),
        &["1 001.One".into(), "2 002.Two".into(), "10 010.Ten".into()],
    );
}

#[test]
fn cub_split_class_order_and_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("CUB_200_2011");
    make_cub(&root, "train_test_split.txt", false);
    let out = tmp.path().join("cub");
    pack_ok("cub", &root, &out, &["--short-side", "16"]);
    let m = manifest(&out);
    let ids: Vec<&str> = m["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1", "2", "10"], "classes sorted by numeric id");
    assert_eq!(m["classes"][2]["name"], "010.Ten");
    assert_eq!(m["train"]["per_class"], serde_json::json!([3, 3, 3]));
    assert_eq!(m["test"]["per_class"], serde_json::json!([1, 1, 1]));
    assert_eq!(m["resize"]["short_side"], 16);
    assert_eq!(m["channels"], 3);

    let shards = ShardDir::open(&out).unwrap();
    let train = shards.split(Split::Train);
    // images.txt order: class 10 first (label 2), then 2 (label 1), then 1 (label 0).
    assert_eq!(train.labels(), [2, 2, 2, 1, 1, 1, 0, 0, 0]);
    // 20x30 -> short side 16 -> 16x24; 21x30 -> 16x22.857 -> 16x23; 22x30 -> 16x21.8 -> 16x22.
    let sizes: Vec<(u32, u32)> = (0..3)
        .map(|i| train.record(i).map(|r| (r.height, r.width)).unwrap())
        .collect();
    assert_eq!(sizes, [(16, 24), (16, 23), (16, 22)]);
    let r = train.record(0).unwrap();
    assert_eq!(r.bytes.len(), 16 * 24 * 3);
    assert!(shards.verify_checksums().is_empty());
}

#[test]
fn cub_sub_reads_its_own_split_file_and_nab_takes_string_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cub");
    make_cub(&root, "train_test_split_5.txt", false);
    let out = tmp.path().join("sub5");
    pack_ok("cub-sub:5", &root, &out, &["--short-side", "0"]);
    let m = manifest(&out);
    assert_eq!(m["source"], "cub-sub:5");
    assert_eq!(m["train"]["count"], 9);
    assert_eq!(m["resize"]["short_side"], serde_json::Value::Null);
    // Without the split file the plain cub source names the missing file and the layout.
    let o = pack("cub", &root, &tmp.path().join("x"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("train_test_split.txt: missing"),
        "{}",
        show(&o)
    );
    assert!(
        stderr(&o).contains("image_class_labels.txt"),
        "{}",
        show(&o)
    );

    let nab_root = tmp.path().join("nabirds");
    make_cub(&nab_root, "train_test_split.txt", true);
    let nab = tmp.path().join("nab");
    pack_ok("nab", &nab_root, &nab, &["--short-side", "8"]);
    assert_eq!(manifest(&nab)["test"]["count"], 3);
}

#[test]
fn cars_from_cars_annos_mat() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cars");
    let mut annos = Vec::new();
    for i in 0..6u32 {
        let rel = format!("car_ims/{:06}.jpg", i + 1);
        write_jpeg(&root.join(&rel), i, 12, 18, 3);
        let class = [3u8, 1, 2, 1, 2, 3][i as usize];
        annos.push(vec![
            Mat::Double(vec![0.0]), // bbox_x1: ignored
            Mat::Char(rel),
            Mat::U8(vec![class]),
            Mat::U8(vec![u8::from(i >= 4)]),
        ]);
    }
    let names = Mat::Cell(vec![
        Mat::Char("AM General".into()),
        Mat::Char("Acura".into()),
        Mat::Char("Audi".into()),
    ]);
    write_mat(
        &root.join("cars_annos.mat"),
        &[
            (
                "annotations",
                Mat::Struct(vec!["bbox_x1", "relative_im_path", "class", "test"], annos),
            ),
            ("class_names", names),
        ],
        true,
    );
    let out = tmp.path().join("packed");
    pack_ok(
        "cars",
        &root,
        &out,
        &["--short-side", "6", "--encoding", "jpeg", "--quality", "95"],
    );
    let m = manifest(&out);
    assert_eq!(m["classes"][1]["name"], "Acura");
    assert_eq!(m["train"]["per_class"], serde_json::json!([2, 1, 1]));
    assert_eq!(m["test"]["per_class"], serde_json::json!([0, 1, 1]));
    let shards = ShardDir::open(&out).unwrap();
    let r = shards.split(Split::Test).record(0).unwrap();
    assert_eq!(r.encoding, Encoding::Jpeg);
    assert_eq!((r.height, r.width, r.channels), (6, 9, 3));
    assert_eq!(r.pixels().unwrap().len(), 6 * 9 * 3);
}

#[test]
fn flowers_train_is_trnid_plus_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("flowers");
    for id in 1..=8u32 {
        write_jpeg(&root.join(format!("jpg/image_{id:05}.jpg")), id, 10, 10, 3);
    }
    let labels = Mat::Double(vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 2.0]);
    write_mat(&root.join("imagelabels.mat"), &[("labels", labels)], false);
    write_mat(
        &root.join("setid.mat"),
        &[
            ("trnid", Mat::Double(vec![1.0, 3.0, 5.0])),
            ("valid", Mat::Double(vec![2.0, 4.0, 6.0])),
            ("tstid", Mat::Double(vec![7.0, 8.0])),
        ],
        true,
    );
    let out = tmp.path().join("packed");
    pack_ok("flowers", &root, &out, &["--short-side", "0"]);
    let m = manifest(&out);
    assert_eq!(m["train"]["per_class"], serde_json::json!([2, 2, 2]));
    assert_eq!(m["test"]["per_class"], serde_json::json!([1, 1, 0]));

    // An id beyond the labels is refused with both files named.
    write_mat(
        &root.join("setid.mat"),
        &[
            ("trnid", Mat::Double(vec![9.0])),
            ("valid", Mat::Double(vec![])),
            ("tstid", Mat::Double(vec![7.0])),
        ],
        false,
    );
    let o = pack("flowers", &root, &tmp.path().join("x"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("setid.mat") && stderr(&o).contains("imagelabels.mat"),
        "{}",
        show(&o)
    );
}

#[test]
fn mit67_lists_and_folder_trees() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mit67");
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (c, class) in ["kitchen", "bar", "airport_inside"].iter().enumerate() {
        for k in 0..3u32 {
            let rel = format!("{class}/p{k}.jpg");
            write_jpeg(
                &root.join("Images").join(&rel),
                c as u32 * 3 + k,
                8,
                12,
                if k == 1 { 1 } else { 3 },
            );
            if k < 2 {
                train.push(rel)
            } else {
                test.push(rel)
            }
        }
    }
    write_text(&root.join("TrainImages.txt"), &train);
    write_text(&root.join("TestImages.txt"), &test);
    let out = tmp.path().join("packed");
    pack_ok("mit67", &root, &out, &[]);
    let m = manifest(&out);
    assert_eq!(m["resize"]["short_side"], 256, "MIT-67 default");
    let names: Vec<&str> = m["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["airport_inside", "bar", "kitchen"]);
    let shards = ShardDir::open(&out).unwrap();
    // A grey JPEG stays one channel in an RGB dataset.
    let channels: Vec<u8> = (0..6)
        .map(|i| shards.split(Split::Train).record(i).unwrap().channels)
        .collect();
    assert_eq!(channels, [3, 1, 3, 1, 3, 1]);
    assert_eq!(m["channels"], 3);

    // folder: train/ and test/ trees, PNG and JPEG mixed.
    let froot = tmp.path().join("folder");
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        write_png(
            &froot.join(format!("train/{class}/a.png")),
            c as u32,
            5,
            7,
            3,
        );
        write_jpeg(
            &froot.join(format!("train/{class}/b.jpg")),
            c as u32 + 5,
            5,
            7,
            3,
        );
        write_png(
            &froot.join(format!("test/{class}/c.png")),
            c as u32 + 9,
            5,
            7,
            3,
        );
    }
    std::fs::write(froot.join("train/cat/notes.txt"), "not an image").unwrap();
    let fout = tmp.path().join("fpacked");
    pack_ok("folder", &froot, &fout, &[]);
    let shards = ShardDir::open(&fout).unwrap();
    assert_eq!(shards.split(Split::Train).len(), 4);
    // PNG is lossless and there is no resize: the record is exactly the pixels written.
    let r = shards.split(Split::Train).record(0).unwrap();
    assert_eq!(r.bytes, &pattern(0, 5, 7, 3)[..]);
}

#[test]
fn cifar100_python_and_cifar10_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cifar-100-python");
    let train_labels: Vec<u8> = (0..100).chain(0..100).collect();
    write_cifar_python_batch(
        &root.join("train"),
        "fine_labels",
        &train_labels,
        &cifar_pixels(200),
    );
    write_cifar_python_batch(
        &root.join("test"),
        "fine_labels",
        &[5, 99, 0],
        &cifar_pixels(3),
    );
    let out = tmp.path().join("c100");
    pack_ok("cifar100", tmp.path(), &out, &[]);
    let shards = ShardDir::open(&out).unwrap();
    let m = shards.manifest();
    assert_eq!(
        (m.classes.len(), m.train.count, m.test.count),
        (100, 200, 3)
    );
    let r = shards.split(Split::Test).record(1).unwrap();
    assert_eq!((r.label, r.height, r.width, r.channels), (99, 32, 32, 3));
    // HWC from CHW: pixel (0, 1) channel 2 of test image 1 is chw[2 * 1024 + 1].
    let chw = &cifar_pixels(3)[3072..6144];
    assert_eq!(r.bytes[3 + 2], chw[2 * 1024 + 1]);
    assert_eq!(r.bytes[0], chw[0]);

    // cifar10 binary batches: 1 label byte + 3072 pixels per record.
    let root10 = tmp.path().join("cifar-10-batches-bin");
    let record = |label: u8, i: usize| -> Vec<u8> {
        std::iter::once(label)
            .chain(cifar_pixels(i + 1)[i * 3072..].iter().copied())
            .collect()
    };
    for b in 1..=5 {
        let bytes: Vec<u8> = (0..10u8).flat_map(|l| record(l, b)).collect();
        std::fs::create_dir_all(&root10).unwrap();
        std::fs::write(root10.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(root10.join("test_batch.bin"), record(7, 0)).unwrap();
    let out10 = tmp.path().join("c10");
    pack_ok(
        "cifar10",
        &root10,
        &out10,
        &["--per-class", "2", "--seed", "3"],
    );
    let m = manifest(&out10);
    assert_eq!(m["train"]["per_class"], serde_json::json!(vec![2; 10]));
    assert_eq!(
        m["selection"],
        serde_json::json!({"per_class": 2, "seed": 3})
    );

    // A label out of range names the file and record.
    std::fs::write(root10.join("test_batch.bin"), record(12, 0)).unwrap();
    let o = pack("cifar10", &root10, &tmp.path().join("bad"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("test_batch.bin: record 0: label 12 out of range"),
        "{}",
        show(&o)
    );
}

#[test]
fn idx_gzipped_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let labels: Vec<u8> = (0..30).map(|i| (i % 3) as u8).collect();
    let images: Vec<u8> = (0..30 * 4 * 5).map(|i| (i % 256) as u8).collect();
    write_idx(
        &tmp.path().join("train-images-idx3-ubyte.gz"),
        &[30, 4, 5],
        &images,
        true,
    );
    write_idx(
        &tmp.path().join("train-labels-idx1-ubyte.gz"),
        &[30],
        &labels,
        true,
    );
    write_idx(
        &tmp.path().join("t10k-images-idx3-ubyte"),
        &[2, 4, 5],
        &images[..40],
        false,
    );
    write_idx(
        &tmp.path().join("t10k-labels-idx1-ubyte"),
        &[2],
        &[2, 0],
        false,
    );
    let out = tmp.path().join("out");
    pack_ok("idx", tmp.path(), &out, &[]);
    let shards = ShardDir::open(&out).unwrap();
    assert_eq!(shards.manifest().channels, 1);
    let r = shards.split(Split::Train).record(7).unwrap();
    assert_eq!((r.label, r.height, r.width), (1, 4, 5));
    assert_eq!(r.bytes, &images[7 * 20..8 * 20]);
    // Exact statistics of the stored train pixels.
    let n = images.len() as f64;
    let mean = images.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = images
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!((shards.manifest().train_mean[0] - mean).abs() < 1e-9);
    assert!((shards.manifest().train_std[0] - var.sqrt()).abs() < 1e-6);
    assert_eq!(shards.manifest().dataset, "idx");
    let names: Vec<&str> = (shards.manifest().classes.iter())
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["0", "1", "2"]);

    // The same files as Fashion-MNIST: its dataset name and class names, ids unchanged.
    let fashion = tmp.path().join("fashion");
    pack_ok("fashion-mnist", tmp.path(), &fashion, &[]);
    let shards = ShardDir::open(&fashion).unwrap();
    assert_eq!(shards.manifest().dataset, "fashion-mnist");
    assert_eq!(shards.manifest().source, "fashion-mnist");
    let classes: Vec<(&str, &str)> = (shards.manifest().classes.iter())
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect();
    assert_eq!(
        classes,
        [("0", "T-shirt/top"), ("1", "Trouser"), ("2", "Pullover")]
    );

    // A label the named dataset does not have is refused, naming the labels file.
    let mut many = labels.clone();
    many[3] = 12;
    write_idx(
        &tmp.path().join("train-labels-idx1-ubyte.gz"),
        &[30],
        &many,
        true,
    );
    let o = pack("kmnist", tmp.path(), &tmp.path().join("k"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("train-labels-idx1-ubyte.gz: label 12 is not one of kmnist's 10 classes"),
        "{}",
        show(&o)
    );
}

/// Many small shards in both splits (each closed, synced and checksummed on its own thread while
/// later records are written): the directory is the same byte for byte on 1 or 3 threads, and
/// `verify` accepts it.
#[test]
fn many_shards_are_identical_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    for (c, class) in ["a", "b"].iter().enumerate() {
        for k in 0..24 {
            let split = if k < 20 { "train" } else { "test" };
            let seed = c as u32 * 100 + k;
            write_jpeg(
                &root.join(format!("{split}/{class}/{k:03}.jpg")),
                seed,
                40 + k % 3,
                50,
                3,
            );
        }
    }
    // Upscaled to about 400 x 500 x 3 bytes per record: one record per 1 MiB shard.
    let extra = ["--short-side", "400", "--shard-mib", "1"];
    let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
    pack_ok(
        "folder",
        &root,
        &one,
        &[&extra[..], &["--threads", "1"]].concat(),
    );
    pack_ok(
        "folder",
        &root,
        &three,
        &[&extra[..], &["--threads", "3"]].concat(),
    );
    let files = dir_bytes(&one);
    assert_eq!(
        files,
        dir_bytes(&three),
        "byte-identical whatever the thread count"
    );
    let shards = |prefix: &str| {
        files
            .iter()
            .filter(|(name, _)| name.to_string_lossy().starts_with(prefix))
            .count()
    };
    assert!(shards("train-") >= 10, "{} train shards", shards("train-"));
    assert!(shards("test-") >= 2, "{} test shards", shards("test-"));

    let o = run(datasets_prep().arg("verify").arg(&one));
    assert!(o.status.success(), "{}", show(&o));
    let m = ShardDir::open(&one).unwrap();
    assert_eq!(m.split(Split::Train).len(), 40);
    assert_eq!(m.split(Split::Test).len(), 8);
    assert!(m.verify_checksums().is_empty());
}

/// A pack bigger than the step at which the open shard is flushed in the background (32 MiB)
/// and longer than one read-ahead chunk of input files (64): complete, the same on 1 and 2
/// threads, and every record holds the pixels of its own file.
#[test]
fn background_flushes_and_read_ahead_keep_the_output_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    let n = 150u32;
    for k in 0..n {
        let class = ["a", "b", "c"][k as usize % 3];
        let split = if k % 10 == 9 { "test" } else { "train" };
        write_jpeg(
            &root.join(format!("{split}/{class}/{k:03}.jpg")),
            k,
            40,
            50,
            3,
        );
    }
    // 400 x 500 x 3 bytes per record: 135 train records, about 81 MB in one shard.
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    pack_ok(
        "folder",
        &root,
        &one,
        &["--short-side", "400", "--threads", "1"],
    );
    pack_ok(
        "folder",
        &root,
        &two,
        &["--short-side", "400", "--threads", "2"],
    );
    let files = dir_bytes(&one);
    assert_eq!(
        files,
        dir_bytes(&two),
        "byte-identical whatever the thread count"
    );
    let train_bytes: usize = (files.iter())
        .filter(|(name, _)| name.to_string_lossy().starts_with("train-"))
        .map(|(_, b)| b.len())
        .sum();
    assert!(
        train_bytes > 64 << 20,
        "{train_bytes} bytes of train shards"
    );

    let o = run(datasets_prep().arg("verify").arg(&one));
    assert!(o.status.success(), "{}", show(&o));
    let m = ShardDir::open(&one).unwrap();
    let train = m.split(Split::Train);
    assert_eq!((train.len(), m.split(Split::Test).len()), (135, 15));
    // Records are in listing order (class folders a, b, c, then file names), each the file's
    // own pixels, resized as the library does it.
    let expected = (0..3).flat_map(|c| (0..n).filter(move |k| k % 3 == c && k % 10 != 9));
    let pool = datasets_prep::buffers::BufferPool::new(0);
    let mut resizer = fast_image_resize::Resizer::new();
    for (i, k) in expected.enumerate() {
        let class = ["a", "b", "c"][k as usize % 3];
        let bytes = std::fs::read(root.join(format!("train/{class}/{k:03}.jpg"))).unwrap();
        let decoded = datasets_prep::image_ops::decode_jpeg(&bytes).unwrap();
        let resized =
            datasets_prep::image_ops::resize_short_side(decoded, 400, &mut resizer, &pool).unwrap();
        let record = train.record(i).unwrap();
        assert_eq!(record.label, k % 3, "record {i}");
        assert!(
            record.bytes == resized.data.as_slice(),
            "record {i} is file {k:03}"
        );
    }
}
