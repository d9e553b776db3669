//! Bad input: each gives an error naming the file, record or option, and nothing half-written.

use std::path::Path;
use std::time::{Duration, Instant};

use datasets_prep::{ShardDir, ShardError};

use crate::fixtures::*;

fn folder_dataset(root: &Path, per_class: u32, size: u32) {
    for (c, class) in ["a", "b"].iter().enumerate() {
        for k in 0..per_class {
            write_jpeg(
                &root.join(format!("train/{class}/{k:04}.jpg")),
                c as u32 * 1000 + k,
                size,
                size + 3,
                3,
            );
        }
        write_jpeg(
            &root.join(format!("test/{class}/t.jpg")),
            c as u32 + 77,
            size,
            size,
            3,
        );
    }
}

fn fails_with(o: &std::process::Output, needles: &[&str]) {
    assert_eq!(o.status.code(), Some(1), "{}", show(o));
    let err = stderr(o);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in:\n{}", show(o));
    }
    assert!(!err.contains("panicked"), "{}", show(o));
}

#[test]
fn metadata_errors_name_the_file_and_expected_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let out = tmp.path().join("out");
    fails_with(
        &pack("cub", &root, &out, &[]),
        &[
            "images.txt: missing",
            "train_test_split.txt (<id> <1=train|0=test>)",
        ],
    );
    fails_with(
        &pack("cars", &root, &out, &[]),
        &["cars_annos.mat: missing", "relative_im_path"],
    );
    fails_with(
        &pack("flowers", &root, &out, &[]),
        &["imagelabels.mat: missing", "setid.mat"],
    );
    fails_with(
        &pack("mit67", &root, &out, &[]),
        &["Images: missing", "TrainImages.txt"],
    );
    fails_with(
        &pack("cifar100", &root, &out, &[]),
        &["test: missing", "cifar-100-python"],
    );
    fails_with(
        &pack("idx", &root, &out, &[]),
        &["train-images-idx3-ubyte: missing"],
    );
    fails_with(
        &pack("folder", &root, &out, &[]),
        &["train: missing", "train.txt and test.txt"],
    );
    fails_with(
        &pack("cub", &tmp.path().join("nope"), &out, &[]),
        &["nope: not a directory"],
    );
    assert!(!out.exists());

    // Usage errors list the valid values.
    let o = pack("imagenet", &root, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stderr(&o).contains("cub-sub:X"), "{}", show(&o));
}

#[test]
fn duplicate_ids_absent_images_bad_labels_and_empty_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cub");
    write_jpeg(&root.join("images/a/1.jpg"), 1, 8, 8, 3);
    write_jpeg(&root.join("images/b/2.jpg"), 2, 8, 8, 3);
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    write_text(
        &root.join("images.txt"),
        &lines(&["1 a/1.jpg", "2 b/2.jpg", "1 a/1.jpg"]),
    );
    write_text(
        &root.join("image_class_labels.txt"),
        &lines(&["1 1", "2 2"]),
    );
    write_text(&root.join("train_test_split.txt"), &lines(&["1 1", "2 1"]));
    let out = tmp.path().join("out");
    fails_with(
        &pack("cub", &root, &out, &[]),
        &["images.txt:3: duplicate id \"1\""],
    );

    write_text(
        &root.join("images.txt"),
        &lines(&["1 a/1.jpg", "2 b/2.jpg", "3 b/3.jpg"]),
    );
    write_text(
        &root.join("image_class_labels.txt"),
        &lines(&["1 1", "2 2", "3 2"]),
    );
    write_text(
        &root.join("train_test_split.txt"),
        &lines(&["1 1", "2 1", "3 0"]),
    );
    fails_with(
        &pack("cub", &root, &out, &[]),
        &["b/3.jpg: listed in the metadata but absent"],
    );

    write_text(
        &root.join("image_class_labels.txt"),
        &lines(&["1 1", "2 two", "3 2"]),
    );
    fails_with(
        &pack("cub", &root, &out, &[]),
        &["image_class_labels.txt:2", "expected an integer"],
    );

    // Class 2 only has a test image: no training images.
    write_jpeg(&root.join("images/b/3.jpg"), 3, 8, 8, 3);
    write_text(
        &root.join("image_class_labels.txt"),
        &lines(&["1 1", "2 2", "3 2"]),
    );
    write_text(
        &root.join("train_test_split.txt"),
        &lines(&["1 1", "2 0", "3 0"]),
    );
    fails_with(
        &pack("cub", &root, &out, &["--short-side", "4"]),
        &["have no training images: 2 (2)"],
    );
    // A split file naming an unknown image.
    write_text(
        &root.join("train_test_split.txt"),
        &lines(&["1 1", "2 1", "3 0", "44 1"]),
    );
    fails_with(
        &pack("cub", &root, &out, &[]),
        &["train_test_split.txt", "\"44\""],
    );
    assert!(!out.exists());
}

#[test]
fn corrupt_images_fail_or_are_skipped_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 3, 10);
    let bad = root.join("train/a/0001.jpg");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap(); // truncated
    std::fs::write(root.join("train/b/zz.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let out = tmp.path().join("out");
    fails_with(
        &pack("folder", &root, &out, &[]),
        &["0001.jpg", "--skip-bad"],
    );
    assert!(!out.exists());

    pack_ok("folder", &root, &out, &["--skip-bad"]);
    let m = manifest(&out);
    let skipped = m["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{m}");
    assert!(
        skipped[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("train/a/0001.jpg")
    );
    assert!(
        skipped[1]["path"]
            .as_str()
            .unwrap()
            .ends_with("train/b/zz.png")
    );
    assert_eq!(m["train"]["per_class"], serde_json::json!([2, 3]));
    assert!(
        run(datasets_prep().arg("verify").arg(&out))
            .status
            .success()
    );
}

#[test]
fn existing_output_is_kept_without_force_and_replaced_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 2, 6);
    let out = tmp.path().join("out");
    pack_ok("folder", &root, &out, &[]);
    let before = dir_bytes(&out);
    fails_with(
        &pack("folder", &root, &out, &["--per-class", "1"]),
        &["already exists", "--force"],
    );
    assert_eq!(dir_bytes(&out), before, "nothing changed without --force");
    pack_ok("folder", &root, &out, &["--per-class", "1", "--force"]);
    assert_eq!(manifest(&out)["train"]["count"], 2);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "only raw/ and out/ remain: {leftovers:?}"
    );
}

/// `--root /x/data --out /x --force` used to delete the dataset: an `--out` that is or contains
/// `--root` is refused before anything is touched, however the paths are spelled.
#[test]
fn force_never_deletes_the_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("x");
    let root = parent.join("data");
    folder_dataset(&root, 2, 6);
    let before = dir_bytes(&root.join("train/a"));
    for (out, needle) in [
        (parent.clone(), "contains --root"),
        (root.join(".."), "contains --root"),
        (tmp.path().to_path_buf(), "contains --root"),
        (root.clone(), "is the --root folder"),
        (root.join("train/.."), "is the --root folder"),
    ] {
        let o = pack("folder", &root, &out, &["--force"]);
        assert!(!o.status.success(), "{}", show(&o));
        assert!(
            stderr(&o).contains(needle),
            "{}: {}",
            out.display(),
            show(&o)
        );
        assert_eq!(
            dir_bytes(&root.join("train/a")),
            before,
            "{}",
            out.display()
        );
    }
    // A symbolic link to an ancestor is resolved too.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&parent, &link).unwrap();
    let o = pack("folder", &root, &link, &["--force"]);
    assert!(stderr(&o).contains("contains --root"), "{}", show(&o));
    assert_eq!(dir_bytes(&root.join("train/a")), before);
    // A new folder inside the root is fine.
    pack_ok("folder", &root, &root.join("packed"), &[]);
}

/// `--force` replaces a shard directory this tool wrote, and nothing else: a folder with any
/// other file is refused, the file named, and everything left as it was.
#[test]
fn force_replaces_only_shard_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 2, 6);

    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::write(photos.join("holiday.jpg"), b"precious").unwrap();
    let o = pack("folder", &root, &photos, &["--force"]);
    fails_with(&o, &["not a shard directory", "holiday.jpg"]);
    assert_eq!(
        std::fs::read(photos.join("holiday.jpg")).unwrap(),
        b"precious"
    );

    // A packed directory someone added a file to.
    let out = tmp.path().join("out");
    pack_ok("folder", &root, &out, &[]);
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let before = dir_bytes(&out);
    fails_with(&pack("folder", &root, &out, &["--force"]), &["notes.txt"]);
    assert_eq!(dir_bytes(&out), before);
    std::fs::remove_file(out.join("notes.txt")).unwrap();

    // Shard-like names without a manifest this tool recognises.
    std::fs::write(out.join("manifest.json"), b"{}").unwrap();
    fails_with(
        &pack("folder", &root, &out, &["--force"]),
        &["manifest.json is not one datasets-prep writes"],
    );
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    fails_with(
        &pack("folder", &root, &file, &["--force"]),
        &["is a regular file"],
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // An empty folder, and a real shard directory, are replaced.
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::create_dir(&out).unwrap();
    pack_ok("folder", &root, &out, &["--force"]);
    pack_ok("folder", &root, &out, &["--force", "--per-class", "1"]);
    assert_eq!(manifest(&out)["train"]["count"], 2);
}

#[test]
fn an_interrupted_pack_leaves_nothing_that_passes_as_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 150, 64);
    let out = tmp.path().join("out");
    // Upscaling to 600 pixels makes each image slow enough; 1 MiB shards appear as it goes.
    let mut child = datasets_prep()
        .args([
            "pack",
            "--source",
            "folder",
            "--short-side",
            "600",
            "--shard-mib",
            "1",
            "--threads",
            "1",
            "--root",
        ])
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = tmp.path().join(format!(".out.partial-{}", child.id()));
    let start = Instant::now();
    while !partial.join("train-00000.shard").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no shard appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "pack finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "no output directory after an interrupted pack"
    );
    for dir in [&out, &partial] {
        let o = run(datasets_prep().arg("verify").arg(dir));
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(matches!(
            ShardDir::open(dir),
            Err(ShardError::NotAShardDir { .. })
        ));
    }
}

/// Killed packs leave `.NAME.partial-PID` folders; the next pack into the same `--out` removes
/// those whose process is gone, and only those, and names a live one it leaves.
#[test]
fn leftovers_of_killed_packs_are_removed_by_the_next_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 2, 6);
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let live = std::process::id();
    let partial = |name: &str| tmp.path().join(name);
    let dead_out = partial(&format!(".out.partial-{dead}"));
    let live_out = partial(&format!(".out.partial-{live}"));
    let other_name = partial(&format!(".other.partial-{dead}"));
    let not_a_pid = partial(&format!(".out.partial-{dead}x"));
    for dir in [&dead_out, &live_out, &other_name, &not_a_pid] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("train-00000.shard"), b"half").unwrap();
    }
    let o = pack("folder", &root, &tmp.path().join("out"), &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(!dead_out.exists(), "a dead pack's folder is removed");
    assert!(
        stderr(&o).contains(&format!("removed {}", dead_out.display())),
        "{}",
        show(&o)
    );
    for dir in [&live_out, &other_name, &not_a_pid] {
        assert!(
            dir.join("train-00000.shard").exists(),
            "{} is kept",
            dir.display()
        );
    }
    assert!(
        stderr(&o).contains(&format!("left {} alone", live_out.display())),
        "{}",
        show(&o)
    );
}

/// `--help` promises exit status 2 for usage errors: every rejected option value gets it, with
/// the option named, before anything is read (`--short-side 100000` used to abort on a 30 GB
/// allocation, `--threads 100000` never to return).
#[test]
fn rejected_option_values_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 1, 6);
    let out = tmp.path().join("out");
    for (args, needle) in [
        (&["--short-side", "100000"][..], "--short-side"),
        (&["--short-side", "4097"], "--short-side"),
        (&["--short-side", "x"], "--short-side"),
        (&["--threads", "100000"], "--threads"),
        (&["--threads", "0"], "--threads"),
        (&["--quality", "0"], "--quality"),
        (&["--quality", "101"], "--quality"),
        (&["--per-class", "0"], "--per-class"),
        (&["--shard-mib", "0"], "--shard-mib"),
        (&["--encoding", "png"], "--encoding"),
    ] {
        let o = pack("folder", &root, &out, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", show(&o));
        assert!(!out.exists(), "{args:?}");
    }
    let o = pack("folder", &root, Path::new("/"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stderr(&o).contains("contains --root"), "{}", show(&o));
    let o = pack("folder", &root, &tmp.path().join("absent/.."), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        stderr(&o).contains("--out has no file name"),
        "{}",
        show(&o)
    );
    let help = run(datasets_prep().arg("--help"));
    assert!(String::from_utf8_lossy(&help.stdout).contains("2  usage error"));
    // An unknown source lists the sources once.
    let o = pack("imagenet", &root, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert_eq!(stderr(&o).matches("cub-sub:X").count(), 1, "{}", show(&o));
    // A --per-class above every class's count keeps all, and says so.
    let o = pack("folder", &root, &out, &["--per-class", "100000"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stderr(&o).contains("--per-class 100000: no class has more training images"),
        "{}",
        show(&o)
    );
    std::fs::remove_dir_all(&out).unwrap();
    // The limits themselves are accepted.
    pack_ok(
        "folder",
        &root,
        &out,
        &["--short-side", "1", "--threads", "1024"],
    );
}

/// A 1x30000 PNG resized to a short side of 512 needed a 7.8 GB buffer, and a 631-byte JPEG
/// claiming 16000x16000 packed into a 733 MB record of filler: both are refused, naming the
/// file, before any such allocation (and left out with --skip-bad).
#[test]
fn images_too_large_or_too_short_for_their_size_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 2, 8);
    let out = tmp.path().join("out");
    let wide = root.join("train/a/wide.png");
    write_png(&wide, 1, 1, 30_000, 1);
    fails_with(
        &pack("folder", &root, &out, &["--short-side", "512"]),
        &["wide.png", "would be a record of", "--short-side"],
    );
    pack_ok(
        "folder",
        &root,
        &out,
        &["--short-side", "512", "--skip-bad"],
    );
    let m = manifest(&out);
    assert!(
        m["skipped"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("wide.png"),
        "{m}"
    );
    std::fs::remove_file(&wide).unwrap();
    std::fs::remove_dir_all(&out).unwrap();

    let bomb = root.join("train/b/bomb.jpg");
    write_jpeg(&bomb, 3, 8, 8, 3);
    let mut bytes = std::fs::read(&bomb).unwrap();
    claim_size(&mut bytes, 16_000, 16_000);
    std::fs::write(&bomb, &bytes).unwrap();
    fails_with(
        &pack("folder", &root, &out, &[]),
        &[
            "bomb.jpg",
            "16000x16000 is 256 megapixels, more than the 100",
        ],
    );
    claim_size(&mut bytes, 4_000, 4_000);
    std::fs::write(&bomb, &bytes).unwrap();
    fails_with(
        &pack("folder", &root, &out, &[]),
        &["bomb.jpg", "cannot hold a 4000x4000 image"],
    );
    assert!(!out.exists());
}

/// A FIFO where a file is expected blocked `open` forever (or was called absent); a device
/// reporting size 0 was read until memory ran out. Each is now named for what it is, at once.
#[test]
fn fifos_and_devices_are_named_not_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 2, 6);
    let out = tmp.path().join("out");
    pack_ok("folder", &root, &out, &[]);
    let verify = |dir: &Path| run_within(datasets_prep().arg("verify").arg(dir), 20);

    // The shard directory, its manifest, one of its shard files.
    let shard = out.join("test-00000.shard");
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    fails_with(&verify(&out), &["test-00000.shard: is a FIFO (named pipe)"]);
    std::fs::remove_file(&shard).unwrap();
    let manifest = out.join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    mkfifo(&manifest);
    fails_with(&verify(&out), &["manifest.json: is a FIFO (named pipe)"]);
    std::fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap();
    fails_with(&verify(&out), &["manifest.json: is a character device"]);
    let fifo_dir = tmp.path().join("fifo-dir");
    mkfifo(&fifo_dir);
    fails_with(
        &verify(&fifo_dir),
        &["fifo-dir: is a FIFO (named pipe), expected a shard directory"],
    );

    // An image named like one in a class folder.
    let image = root.join("train/a/zz.jpg");
    mkfifo(&image);
    let packing = |source: &str, root: &Path| {
        run_within(
            datasets_prep()
                .args(["pack", "--source", source, "--root"])
                .arg(root)
                .arg("--out")
                .arg(tmp.path().join("new")),
            20,
        )
    };
    fails_with(
        &packing("folder", &root),
        &["zz.jpg: is a FIFO (named pipe)"],
    );
    std::fs::remove_file(&image).unwrap();

    // CUB metadata files and listed images.
    let cub = tmp.path().join("cub");
    write_jpeg(&cub.join("images/a/1.jpg"), 1, 8, 8, 3);
    mkfifo(&cub.join("images/a/2.jpg"));
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    write_text(&cub.join("images.txt"), &lines(&["1 a/1.jpg", "2 a/2.jpg"]));
    write_text(&cub.join("train_test_split.txt"), &lines(&["1 1", "2 0"]));
    mkfifo(&cub.join("image_class_labels.txt"));
    fails_with(
        &packing("cub", &cub),
        &["image_class_labels.txt: is a FIFO (named pipe)"],
    );
    std::fs::remove_file(cub.join("image_class_labels.txt")).unwrap();
    write_text(&cub.join("image_class_labels.txt"), &lines(&["1 1", "2 1"]));
    fails_with(&packing("cub", &cub), &["2.jpg: is a FIFO (named pipe)"]);
    assert!(!tmp.path().join("new").exists());
}

/// A class folder whose name is not UTF-8 was turned into a lossy name that matched no folder;
/// now it is an error naming the folder.
#[test]
fn a_class_folder_name_that_is_not_utf8_is_named() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 1, 6);
    let bad = root
        .join("train")
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    write_jpeg(&bad.join("0.jpg"), 9, 6, 6, 3);
    fails_with(
        &pack("folder", &root, &tmp.path().join("out"), &[]),
        &["caf\u{fffd}", "class folder name is not valid UTF-8"],
    );
}

/// A manifest larger than any real one is refused without reading it all (a sparse file).
#[test]
fn an_oversized_manifest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    folder_dataset(&root, 1, 6);
    let out = tmp.path().join("out");
    pack_ok("folder", &root, &out, &[]);
    let file = std::fs::File::options()
        .write(true)
        .open(out.join("manifest.json"))
        .unwrap();
    file.set_len(65 << 20).unwrap();
    fails_with(
        &run(datasets_prep().arg("verify").arg(&out)),
        &["manifest.json: larger than the limit of 67108864 bytes"],
    );
}

/// A gzip IDX file whose data goes on past what its header claims (a 34 MB bomb reached 4.2 GB
/// before failing): decompression stops at the claimed size, and a header claiming more than
/// the limit is refused before any data is decompressed.
#[test]
fn gzip_idx_files_expand_no_further_than_their_header_claims() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("idx");
    write_idx(
        &root.join("t10k-images-idx3-ubyte"),
        &[1, 2, 2],
        &[0; 4],
        false,
    );
    write_idx(&root.join("t10k-labels-idx1-ubyte"), &[1], &[0], false);
    write_idx(&root.join("train-labels-idx1-ubyte"), &[1], &[0], false);
    let images = root.join("train-images-idx3-ubyte.gz");
    // 40 MB of zeros after a header claiming one 2x2 image.
    write_idx(&images, &[1, 2, 2], &vec![0u8; 40 << 20], true);
    assert!(std::fs::metadata(&images).unwrap().len() < 1 << 20);
    let out = tmp.path().join("out");
    fails_with(
        &pack("idx", &root, &out, &[]),
        &[
            "train-images-idx3-ubyte.gz",
            "gzip data holds more than the 4 bytes of data its IDX header claims",
        ],
    );
    write_idx(&images, &[60_000, 1000, 1000], &[0; 16], true);
    fails_with(
        &pack("idx", &root, &out, &[]),
        &[
            "train-images-idx3-ubyte.gz",
            "IDX header claims dimensions [60000, 1000, 1000]",
        ],
    );
    write_idx(&images, &[1, 2, 2], &[0; 4], true);
    pack_ok("idx", &root, &out, &[]);
}

/// Records of differing sizes pack, but the pack names two of them and says that training needs
/// --crop (and, when sizes were kept, what --short-side does); same-size records say nothing.
#[test]
fn mixed_image_sizes_are_named_at_pack_time() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    for class in ["a", "b"] {
        for split in ["train", "test"] {
            write_png(&root.join(format!("{split}/{class}/0.png")), 1, 12, 12, 3);
        }
    }
    let out = tmp.path().join("out");
    let o = pack("folder", &root, &out, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(!stderr(&o).contains("--crop"), "{}", show(&o));

    write_png(&root.join("train/b/1.png"), 2, 12, 20, 3);
    let o = pack("folder", &root, &out, &["--force"]);
    assert!(o.status.success(), "{}", show(&o));
    let err = stderr(&o);
    let first = root.join("train/a/0.png").display().to_string();
    let other = root.join("train/b/1.png").display().to_string();
    assert!(
        err.contains(&format!("{first} is 12x12, {other} is 12x20")),
        "{}",
        show(&o)
    );
    assert!(err.contains("training needs --crop N"), "{}", show(&o));
    assert!(err.contains("--short-side N makes"), "{}", show(&o));

    // Resized to a short side of 10, the wide image is still 10x17.
    let o = pack("folder", &root, &out, &["--force", "--short-side", "10"]);
    assert!(o.status.success(), "{}", show(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("{other} is 10x17")), "{}", show(&o));
    assert!(!err.contains("--short-side N makes"), "{}", show(&o));
}
