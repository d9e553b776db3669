//! Hierarchy-based unit-sphere embeddings against the reference's own pickles (read through the
//! pickle loader, so both code paths are tested at once), and malformed hierarchies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cosine_train::config::EmbeddingSpec;
use cosine_train::embedding::hierarchy::{Hierarchy, unitsphere_embedding};
use cosine_train::embedding::npy;
use datasets_prep::manifest::ClassInfo;

use crate::util::{cosine_train, run, show, stderr};

fn reference() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference");
    assert!(
        dir.is_dir(),
        "{} missing: the reference data sits beside the checkout",
        dir.display()
    );
    dir
}

/// (ids, n x d values) of a reference pickle.
fn reference_embedding(name: &str) -> (Vec<i64>, usize, Vec<f64>) {
    let bytes = std::fs::read(reference().join("embeddings").join(name)).unwrap();
    let root = datasets_prep::pickle::parse(&bytes).unwrap();
    let array = datasets_prep::pickle::ndarray(&root.get("embedding").unwrap()).unwrap();
    let ids = root
        .get("ind2label")
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|v| v.as_int().unwrap())
        .collect();
    (ids, array.shape[1], array.to_f64().unwrap())
}

#[test]
fn embeddings_of_the_five_hierarchies_match_the_reference_pickles() {
    for (hierarchy, is_a, pickle) in [
        (
            "cifar100.parent-child.txt",
            false,
            "cifar100.unitsphere.pickle",
        ),
        (
            "cub_flat.parent-child.txt",
            false,
            "cub_flat.unitsphere.pickle",
        ),
        (
            "cub_wikispecies.parent-child.txt",
            false,
            "cub_wikispecies.unitsphere.pickle",
        ),
        (
            "cub_balanced.parent-child.txt",
            false,
            "cub_balanced.unitsphere.pickle",
        ),
        ("nab.child-parent.txt", true, "nab.unitsphere.pickle"),
    ] {
        let h =
            Hierarchy::from_file(&reference().join("hierarchies").join(hierarchy), is_a).unwrap();
        let (ids, e) = unitsphere_embedding(&h).unwrap();
        let (want_ids, d, want) = reference_embedding(pickle);
        assert_eq!(ids, want_ids, "{hierarchy}: class order");
        assert_eq!(d, ids.len());
        let max_diff = e
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(max_diff < 1e-9, "{hierarchy}: max difference {max_diff}");
        // Gram matrix = S, unit rows.
        let n = ids.len();
        let s = h.similarity(&ids);
        for i in (0..n).step_by(7) {
            for j in 0..n {
                let dot: f64 = (0..n).map(|k| e[i * n + k] * e[j * n + k]).sum();
                assert!(
                    (dot - s[i * n + j]).abs() < 1e-9,
                    "{hierarchy}: <e{i}, e{j}>"
                );
            }
        }
    }
}

#[test]
fn malformed_hierarchies_name_the_nodes() {
    for (text, expect) in [
        ("1 2\n2 3\n3 1\n", "cycle"),
        ("1 2\n3 4\n4 3\n", "node 3 lies on a cycle"),
        ("1 3\n2 3\n", "node 3 has two parents, 1 and 2"),
        ("1 2\n5 6\n", "2 roots"),
        ("1 2\n1 x7\n", "node id \"x7\" is not an integer"),
    ] {
        let err = Hierarchy::parse(text, false, "h.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{text:?}: {err}");
    }
}

#[test]
fn embed_command_writes_npy_and_ids_that_training_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cifar100.unitsphere.npy");
    let o = run(
        cosine_train()
            .args(["embed", "--hierarchy"])
            .arg(reference().join("hierarchies/cifar100.parent-child.txt"))
            .arg("--out")
            .arg(&out),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", show(&o));
    let ids = std::fs::read_to_string(tmp.path().join("cifar100.unitsphere.ids.txt")).unwrap();
    assert_eq!(ids.lines().count(), 100);
    // Loaded for a dataset whose classes are CIFAR-100's ids in reverse order: rows follow ids.
    let classes: Vec<ClassInfo> = (0..100)
        .rev()
        .map(|i| ClassInfo {
            id: i.to_string(),
            name: String::new(),
        })
        .collect();
    let e = cosine_train::embedding::load(&EmbeddingSpec::File(out.clone()), &classes).unwrap();
    let pickle = reference().join("embeddings/cifar100.unitsphere.pickle");
    let r = cosine_train::embedding::load(&EmbeddingSpec::File(pickle), &classes).unwrap();
    let diff = f64::try_from((e - r).abs().max()).unwrap();
    assert!(diff < 1e-6, "npy and reference pickle disagree by {diff}");
    // A class the embedding lacks is refused with its id.
    let mut more = classes.clone();
    more.push(ClassInfo {
        id: "777".into(),
        name: String::new(),
    });
    let err = cosine_train::embedding::load(&EmbeddingSpec::File(out.clone()), &more)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing ids [\"777\"]"), "{err}");
    // A bad hierarchy file is an error naming it, not a panic.
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "1 2\n2 1\n").unwrap();
    let o = run(
        cosine_train()
            .args(["embed", "--hierarchy"])
            .arg(&bad)
            .arg("--out")
            .arg(tmp.path().join("x.npy")),
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("bad.txt"), "{}", show(&o));
}

#[test]
fn the_committed_embeddings_folder_is_what_embed_writes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("embeddings");
    let tmp = tempfile::tempdir().unwrap();
    for (name, hierarchy, is_a) in [
        ("cifar100", "cifar100.parent-child.txt", false),
        ("cub_flat", "cub_flat.parent-child.txt", false),
        ("cub_wikispecies", "cub_wikispecies.parent-child.txt", false),
        ("cub_balanced", "cub_balanced.parent-child.txt", false),
        ("nab", "nab.child-parent.txt", true),
    ] {
        let h = Hierarchy::from_file(&dir.join(hierarchy), is_a).unwrap();
        let (ids, e) = unitsphere_embedding(&h).unwrap();
        let fresh = tmp.path().join(format!("{name}.npy"));
        let matrix = npy::Matrix {
            rows: ids.len(),
            cols: ids.len(),
            values: e,
        };
        npy::write_matrix(&fresh, &matrix).unwrap();
        let committed = dir.join(format!("{name}.unitsphere.npy"));
        assert!(
            std::fs::read(&committed).unwrap() == std::fs::read(&fresh).unwrap(),
            "{} is stale",
            committed.display()
        );
        let listed: Vec<i64> =
            std::fs::read_to_string(dir.join(format!("{name}.unitsphere.ids.txt")))
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
        assert_eq!(listed, ids, "{name} ids");
    }
}

#[test]
fn training_with_the_cifar100_hierarchy_embedding_end_to_end() {
    // A CIFAR-100 layout (binary batches: coarse label, fine label, 3072 CHW pixels), 2 training
    // images and 1 test image per class.
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("cifar-100-binary");
    std::fs::create_dir_all(&raw).unwrap();
    let batch = |copies: usize| -> Vec<u8> {
        (0..copies * 100)
            .flat_map(|i| {
                let label = (i % 100) as u8;
                [label / 5, label]
                    .into_iter()
                    .chain((0..3072).map(move |k| ((k * 7 + i * 13) % 256) as u8))
            })
            .collect()
    };
    std::fs::write(raw.join("train.bin"), batch(2)).unwrap();
    std::fs::write(raw.join("test.bin"), batch(1)).unwrap();
    let data = tmp.path().join("c100");
    let opts = datasets_prep::pack::PackOptions::new(
        datasets_prep::sources::Source::Cifar100,
        raw,
        data.clone(),
    );
    datasets_prep::pack::pack(&opts).unwrap();

    let embedding = Path::new(env!("CARGO_MANIFEST_DIR")).join("embeddings");
    let train = |spec: PathBuf, out: &str| {
        run(
            cosine_train()
                .arg("train")
                .arg("--hierarchy")
                .arg(embedding.join("cifar100.parent-child.txt"))
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(tmp.path().join(out))
                .args([
                    "--arch",
                    "resnet8",
                    "--loss",
                    "cosine",
                    "--epochs",
                    "1",
                    "--batch-size",
                    "50",
                    "--threads",
                    "1",
                ])
                .arg("--embedding")
                .arg(spec),
            Duration::from_secs(300),
        )
    };
    let o = train(embedding.join("cifar100.unitsphere.npy"), "ok");
    assert!(o.status.success(), "{}", show(&o));
    let metrics = std::fs::read_to_string(tmp.path().join("ok/metrics.jsonl")).unwrap();
    let epoch: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let (top1, hier) = (
        epoch["test_top1"].as_f64().unwrap(),
        epoch["test_hierarchical"].as_f64().unwrap(),
    );
    // Correct predictions score 1 and others at least 0, so hierarchical >= top-1.
    assert!(
        (top1..=1.0).contains(&hier),
        "top-1 {top1}, hierarchical {hier}"
    );
    // CUB's embedding has class ids 1..200: refused, naming the ids that do not match.
    let o = train(embedding.join("cub_flat.unitsphere.npy"), "bad");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("missing ids [\"0\""), "{}", show(&o));
    assert!(stderr(&o).contains("extra ids [\"100\""), "{}", show(&o));
}

/// The reference trains with `cifar100.glove` rows as stored (norms 3.4 to 7.2): loading keeps
/// every row's values, norm included, in the data's class order.
#[test]
fn non_unit_embeddings_load_as_stored() {
    let (ids, dim, values) = reference_embedding("cifar100.glove.pickle");
    let classes: Vec<ClassInfo> = ids
        .iter()
        .rev()
        .map(|id| ClassInfo {
            id: id.to_string(),
            name: format!("class {id}"),
        })
        .collect();
    let path = reference().join("embeddings/cifar100.glove.pickle");
    let loaded = cosine_train::embedding::load(&EmbeddingSpec::File(path), &classes).unwrap();
    assert_eq!(loaded.size(), [classes.len() as i64, dim as i64]);
    let loaded = Vec::<f32>::try_from(loaded.reshape([-1])).unwrap();
    let n = ids.len();
    for (row, _) in ids.iter().rev().enumerate() {
        // Row `row` of the data is row n - 1 - row of the file.
        let stored = &values[(n - 1 - row) * dim..(n - row) * dim];
        let got = &loaded[row * dim..(row + 1) * dim];
        for (a, b) in stored.iter().zip(got) {
            assert!(
                (*a as f32 - b).abs() <= 1e-6 * (a.abs() as f32).max(1.0),
                "row {row}"
            );
        }
    }
    let norm = |r: &[f32]| r.iter().map(|v| v * v).sum::<f32>().sqrt();
    let norms: Vec<f32> = loaded.chunks(dim).map(norm).collect();
    assert!(
        norms.iter().all(|&v| v > 3.0),
        "rows were rescaled: {norms:?}"
    );
}
