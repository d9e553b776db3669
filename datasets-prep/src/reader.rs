//! Zero-copy reading of a shard directory: `ShardDir::open` validates everything structural
//! once; afterwards `record(i)` is a bounds-checked slice of a memory map, shareable across
//! threads.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::bounded::{self, ReadError};
use crate::format::{RecordEntry, ShardError, checksum, parse_shard};
use crate::manifest::{Encoding, MAX_MANIFEST_BYTES, Manifest, Split};

/// Why [`Record::pixels`] cannot give a record's pixels.
#[derive(Debug, thiserror::Error)]
pub enum PixelsError {
    #[error(transparent)]
    Decode(#[from] crate::image_ops::ImageError),
    /// (height, width, channels) of the decoded JPEG and of the record table.
    #[error(
        "JPEG is {}x{}x{}, the record table says {}x{}x{}",
        .decoded.0, .decoded.1, .decoded.2, .table.0, .table.1, .table.2
    )]
    ShapeMismatch {
        decoded: (u32, u32, u8),
        table: (u32, u32, u8),
    },
}

/// One image of a split, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    pub bytes: &'a [u8],
    pub label: u32,
    pub height: u32,
    pub width: u32,
    pub channels: u8,
    pub encoding: Encoding,
}

impl Record<'_> {
    /// The pixels as row-major HWC u8 with `self.channels` channels: borrowed for raw storage,
    /// decoded for JPEG. A JPEG whose size or channels disagree with the table is an error.
    pub fn pixels(&self) -> Result<Cow<'_, [u8]>, PixelsError> {
        match self.encoding {
            Encoding::Raw => Ok(Cow::Borrowed(self.bytes)),
            Encoding::Jpeg => {
                let img = crate::image_ops::decode_jpeg(self.bytes)?;
                let decoded = (img.height, img.width, img.channels);
                let table = (self.height, self.width, self.channels);
                if decoded != table {
                    return Err(PixelsError::ShapeMismatch { decoded, table });
                }
                Ok(Cow::Owned(img.data))
            }
        }
    }
}

struct ShardFile {
    path: PathBuf,
    map: Mmap,
    entries: Vec<RecordEntry>,
}

/// The records of one split, across its shard files.
pub struct SplitReader {
    split: Split,
    encoding: Encoding,
    shards: Vec<ShardFile>,
    /// `starts[k]` is the split-wide index of shard k's first record; one more entry at the end.
    starts: Vec<usize>,
}

impl SplitReader {
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `index` of the split.
    pub fn record(&self, index: usize) -> Result<Record<'_>, ShardError> {
        if index >= self.len() {
            return Err(ShardError::IndexOutOfRange {
                split: self.split.name(),
                index,
                len: self.len(),
            });
        }
        let shard_index = self.starts.partition_point(|&s| s <= index) - 1;
        let shard = &self.shards[shard_index];
        let e = shard.entries[index - self.starts[shard_index]];
        let range = e.offset as usize..e.offset as usize + e.length as usize;
        // Validated at open; `get` keeps this safe even if that ever changed.
        let bytes = shard
            .map
            .get(range)
            .ok_or_else(|| ShardError::RecordOutOfBounds {
                path: shard.path.clone(),
                record: (index - self.starts[shard_index]) as u64,
                offset: e.offset,
                length: e.length.into(),
                end: shard.map.len() as u64,
            })?;
        Ok(Record {
            bytes,
            label: e.label,
            height: e.height,
            width: e.width,
            channels: e.channels,
            encoding: self.encoding,
        })
    }

    /// The labels of all records, in order (cheap: from the tables).
    pub fn labels(&self) -> Vec<u32> {
        self.shards
            .iter()
            .flat_map(|s| s.entries.iter().map(|e| e.label))
            .collect()
    }

    /// Shard files with their paths and table entries, for verification.
    pub(crate) fn files(&self) -> impl Iterator<Item = (&Path, &[u8], &[RecordEntry])> {
        self.shards
            .iter()
            .map(|s| (s.path.as_path(), &s.map[..], s.entries.as_slice()))
    }
}

/// An opened, structurally validated shard directory.
pub struct ShardDir {
    root: PathBuf,
    manifest: Manifest,
    train: SplitReader,
    test: SplitReader,
}

impl ShardDir {
    /// Opens `root`: reads and checks the manifest, maps every shard, checks sizes, headers and
    /// record tables against it. Checksums are checked by [`ShardDir::verify_checksums`].
    ///
    /// The shard files are memory-mapped: they must not be modified while open (the packer
    /// never rewrites a finished directory in place; it renames a new one over it).
    pub fn open(root: &Path) -> Result<ShardDir, ShardError> {
        let meta = match std::fs::metadata(root) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShardError::NotAShardDir {
                    path: root.to_path_buf(),
                });
            }
            Err(e) => return Err(ShardError::io(root, e)),
        };
        if !meta.is_dir() {
            return Err(ShardError::NotADirectory {
                path: root.to_path_buf(),
                what: bounded::describe(meta.file_type()),
            });
        }
        let manifest_path = root.join("manifest.json");
        let bytes = match bounded::read_limited(&manifest_path, MAX_MANIFEST_BYTES) {
            Ok(bytes) => bytes,
            Err(ReadError::NotFound { .. }) => {
                return Err(ShardError::NotAShardDir {
                    path: root.to_path_buf(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let manifest = Manifest::parse(&manifest_path, &bytes)?;
        let train = open_split(root, &manifest, Split::Train)?;
        let test = open_split(root, &manifest, Split::Test)?;
        Ok(ShardDir {
            root: root.to_path_buf(),
            manifest,
            train,
            test,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn split(&self, split: Split) -> &SplitReader {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }

    /// Recomputes every shard file's checksum; returns one error per mismatching file.
    pub fn verify_checksums(&self) -> Vec<ShardError> {
        let mut errors = Vec::new();
        for split in Split::ALL {
            let reader = self.split(split);
            for (info, shard) in self.manifest.split(split).shards.iter().zip(&reader.shards) {
                let got = checksum(&shard.map);
                if got != info.xxh3 {
                    errors.push(ShardError::ChecksumMismatch {
                        path: shard.path.clone(),
                        expected: info.xxh3.clone(),
                        got,
                    });
                }
            }
        }
        errors
    }
}

fn open_split(root: &Path, manifest: &Manifest, split: Split) -> Result<SplitReader, ShardError> {
    let info = manifest.split(split);
    let mut shards = Vec::with_capacity(info.shards.len());
    let mut starts = vec![0usize];
    let mut per_class = vec![0u64; manifest.classes.len()];
    for shard in &info.shards {
        let path = root.join(&shard.file);
        let file = bounded::open_regular(&path)?;
        let len = file.metadata().map_err(|e| ShardError::io(&path, e))?.len();
        if len != shard.bytes {
            return Err(ShardError::SizeMismatch {
                path,
                expected: shard.bytes,
                got: len,
            });
        }
        // SAFETY: the map is read-only and the format's contract is that finished shard files
        // are never modified in place (see `ShardDir::open`).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ShardError::io(&path, e))?;
        let layout = parse_shard(&path, &map, manifest.classes.len())?;
        if layout.entries.len() as u64 != shard.records {
            return Err(ShardError::BadManifest {
                path: root.join("manifest.json"),
                reason: format!(
                    "{} lists {} records for {}, the file holds {}",
                    split.name(),
                    shard.records,
                    shard.file,
                    layout.entries.len()
                ),
            });
        }
        for (i, e) in layout.entries.iter().enumerate() {
            per_class[e.label as usize] += 1;
            if manifest.storage.encoding == Encoding::Raw {
                let want = u64::from(e.height) * u64::from(e.width) * u64::from(e.channels);
                if want != u64::from(e.length) {
                    return Err(ShardError::BadRecord {
                        path: path.clone(),
                        record: i as u64,
                        reason: format!(
                            "raw {}x{}x{} image needs {want} bytes, the record has {}",
                            e.height, e.width, e.channels, e.length
                        ),
                    });
                }
            }
            if e.channels > manifest.channels {
                return Err(ShardError::BadRecord {
                    path: path.clone(),
                    record: i as u64,
                    reason: format!(
                        "{} channels in a {}-channel dataset",
                        e.channels, manifest.channels
                    ),
                });
            }
        }
        starts.push(starts.last().copied().unwrap_or(0) + layout.entries.len());
        shards.push(ShardFile {
            path,
            map,
            entries: layout.entries,
        });
    }
    if per_class != info.per_class {
        return Err(ShardError::BadManifest {
            path: root.join("manifest.json"),
            reason: format!(
                "{} per-class counts disagree with the shard files' labels",
                split.name()
            ),
        });
    }
    Ok(SplitReader {
        split,
        encoding: manifest.storage.encoding,
        shards,
        starts,
    })
}
