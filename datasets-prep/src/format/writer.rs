//! The shard writer: lays out and writes a split's shard files (see `FORMAT.md`), streaming
//! records to disk as they come. Beside the parser in [`super`], the only code that knows where
//! the bytes of a shard go.
//!
//! Durability without stalls: each file's ranges are handed to the kernel's write-back as they
//! are written (`writeback::start`), the open shard is flushed in the background every few tens
//! of MB (`writeback::Flusher`), and a closed shard is checksummed and fsynced on a thread of
//! its own while the next one fills.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{RecordEntry, data_offset_for, encode_shard_head};
use crate::manifest::{ShardInfo, Split, SplitInfo};
use crate::writeback::{self, Flusher};

/// Why a shard file cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ShardWriteError {
    /// `op` says what was being done, e.g. "cannot create", "write failed", "fsync failed".
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("shard table too large ({records} records)")]
    TableTooLarge { records: u64 },
    #[error("{bytes} bytes is too large for one record")]
    RecordTooLarge { bytes: usize },
    #[error("a shard closing thread panicked")]
    ClosingPanicked,
}

impl ShardWriteError {
    pub(crate) fn io(
        path: &Path,
        op: &'static str,
    ) -> impl FnOnce(std::io::Error) -> ShardWriteError {
        move |source| ShardWriteError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// Bytes written before their write-back to disk is started (see `writeback`); 4 MiB packed
/// 600 CUB-like images 5-8% faster than 16 MiB here (the disk lags less at the end).
const WRITEBACK_STEP: u64 = 4 << 20;

/// Bytes written to a shard before a background flush to stable storage is asked for (see
/// `writeback::Flusher`).
const FLUSH_STEP: u64 = 32 << 20;

/// Most records in one shard file; bounds the table a writer reserves before it knows the count.
const MAX_RECORDS_PER_SHARD: u64 = 1 << 16;

/// Writes one split's shard files, streaming records to disk as they come: the head (header and
/// table) of each file is reserved for the records still to come, and written last.
pub(crate) struct SplitWriter<'a> {
    dir: &'a Path,
    flusher: &'a Flusher,
    split: Split,
    shard_bytes: u64,
    /// Images of the split not yet given to `push` or `skip`.
    remaining: u64,
    open: Option<OpenShard>,
    /// Closed shards, in order, each being synced and checksummed on its own thread.
    shards: Vec<ClosingShard>,
    per_class: Vec<u64>,
}

type ClosingShard = std::thread::JoinHandle<Result<ShardInfo, ShardWriteError>>;

/// A split whose shard files are all written, some perhaps still on their way to disk.
pub(crate) struct WrittenSplit {
    per_class: Vec<u64>,
    shards: Vec<ClosingShard>,
}

impl WrittenSplit {
    /// Waits until every shard file is on disk and returns the split's description.
    pub(crate) fn wait(self) -> Result<SplitInfo, ShardWriteError> {
        let shards = self
            .shards
            .into_iter()
            .map(|closing| {
                closing
                    .join()
                    .map_err(|_| ShardWriteError::ClosingPanicked)?
            })
            .collect::<Result<Vec<ShardInfo>, _>>()?;
        Ok(SplitInfo {
            count: shards.iter().map(|s| s.records).sum(),
            per_class: self.per_class,
            shards,
        })
    }
}

struct OpenShard {
    file: String,
    path: PathBuf,
    out: std::io::BufWriter<File>,
    data_offset: u64,
    reserved: u64,
    next_offset: u64,
    /// Records before this offset are already on their way to disk.
    written_back: u64,
    /// Where the open shard ended when its last background flush was asked for.
    flush_asked: u64,
    entries: Vec<RecordEntry>,
}

impl<'a> SplitWriter<'a> {
    pub(crate) fn new(
        dir: &'a Path,
        flusher: &'a Flusher,
        split: Split,
        shard_bytes: u64,
        classes: usize,
        items: usize,
    ) -> Self {
        SplitWriter {
            dir,
            flusher,
            split,
            shard_bytes,
            remaining: items as u64,
            open: None,
            shards: Vec::new(),
            per_class: vec![0; classes],
        }
    }

    /// An image that will not be written (left out by --skip-bad).
    pub(crate) fn skip(&mut self) {
        self.remaining = self.remaining.saturating_sub(1);
    }

    /// Appends one record: `bytes` of an image of `label` and shape (height, width, channels).
    pub(crate) fn push(
        &mut self,
        label: usize,
        (height, width, channels): (u32, u32, u8),
        bytes: &[u8],
    ) -> Result<(), ShardWriteError> {
        let length = u32::try_from(bytes.len())
            .map_err(|_| ShardWriteError::RecordTooLarge { bytes: bytes.len() })?;
        let full = self.open.as_ref().is_some_and(|o| {
            o.entries.len() as u64 == o.reserved
                || o.next_offset - o.data_offset + u64::from(length) > self.shard_bytes
        });
        if full {
            self.close()?;
        }
        if self.open.is_none() {
            self.open = Some(self.start()?);
        }
        let o = self.open.as_mut().expect("opened above");
        o.entries.push(RecordEntry {
            offset: o.next_offset,
            length,
            label: label as u32,
            height,
            width,
            channels,
        });
        o.next_offset += u64::from(length);
        o.out
            .write_all(bytes)
            .map_err(ShardWriteError::io(&o.path, "write failed"))?;
        if o.next_offset - o.written_back >= WRITEBACK_STEP {
            o.out
                .flush()
                .map_err(ShardWriteError::io(&o.path, "write failed"))?;
            writeback::start(
                o.out.get_ref(),
                o.written_back,
                o.next_offset - o.written_back,
            );
            o.written_back = o.next_offset;
            if o.next_offset - o.flush_asked >= FLUSH_STEP {
                self.flusher.request(o.out.get_ref(), &o.path);
                o.flush_asked = o.next_offset;
            }
        }
        self.per_class[label] += 1;
        self.remaining = self.remaining.saturating_sub(1);
        Ok(())
    }

    fn start(&self) -> Result<OpenShard, ShardWriteError> {
        let file = format!("{}-{:05}.shard", self.split.name(), self.shards.len());
        let path = self.dir.join(&file);
        let reserved = self.remaining.clamp(1, MAX_RECORDS_PER_SHARD);
        let data_offset = data_offset_for(reserved)
            .ok_or(ShardWriteError::TableTooLarge { records: reserved })?;
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            // Readable too: its checksum is computed through a map of this handle once closed.
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(ShardWriteError::io(&path, "cannot create"))?,
        );
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(data_offset))
            .map_err(ShardWriteError::io(&path, "seek failed"))?;
        Ok(OpenShard {
            file,
            path,
            out,
            data_offset,
            reserved,
            next_offset: data_offset,
            written_back: data_offset,
            flush_asked: data_offset,
            entries: Vec::new(),
        })
    }

    /// Writes the head of the open shard, then computes its checksum and syncs it on a thread
    /// of its own, so that the next records need not wait for the disk.
    pub(crate) fn close(&mut self) -> Result<(), ShardWriteError> {
        let Some(o) = self.open.take() else {
            return Ok(());
        };
        let head = encode_shard_head(&o.entries, o.data_offset);
        let write_err = || ShardWriteError::io(&o.path, "write failed");
        let mut file = o
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(write_err())?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map_err(write_err())?;
        file.write_all(&head).map_err(write_err())?;
        let records = o.entries.len() as u64;
        let (name, path, bytes) = (o.file, o.path, o.next_offset);
        self.shards.push(std::thread::spawn(move || {
            // The checksum is computed from the page cache while the disk is still taking the
            // last writes, then the fsync waits for whatever of them is left.
            // SAFETY: the file was written by this process and is not modified while mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(ShardWriteError::io(&path, "cannot map for its checksum"))?;
            let xxh3 = super::checksum(&map);
            drop(map);
            file.sync_all()
                .map_err(ShardWriteError::io(&path, "fsync failed"))?;
            Ok(ShardInfo {
                file: name,
                records,
                bytes,
                xxh3,
            })
        }));
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<WrittenSplit, ShardWriteError> {
        if self.open.is_none() && self.shards.is_empty() {
            self.open = Some(self.start()?); // an empty split still has one (empty) shard file
        }
        self.close()?;
        Ok(WrittenSplit {
            per_class: self.per_class,
            shards: self.shards,
        })
    }
}
