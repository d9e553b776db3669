//! CIFAR-10 and CIFAR-100, from the python-pickle batches or the binary `.bin` batches.
//! Labels are kept as they are (0..9 / 0..99, CIFAR-100's fine labels).

use std::path::{Path, PathBuf};

use super::{
    ImageData, Item, Listing, Source, SourceError, integer_classes, is_present_file, read_file,
    read_lines,
};
use crate::image_ops::Pixels;
use crate::pickle;

const PIXELS: usize = 32 * 32 * 3;

/// Largest batch file read (CIFAR-100's train batch is 155 MB in either form).
const MAX_BATCH_BYTES: u64 = 1 << 30;

/// Largest `meta` / `batches.meta` read (they hold the class names).
const MAX_META_BYTES: u64 = 16 << 20;

struct Batches {
    train: Vec<PathBuf>,
    test: Vec<PathBuf>,
    binary: bool,
}

/// Finds the batch files in `root` or in the folder the archive extracts to.
fn locate(source: &Source, root: &Path, classes: usize) -> Result<(PathBuf, Batches), SourceError> {
    let (py_train, py_test, bin_train, bin_test, subdirs): (
        Vec<String>,
        &str,
        Vec<String>,
        &str,
        [&str; 2],
    ) = if classes == 100 {
        (
            vec!["train".into()],
            "test",
            vec!["train.bin".into()],
            "test.bin",
            ["cifar-100-python", "cifar-100-binary"],
        )
    } else {
        (
            (1..=5).map(|i| format!("data_batch_{i}")).collect(),
            "test_batch",
            (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            "test_batch.bin",
            ["cifar-10-batches-py", "cifar-10-batches-bin"],
        )
    };
    let candidates = [
        root.to_path_buf(),
        root.join(subdirs[0]),
        root.join(subdirs[1]),
    ];
    for dir in &candidates {
        for (train, test, binary) in [(&py_train, py_test, false), (&bin_train, bin_test, true)] {
            if is_present_file(&dir.join(test))
                && train.iter().all(|t| is_present_file(&dir.join(t)))
            {
                let batches = Batches {
                    train: train.iter().map(|t| dir.join(t)).collect(),
                    test: vec![dir.join(test)],
                    binary,
                };
                return Ok((dir.clone(), batches));
            }
        }
    }
    Err(SourceError::MissingFile {
        path: root.join(py_test),
        source_name: source.to_string(),
        layout: source.layout(),
    })
}

fn chw_to_hwc(chw: &[u8]) -> Pixels {
    let mut data = vec![0u8; PIXELS];
    for c in 0..3 {
        for i in 0..1024 {
            data[i * 3 + c] = chw[c * 1024 + i];
        }
    }
    Pixels {
        height: 32,
        width: 32,
        channels: 3,
        data,
    }
}

fn read_binary(path: &Path, classes: usize) -> Result<Vec<Item>, SourceError> {
    let bytes = read_file(path, MAX_BATCH_BYTES)?;
    let label_bytes = if classes == 100 { 2 } else { 1 };
    let record = label_bytes + PIXELS;
    if bytes.len() % record != 0 {
        return Err(SourceError::invalid(
            path,
            format!(
                "{} bytes is not a whole number of {record}-byte records",
                bytes.len()
            ),
        ));
    }
    let mut items = Vec::with_capacity(bytes.len() / record);
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        // CIFAR-100 records start with the coarse label, then the fine one.
        let label = usize::from(r[label_bytes - 1]);
        if label >= classes {
            return Err(SourceError::invalid(
                path,
                format!("record {i}: label {label} out of range for {classes} classes"),
            ));
        }
        let name = format!("{}#{i}", path.display());
        items.push(Item {
            name,
            label,
            data: ImageData::Pixels(chw_to_hwc(&r[label_bytes..])),
        });
    }
    Ok(items)
}

fn read_python(path: &Path, classes: usize) -> Result<Vec<Item>, SourceError> {
    let bad = |reason: String| SourceError::invalid(path, reason);
    let root = pickle::parse(&read_file(path, MAX_BATCH_BYTES)?).map_err(|e| bad(e.to_string()))?;
    let label_key = if classes == 100 {
        "fine_labels"
    } else {
        "labels"
    };
    let data = root
        .get("data")
        .ok_or_else(|| bad("no 'data' entry (expected a CIFAR python batch)".into()))?;
    let data = pickle::ndarray(&data).map_err(|e| bad(format!("'data': {e}")))?;
    if data.dtype != "u1" || data.shape.len() != 2 || data.shape[1] != PIXELS || data.fortran_order
    {
        return Err(bad(format!(
            "'data' is {:?} of {}, expected N x {PIXELS} uint8",
            data.shape, data.dtype
        )));
    }
    let labels = root
        .get(label_key)
        .and_then(|l| l.items())
        .ok_or_else(|| bad(format!("no '{label_key}' list")))?;
    if labels.len() != data.shape[0] {
        return Err(bad(format!(
            "{} labels for {} images",
            labels.len(),
            data.shape[0]
        )));
    }
    let mut items = Vec::with_capacity(labels.len());
    for (i, (label, chw)) in labels
        .iter()
        .zip(data.data.chunks_exact(PIXELS))
        .enumerate()
    {
        let label = label
            .as_int()
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l < classes)
            .ok_or_else(|| {
                let label = label.as_int().map_or(label.describe(), |l| l.to_string());
                bad(format!(
                    "record {i}: label {label} out of range for {classes} classes"
                ))
            })?;
        items.push(Item {
            name: format!("{}#{i}", path.display()),
            label,
            data: ImageData::Pixels(chw_to_hwc(chw)),
        });
    }
    Ok(items)
}

fn class_names(dir: &Path, classes: usize, binary: bool) -> Vec<String> {
    let names: Option<Vec<String>> = if binary {
        let file = if classes == 100 {
            "fine_label_names.txt"
        } else {
            "batches.meta.txt"
        };
        read_lines(&dir.join(file))
            .ok()
            .map(|l| l.into_iter().map(|(_, n)| n).collect())
    } else {
        let (file, key) = if classes == 100 {
            ("meta", "fine_label_names")
        } else {
            ("batches.meta", "label_names")
        };
        read_file(&dir.join(file), MAX_META_BYTES)
            .ok()
            .and_then(|b| pickle::parse(&b).ok())
            .and_then(|m| m.get(key))
            .and_then(|l| l.items())
            .map(|l| l.iter().map(|n| n.as_text().unwrap_or_default()).collect())
    };
    names.filter(|n| n.len() == classes).unwrap_or_default()
}

pub(super) fn load(source: &Source, root: &Path, classes: usize) -> Result<Listing, SourceError> {
    let (dir, batches) = locate(source, root, classes)?;
    let read = |p: &PathBuf| {
        if batches.binary {
            read_binary(p, classes)
        } else {
            read_python(p, classes)
        }
    };
    let mut train = Vec::new();
    for p in &batches.train {
        train.extend(read(p)?);
    }
    let mut test = Vec::new();
    for p in &batches.test {
        test.extend(read(p)?);
    }
    let names = class_names(&dir, classes, batches.binary);
    let class_list = integer_classes(0..classes as i64, |id| names.get(id as usize).cloned());
    Ok(Listing {
        classes: class_list,
        train,
        test,
        default_short_side: None,
    })
}
