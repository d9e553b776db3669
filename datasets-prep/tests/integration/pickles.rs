//! Pickles as Python 3 and numpy write them, protocols 0 to 5 (`tests/fixtures/pickle`, made by
//! its `gen.py`), through the library and through `pack`; hostile pickles are refused.

use std::path::{Path, PathBuf};

use datasets_prep::pickle::{self, NdArray};
use datasets_prep::{ShardDir, Split};

use crate::fixtures::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pickle")
        .join(name)
}

fn array(root: &pickle::Value, key: &str) -> NdArray {
    let v = root.get(key).unwrap_or_else(|| panic!("no {key:?}"));
    pickle::ndarray(&v).unwrap_or_else(|e| panic!("{key:?}: {e}"))
}

/// Protocols 2 (bytes as `_codecs.encode`) and 5 (`_frombuffer`, BYTEARRAY8) were refused
/// while 3 and 4 worked; 0 and 1 as well (str as raw-unicode-escape, `_codecs.encode`).
#[test]
fn numpy_arrays_in_every_protocol() {
    for protocol in 0..=5 {
        let bytes = std::fs::read(fixture(&format!("arrays-p{protocol}.pkl"))).unwrap();
        let root = pickle::parse(&bytes).unwrap_or_else(|e| panic!("protocol {protocol}: {e}"));
        let u1 = array(&root, "u1");
        assert_eq!((&u1.shape[..], u1.dtype.as_str()), (&[2, 3][..], "u1"));
        assert_eq!(
            (u1.data.as_slice(), u1.fortran_order),
            (&[0, 1, 2, 3, 4, 5][..], false)
        );
        let f8 = array(&root, "f8");
        assert_eq!(
            (&f8.shape[..], f8.fortran_order),
            (&[2, 2][..], true),
            "{protocol}"
        );
        assert_eq!(
            f8.to_f64().unwrap(),
            [0.5, 1.5, 2.5, 3.5],
            "protocol {protocol}"
        );
        let empty = array(&root, "empty");
        assert_eq!((&empty.shape[..], empty.data.len()), (&[0, 3][..], 0));
        let labels = root.get("labels").and_then(|l| l.items()).unwrap();
        let labels: Vec<i64> = labels.iter().filter_map(|l| l.as_int()).collect();
        assert_eq!(labels, [1, 0], "protocol {protocol}");
    }
}

/// Copies the CIFAR-10 python batches written with `protocol` into `dir`.
fn cifar10_batches(protocol: u8, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let from = fixture(&format!("cifar10-p{protocol}"));
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
}

#[test]
fn cifar10_python_batches_of_protocols_2_and_5_pack() {
    let tmp = tempfile::tempdir().unwrap();
    for protocol in [2, 5] {
        let root = tmp.path().join(format!("p{protocol}/cifar-10-batches-py"));
        cifar10_batches(protocol, &root);
        let out = tmp.path().join(format!("out{protocol}"));
        pack_ok("cifar10", &root, &out, &[]);
        let shards = ShardDir::open(&out).unwrap();
        let train = shards.split(Split::Train);
        assert_eq!((train.len(), shards.split(Split::Test).len()), (10, 1));
        assert_eq!(train.labels(), (0..10).collect::<Vec<u32>>());
        // Image i, channel c, pixel j is (7 i + 1024 c + j) % 128, stored HWC.
        let r = train.record(4).unwrap();
        let expected: Vec<u8> = (0..1024)
            .flat_map(|j| (0..3).map(move |c| ((28 + 1024 * c + j) % 128) as u8))
            .collect();
        assert_eq!(r.bytes, &expected[..], "protocol {protocol}");
    }
}

/// A batch nested 200,000 deep aborted `pack` with a stack overflow; now it is an error naming
/// the file and the limit.
#[test]
fn a_deeply_nested_pickle_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cifar-10-batches-py");
    cifar10_batches(5, &root);
    let mut deep = b"\x80\x05)".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 200_000));
    deep.push(b'.');
    std::fs::write(root.join("test_batch"), &deep).unwrap();
    let o = pack("cifar10", &root, &tmp.path().join("out"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    for needle in ["test_batch", "values nested deeper than 1000"] {
        assert!(stderr(&o).contains(needle), "{}", show(&o));
    }
}
