//! `manifest.json`: what a shard directory holds, and the checks that tie it to its files.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::format::{FORMAT_VERSION, ShardError};

/// The manifest's `format` field.
pub const FORMAT_NAME: &str = "cosine-train-shards";
/// Largest manifest accepted; a bigger file is damage, not a dataset (ImageNet's would be a few
/// hundred KB, plus its list of skipped images).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The two splits of every shard directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// How record bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Row-major height x width x channels u8 pixels.
    Raw,
    /// A baseline JPEG file.
    Jpeg,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Dataset name given at pack time (the source name by default).
    pub dataset: String,
    /// The source layout it was packed from, e.g. `cub-sub:5`.
    pub source: String,
    pub created_by: String,
    pub storage: Storage,
    pub resize: Resize,
    /// Channels every image has once decoded for training (grey records of an RGB dataset are
    /// stored with 1 channel and expanded by the reader's user).
    pub channels: u8,
    /// Classes in label order, sorted by original id.
    pub classes: Vec<ClassInfo>,
    /// Training-set subsampling (`--per-class K --seed S`), if any.
    pub selection: Option<Selection>,
    pub train: SplitInfo,
    pub test: SplitInfo,
    /// Per-channel mean of the stored train-split pixels, in 0..255.
    pub train_mean: Vec<f64>,
    /// Per-channel population standard deviation of the stored train-split pixels.
    pub train_std: Vec<f64>,
    /// Images left out by `--skip-bad`.
    pub skipped: Vec<SkippedImage>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub encoding: Encoding,
    pub jpeg_quality: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    /// Shorter side after resizing; `None` means images kept their size.
    pub short_side: Option<u32>,
    pub filter: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassInfo {
    /// The dataset's own class id (e.g. "1".."200" for CUB, the folder name for folders).
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    pub per_class: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitInfo {
    pub count: u64,
    /// Images per class, in label order.
    pub per_class: Vec<u64>,
    pub shards: Vec<ShardInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// File name inside the shard directory.
    pub file: String,
    pub records: u64,
    pub bytes: u64,
    /// xxh3-64 of the whole file, 16 lowercase hex digits.
    pub xxh3: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedImage {
    pub split: String,
    pub path: String,
    pub reason: String,
}

impl Manifest {
    pub fn split(&self, split: Split) -> &SplitInfo {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }

    /// Parses and checks a manifest's own consistency (not yet against the shard files).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest, ShardError> {
        let bad = |reason: String| ShardError::BadManifest {
            path: path.to_path_buf(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT_NAME {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                m.format
            )));
        }
        if m.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (this reader understands {FORMAT_VERSION})",
                m.format_version
            )));
        }
        if m.channels != 1 && m.channels != 3 {
            return Err(bad(format!("channels is {}, expected 1 or 3", m.channels)));
        }
        if m.classes.is_empty() {
            return Err(bad("no classes".into()));
        }
        let mut ids: Vec<&str> = m.classes.iter().map(|c| c.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("class id {:?} appears twice", w[0])));
        }
        for stat in [&m.train_mean, &m.train_std] {
            if stat.len() != m.channels as usize || stat.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "train_mean/train_std need {} finite values, got {stat:?}",
                    m.channels
                )));
            }
        }
        let mut files = std::collections::HashSet::new();
        for split in Split::ALL {
            let info = m.split(split);
            let name = split.name();
            if info.per_class.len() != m.classes.len() {
                return Err(bad(format!(
                    "{name}.per_class has {} entries for {} classes",
                    info.per_class.len(),
                    m.classes.len()
                )));
            }
            let per_class_sum = info
                .per_class
                .iter()
                .try_fold(0u64, |a, &b| a.checked_add(b));
            let shard_sum = info
                .shards
                .iter()
                .try_fold(0u64, |a, s| a.checked_add(s.records));
            if per_class_sum != Some(info.count) || shard_sum != Some(info.count) {
                return Err(bad(format!(
                    "{name}.count is {} but per_class sums to {per_class_sum:?} and shards hold {shard_sum:?}",
                    info.count
                )));
            }
            for shard in &info.shards {
                let plain = !shard.file.is_empty()
                    && shard
                        .file
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && !shard.file.starts_with('.');
                if !plain {
                    return Err(bad(format!(
                        "shard file name {:?} is not a plain file name",
                        shard.file
                    )));
                }
                if !files.insert(shard.file.as_str()) {
                    return Err(bad(format!("shard file {:?} is listed twice", shard.file)));
                }
                if shard.xxh3.len() != 16 || !shard.xxh3.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad(format!(
                        "shard {:?}: xxh3 {:?} is not 16 hex digits",
                        shard.file, shard.xxh3
                    )));
                }
            }
        }
        if m.train.count == 0 {
            return Err(bad("the train split is empty".into()));
        }
        Ok(m)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a manifest always serialises");
        s.push('\n');
        s
    }
}
