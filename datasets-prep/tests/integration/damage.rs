//! Damaged shard directories: `verify` and the reader name the file and record, never panic.

use std::path::Path;

use datasets_prep::format::{HEADER_BYTES, parse_shard};
use datasets_prep::{Manifest, ShardDir, ShardError};
use proptest::prelude::*;

use crate::fixtures::*;

/// A small packed IDX dataset: 12 train, 4 test images of 6x5 in 3 classes.
fn packed(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("raw");
    let labels: Vec<u8> = (0..12).map(|i| (i % 3) as u8).collect();
    let images: Vec<u8> = (0..12 * 30).map(|i| (i * 7 % 256) as u8).collect();
    write_idx(
        &raw.join("train-images-idx3-ubyte"),
        &[12, 6, 5],
        &images,
        false,
    );
    write_idx(&raw.join("train-labels-idx1-ubyte"), &[12], &labels, false);
    write_idx(
        &raw.join("t10k-images-idx3-ubyte"),
        &[4, 6, 5],
        &images[..120],
        false,
    );
    write_idx(
        &raw.join("t10k-labels-idx1-ubyte"),
        &[4],
        &labels[..4],
        false,
    );
    let out = dir.join("packed");
    pack_ok("idx", &raw, &out, &[]);
    out
}

fn verify_fails(dir: &Path, needles: &[&str]) {
    let o = run(datasets_prep().arg("verify").arg(dir));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    for n in needles {
        assert!(stderr(&o).contains(n), "expected {n:?}:\n{}", show(&o));
    }
    assert!(!stderr(&o).contains("panicked"), "{}", show(&o));
}

#[test]
fn flipped_byte_truncation_and_edited_manifest_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = packed(tmp.path());
    let shard = out.join("train-00000.shard");
    let good = std::fs::read(&shard).unwrap();
    let o = run(datasets_prep().arg("verify").arg(&out));
    assert!(o.status.success(), "{}", show(&o));

    // A flipped pixel byte: only the checksum can tell.
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(&shard, &b).unwrap();
    verify_fails(&out, &["train-00000.shard: checksum", "1 problem(s)"]);
    assert!(
        ShardDir::open(&out).is_ok(),
        "structure is intact, so the reader opens it"
    );

    // A flipped byte in the record table: the reader names the record.
    let mut b = good.clone();
    b[HEADER_BYTES + 32 * 5 + 12] = 9; // label of record 5
    std::fs::write(&shard, &b).unwrap();
    verify_fails(
        &out,
        &["train-00000.shard: record 5: label 9 out of range for 3 classes"],
    );

    // Truncated: the size disagrees with the manifest.
    std::fs::write(&shard, &good[..good.len() - 10]).unwrap();
    verify_fails(&out, &["train-00000.shard: file is", "the manifest says"]);
    assert!(matches!(
        ShardDir::open(&out),
        Err(ShardError::SizeMismatch { .. })
    ));

    // An edited manifest: counts no longer add up.
    std::fs::write(&shard, &good).unwrap();
    let path = out.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"count\": 12", "\"count\": 13", 1)).unwrap();
    verify_fails(
        &out,
        &["manifest.json: invalid manifest: train.count is 13"],
    );
    std::fs::write(&path, "{ not json").unwrap();
    verify_fails(&out, &["manifest.json: invalid manifest"]);
    std::fs::remove_file(out.join("test-00000.shard")).unwrap();
    std::fs::write(&path, text).unwrap();
    verify_fails(&out, &["test-00000.shard"]);
}

/// A small JPEG-stored folder dataset: classes a and b, 8x8 images.
fn packed_jpeg(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("raw");
    for (i, path) in ["train/a/0.jpg", "train/b/0.jpg", "test/a/0.jpg"]
        .iter()
        .enumerate()
    {
        write_jpeg(&raw.join(path), i as u32, 8, 8, 3);
    }
    let out = dir.join("packed");
    pack_ok("folder", &raw, &out, &["--encoding", "jpeg"]);
    out
}

/// A JPEG record whose header and table entry both claim 16000x16000 (checksum updated): it
/// decoded leniently to 768 MB of filler and `verify` said ok; now the decoder's limits refuse
/// it and `verify` names the record.
#[test]
fn verify_decodes_jpeg_records_within_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = packed_jpeg(tmp.path());
    let shard = out.join("train-00000.shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    let layout = parse_shard(&shard, &bytes, 2).unwrap();
    let e = layout.entries[0];
    let record = e.offset as usize..e.offset as usize + e.length as usize;
    claim_size(&mut bytes[record], 16_000, 16_000);
    bytes[HEADER_BYTES + 16..HEADER_BYTES + 20].copy_from_slice(&16_000u32.to_le_bytes());
    bytes[HEADER_BYTES + 20..HEADER_BYTES + 24].copy_from_slice(&16_000u32.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let mut m = manifest(&out);
    m["train"]["shards"][0]["xxh3"] = datasets_prep::format::checksum(&bytes).into();
    std::fs::write(out.join("manifest.json"), m.to_string()).unwrap();
    verify_fails(
        &out,
        &[
            "train-00000.shard: record 0 does not decode",
            "256 megapixels",
            "1 problem(s)",
        ],
    );
}

/// FORMAT.md says every class MUST have a training record; `verify` accepted a class without.
#[test]
fn verify_refuses_a_class_without_training_records() {
    let tmp = tempfile::tempdir().unwrap();
    let out = packed_jpeg(tmp.path());
    let mut m = manifest(&out);
    m["classes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"id": "c", "name": "cat"}));
    for split in ["train", "test"] {
        m[split]["per_class"].as_array_mut().unwrap().push(0.into());
    }
    std::fs::write(out.join("manifest.json"), m.to_string()).unwrap();
    verify_fails(
        &out,
        &["every class needs a training record", "\"c\" (cat)"],
    );
}

#[test]
fn reader_rejects_out_of_range_indices() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = ShardDir::open(&packed(tmp.path())).unwrap();
    let train = shards.split(datasets_prep::Split::Train);
    assert_eq!(train.len(), 12);
    assert!(train.record(11).is_ok());
    let err = train.record(12).unwrap_err().to_string();
    assert!(
        err.contains("record index 12 out of range: the train split has 12 records"),
        "{err}"
    );
}

/// (shard bytes, manifest bytes) of one packed sample, made once.
fn sample() -> &'static (Vec<u8>, Vec<u8>) {
    static SAMPLE: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    SAMPLE.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = packed(tmp.path());
        (
            std::fs::read(out.join("train-00000.shard")).unwrap(),
            std::fs::read(out.join("manifest.json")).unwrap(),
        )
    })
}

fn sample_shard() -> Vec<u8> {
    sample().0.clone()
}

fn sample_manifest() -> Vec<u8> {
    sample().1.clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Any bytes: an error or a layout whose every record lies inside the file.
    #[test]
    fn shard_parser_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        if let Ok(layout) = parse_shard(Path::new("x"), &bytes, 7) {
            for e in layout.entries {
                prop_assert!(e.offset + u64::from(e.length) <= bytes.len() as u64);
            }
        }
    }

    /// A valid shard with a few bytes overwritten in the header and table.
    #[test]
    fn shard_parser_survives_mutations(edits in proptest::collection::vec((0usize..700, any::<u8>()), 1..6)) {
        let mut bytes = sample_shard();
        for (at, v) in edits {
            bytes[at] = v;
        }
        if let Ok(layout) = parse_shard(Path::new("x"), &bytes, 3) {
            for e in layout.entries {
                prop_assert!(e.offset + u64::from(e.length) <= bytes.len() as u64);
                prop_assert!(e.label < 3);
            }
        }
    }

    #[test]
    fn manifest_parser_never_panics(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
                                    cut in any::<prop::sample::Index>()) {
        let mut bytes = sample_manifest();
        for (at, v) in edits {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let cut = cut.index(bytes.len() + 1);
        let _ = Manifest::parse(Path::new("m"), &bytes[..cut]);
    }

    #[test]
    fn mat_and_pickle_readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = datasets_prep::pickle::parse(&bytes);
        let mut mat = vec![b' '; 126];
        mat.extend_from_slice(b"IM");
        mat.extend_from_slice(&bytes);
        let _ = datasets_prep::mat::read_mat(&mat);
    }
}

/// A small IDX file: `dims` and its data.
fn idx_bytes(dims: &[u32]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    let n: u32 = dims.iter().product();
    out.extend((0..n).map(|i| i as u8));
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

/// Pickles as numpy writes them, one per protocol (`tests/fixtures/pickle`).
fn sample_pickles() -> &'static Vec<Vec<u8>> {
    static PICKLES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    PICKLES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickle");
        (0..=5)
            .map(|p| std::fs::read(dir.join(format!("arrays-p{p}.pkl"))).unwrap())
            .collect()
    })
}

/// Every array a pickle's top-level dict holds, as `ndarray` reads them (errors ignored).
fn read_arrays(bytes: &[u8]) {
    if let Ok(root) = datasets_prep::pickle::parse(bytes) {
        for key in ["u1", "f8", "empty", "labels"] {
            if let Some(v) = root.get(key) {
                if let Ok(a) = datasets_prep::pickle::ndarray(&v) {
                    let _ = a.to_f64();
                }
                let _ = v.items();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// IDX files, raw or gzipped: random bytes, and a valid file with bytes overwritten or cut.
    /// An accepted file's data always matches its dimensions.
    #[test]
    fn idx_parser_never_panics(
        random in proptest::collection::vec(any::<u8>(), 0..600),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let path = Path::new("x-idx3-ubyte");
        let mut valid = idx_bytes(&[3, 4, 5]);
        for (at, v) in &edits {
            let i = at.index(valid.len());
            valid[i] = *v;
        }
        let valid = valid[..cut.index(valid.len() + 1)].to_vec();
        let mut zipped_valid = gzip(&idx_bytes(&[3, 4, 5]));
        for (at, v) in &edits {
            let i = at.index(zipped_valid.len());
            zipped_valid[i] = *v;
        }
        let mut gz_random = vec![0x1f, 0x8b];
        gz_random.extend(&random);
        let candidates = [random.clone(), gz_random, valid.clone(), gzip(&valid), zipped_valid];
        for bytes in candidates {
            for dims in [1, 3] {
                if let Ok((d, data)) = datasets_prep::sources::parse_idx(path, bytes.clone(), dims) {
                    prop_assert_eq!(d.len(), dims);
                    prop_assert_eq!(d.iter().product::<usize>(), data.len());
                }
            }
        }
    }

    /// Real numpy pickles of every protocol with a few bytes overwritten or cut off.
    #[test]
    fn pickle_reader_survives_mutated_numpy_pickles(
        protocol in 0usize..=5,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = sample_pickles()[protocol].clone();
        for (at, v) in edits {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        read_arrays(&bytes);
        read_arrays(&bytes[..cut.index(bytes.len() + 1)]);
    }

    /// A MAT file of the Flowers kind (compressed or not) with bytes overwritten or cut off.
    #[test]
    fn mat_reader_survives_mutated_files(
        compress in any::<bool>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.mat");
        write_mat(
            &path,
            &[
                ("labels", Mat::Double(vec![1.0, 2.0, 3.0])),
                ("names", Mat::Cell(vec![Mat::Char("a".into()), Mat::U8(vec![7])])),
                ("s", Mat::Struct(vec!["f"], vec![vec![Mat::Char("x".into())]])),
            ],
            compress,
        );
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, v) in edits {
            let i = 128 + at.index(bytes.len() - 128);
            bytes[i] = v;
        }
        let bytes = &bytes[..cut.index(bytes.len() + 1)];
        if let Ok(vars) = datasets_prep::mat::read_mat(bytes) {
            for (name, _) in &vars {
                let _ = datasets_prep::mat::variable(&vars, name);
            }
        }
    }
}
