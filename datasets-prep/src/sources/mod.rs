//! Raw dataset layouts. Each source reads its metadata into a [`Listing`]: the classes sorted by
//! original id, and the train and test images (files to decode, or pixels already in memory),
//! with the reference implementation's split and class order.

mod cars;
mod cifar;
mod cub;
mod flowers;
mod folder;
mod idx;

pub use idx::{MAX_IDX_BYTES, parse as parse_idx};

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::bounded::{self, ReadError};
use crate::image_ops::Pixels;
use crate::manifest::ClassInfo;

/// Largest metadata text file read (NABirds' images.txt is a few MB).
const MAX_TEXT_BYTES: u64 = 256 << 20;

/// Where an image's pixels come from.
#[derive(Clone, Debug)]
pub enum ImageData {
    /// An encoded file (JPEG, PNG) to decode.
    File(PathBuf),
    /// Pixels from an array file (CIFAR, IDX).
    Pixels(Pixels),
}

/// One image of a split.
#[derive(Clone, Debug)]
pub struct Item {
    /// A name for messages: the path, or `file#record`.
    pub name: String,
    /// Class index into [`Listing::classes`].
    pub label: usize,
    pub data: ImageData,
}

/// What a source found.
#[derive(Debug)]
pub struct Listing {
    pub classes: Vec<ClassInfo>,
    pub train: Vec<Item>,
    pub test: Vec<Item>,
    /// Shorter side to resize to, unless `--short-side` says otherwise (reference-spec 3.2).
    pub default_short_side: Option<u32>,
}

impl Listing {
    /// Adds an image file to the train or test split.
    fn push_file(&mut self, train: bool, label: usize, path: PathBuf) {
        let item = Item {
            name: path.display().to_string(),
            label,
            data: ImageData::File(path),
        };
        if train {
            self.train.push(item)
        } else {
            self.test.push(item)
        }
    }
}

/// A raw dataset layout (`--source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Cub,
    /// CUB with `train_test_split_X.txt`.
    CubSub(String),
    Nab,
    Cars,
    Flowers,
    Mit67,
    Cifar100,
    Cifar10,
    /// MNIST-family IDX files, classes named by their labels.
    Idx,
    /// The IDX layout with a known dataset's class names.
    Mnist,
    FashionMnist,
    Kmnist,
    Folder,
}

pub const SOURCE_NAMES: &str = "cub, cub-sub:X, nab, cars, flowers, mit67, cifar100, cifar10, \
     mnist, fashion-mnist, kmnist, idx, folder";

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "cub" => Source::Cub,
            "nab" => Source::Nab,
            "cars" => Source::Cars,
            "flowers" => Source::Flowers,
            "mit67" => Source::Mit67,
            "cifar100" => Source::Cifar100,
            "cifar10" => Source::Cifar10,
            "idx" => Source::Idx,
            "mnist" => Source::Mnist,
            "fashion-mnist" => Source::FashionMnist,
            "kmnist" => Source::Kmnist,
            "folder" => Source::Folder,
            _ => match s.strip_prefix("cub-sub:") {
                Some(x)
                    if !x.is_empty()
                        && x.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    Source::CubSub(x.to_string())
                }
                _ => {
                    return Err(format!(
                        "unknown source '{s}': expected one of {SOURCE_NAMES}"
                    ));
                }
            },
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Cub => f.write_str("cub"),
            Source::CubSub(x) => write!(f, "cub-sub:{x}"),
            Source::Nab => f.write_str("nab"),
            Source::Cars => f.write_str("cars"),
            Source::Flowers => f.write_str("flowers"),
            Source::Mit67 => f.write_str("mit67"),
            Source::Cifar100 => f.write_str("cifar100"),
            Source::Cifar10 => f.write_str("cifar10"),
            Source::Idx => f.write_str("idx"),
            Source::Mnist => f.write_str("mnist"),
            Source::FashionMnist => f.write_str("fashion-mnist"),
            Source::Kmnist => f.write_str("kmnist"),
            Source::Folder => f.write_str("folder"),
        }
    }
}

impl Source {
    /// The files and folders this source expects under its root, for error messages.
    pub fn layout(&self) -> String {
        match self {
            Source::Cub | Source::Nab => "images.txt (<id> <path>), image_class_labels.txt (<id> <class>), \
                 train_test_split.txt (<id> <1=train|0=test>), images/<path>; optional classes.txt"
                .into(),
            Source::CubSub(x) => format!(
                "the CUB layout with train_test_split_{x}.txt instead of train_test_split.txt: \
                 images.txt, image_class_labels.txt, train_test_split_{x}.txt, images/"
            ),
            Source::Cars => "cars_annos.mat (struct array `annotations` with relative_im_path, class, test; \
                 optional `class_names`) and the images it names (car_ims/...)"
                .into(),
            Source::Flowers => "jpg/image_NNNNN.jpg, imagelabels.mat (`labels`), setid.mat (`trnid`, `valid`, `tstid`)".into(),
            Source::Mit67 => "Images/<class>/<file>, TrainImages.txt and TestImages.txt (<class>/<file> per line)".into(),
            Source::Cifar100 => "the python batches `train`, `test` (optional `meta`) of cifar-100-python, \
                 or the binary batches train.bin, test.bin of cifar-100-binary"
                .into(),
            Source::Cifar10 => "the python batches data_batch_1..5, test_batch (optional batches.meta) of \
                 cifar-10-batches-py, or data_batch_1..5.bin, test_batch.bin of cifar-10-batches-bin"
                .into(),
            Source::Idx | Source::Mnist | Source::FashionMnist | Source::Kmnist => "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, \
                 t10k-labels-idx1-ubyte (each optionally .gz)"
                .into(),
            Source::Folder => "either train/<class>/<image> and test/<class>/<image>, or <class>/<image> \
                 with train.txt and test.txt listing <class>/<image> per line"
                .into(),
        }
    }

    /// Reads the source's metadata under `root`.
    pub fn load(&self, root: &Path) -> Result<Listing, SourceError> {
        if !root.is_dir() {
            return Err(SourceError::Invalid {
                path: root.to_path_buf(),
                reason: format!(
                    "not a directory; the {self} source expects: {}",
                    self.layout()
                ),
            });
        }
        let listing = match self {
            Source::Cub => cub::load(self, root, "train_test_split.txt"),
            Source::CubSub(x) => cub::load(self, root, &format!("train_test_split_{x}.txt")),
            Source::Nab => cub::load(self, root, "train_test_split.txt"),
            Source::Cars => cars::load(self, root),
            Source::Flowers => flowers::load(self, root),
            Source::Mit67 => folder::load_lists(
                self,
                root,
                "Images",
                "TrainImages.txt",
                "TestImages.txt",
                Some(256),
            ),
            Source::Folder => folder::load(self, root),
            Source::Cifar100 => cifar::load(self, root, 100),
            Source::Cifar10 => cifar::load(self, root, 10),
            Source::Idx | Source::Mnist | Source::FashionMnist | Source::Kmnist => {
                idx::load(self, root)
            }
        }?;
        check_listing(&listing, root)?;
        Ok(listing)
    }
}

/// Why a source's metadata cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: missing; the {source_name} source expects under its root: {layout}")]
    MissingFile {
        path: PathBuf,
        source_name: String,
        layout: String,
    },
    #[error("{path}:{line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// A file that is not a regular file, or too large for its kind (see `bounded`).
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl SourceError {
    pub fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        SourceError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// `root/name`, which must exist.
fn required(source: &Source, root: &Path, name: &str) -> Result<PathBuf, SourceError> {
    let path = root.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(SourceError::MissingFile {
            path,
            source_name: source.to_string(),
            layout: source.layout(),
        })
    }
}

/// Reads a regular file of at most `limit` bytes.
fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, SourceError> {
    Ok(bounded::read_limited(path, limit)?)
}

/// Whether `path` names something other than a directory: a file the source reads (if it is a
/// FIFO or a device, reading it says so rather than calling it missing).
fn is_present_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_dir())
}

/// Non-empty lines with their 1-based numbers.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, SourceError> {
    let text = String::from_utf8(read_file(path, MAX_TEXT_BYTES)?)
        .map_err(|e| SourceError::invalid(path, format!("not UTF-8 text: {e}")))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect())
}

/// Splits "key value..." lines into (key, rest), rejecting duplicate keys.
fn key_value_lines(path: &Path) -> Result<Vec<(usize, String, String)>, SourceError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let (key, value) =
            text.split_once(char::is_whitespace)
                .ok_or_else(|| SourceError::BadLine {
                    path: path.to_path_buf(),
                    line,
                    reason: format!("expected '<id> <value>', got {text:?}"),
                })?;
        if !seen.insert(key.to_string()) {
            return Err(SourceError::BadLine {
                path: path.to_path_buf(),
                line,
                reason: format!("duplicate id {key:?}"),
            });
        }
        out.push((line, key.to_string(), value.trim().to_string()));
    }
    Ok(out)
}

/// Sorts integer class ids numerically and builds the class list.
fn integer_classes(
    ids: impl IntoIterator<Item = i64>,
    name_of: impl Fn(i64) -> Option<String>,
) -> Vec<ClassInfo> {
    let mut ids: Vec<i64> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|id| ClassInfo {
            id: id.to_string(),
            name: name_of(id).unwrap_or_else(|| id.to_string()),
        })
        .collect()
}

/// Checks shared by every source: labels in range, listed files present.
fn check_listing(listing: &Listing, root: &Path) -> Result<(), SourceError> {
    if listing.classes.is_empty() {
        return Err(SourceError::invalid(root, "no classes found"));
    }
    for item in listing.train.iter().chain(&listing.test) {
        if item.label >= listing.classes.len() {
            return Err(SourceError::invalid(
                root,
                format!(
                    "{}: label {} out of range for {} classes",
                    item.name,
                    item.label,
                    listing.classes.len()
                ),
            ));
        }
        if let ImageData::File(path) = &item.data {
            match bounded::check_regular(path) {
                Ok(_) => {}
                Err(ReadError::NotFound { .. }) => {
                    return Err(SourceError::invalid(
                        path,
                        "listed in the metadata but absent",
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Whether a file name looks like an image the packer decodes.
fn is_image_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_round_trip() {
        for s in [
            "cub",
            "cub-sub:5",
            "nab",
            "cars",
            "flowers",
            "mit67",
            "cifar100",
            "cifar10",
            "idx",
            "mnist",
            "fashion-mnist",
            "kmnist",
            "folder",
        ] {
            assert_eq!(s.parse::<Source>().unwrap().to_string(), s);
        }
        let err = "imagenet".parse::<Source>().unwrap_err();
        assert!(err.contains("cub-sub:X"), "{err}");
        assert!("cub-sub:".parse::<Source>().is_err());
        assert!("cub-sub:../x".parse::<Source>().is_err());
    }
}
