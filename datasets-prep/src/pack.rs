//! `datasets-prep pack`: decode, pre-resize and store every image of a source into a new shard
//! directory, atomically.
//!
//! Images are processed in parallel in fixed-size chunks and written in listing order, so the
//! output is byte-identical whatever the thread count. The directory is built under a temporary
//! sibling name and renamed into place only once complete: an interrupted pack leaves nothing
//! that `verify` or the trainer would accept.

use std::path::{Path, PathBuf};

use fast_image_resize::Resizer;
use rayon::prelude::*;

use crate::atomic::{self, AtomicWriteError};
use crate::buffers::BufferPool;
use crate::format::{ShardWriteError, SplitWriter};
use crate::image_ops::{self, ImageError, Pixels};
use crate::manifest::{
    ClassInfo, Encoding, FORMAT_NAME, Manifest, Resize, Selection, SkippedImage, Split, Storage,
};
use crate::readahead;
use crate::rng::SplitMix64;
use crate::sources::{ImageData, Item, Listing, Source, SourceError};
use crate::writeback::Flusher;

/// Why `pack` failed. Nothing is left at `--out` (an existing directory stays as it was).
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: already exists; pass --force to replace it")]
    OutExists { path: PathBuf },
    #[error("--out {out} is the --root folder: packing into it would replace the dataset")]
    OutIsRoot { out: PathBuf },
    #[error("--out {out} contains --root {root}: replacing it would delete the dataset")]
    OutContainsRoot { out: PathBuf, root: PathBuf },
    /// `--force` replaces only a shard directory this tool wrote; `reason` says why `path` is not.
    #[error(
        "{path}: not a shard directory written by datasets-prep ({reason}); --force replaces only \
         those: remove or rename it yourself, or choose another --out"
    )]
    NotAShardDir { path: PathBuf, reason: String },
    #[error("--quality {quality} is out of range: expected 1..=100")]
    Quality { quality: u8 },
    #[error(
        "--short-side {short_side} is out of range: expected 0 (keep sizes) or {}..={}",
        SHORT_SIDES.start(),
        SHORT_SIDES.end()
    )]
    ShortSide { short_side: u32 },
    #[error("--per-class 0 would leave no training images: expected at least 1")]
    ZeroPerClass,
    #[error("{path}: --out has no file name")]
    NoFileName { path: PathBuf },
    /// The source's metadata cannot be used.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Classes (as `id (name)`) without a training image in the listing.
    #[error(
        "{} class(es) have no training images: {}",
        .classes.len(),
        .classes.join(", ")
    )]
    ClassesWithoutTraining { classes: Vec<String> },
    /// Classes (as `id (name)`) whose every training image was left out by `skip_bad`.
    #[error(
        "after leaving out unreadable images: {} class(es) have no training images: {}",
        .classes.len(),
        .classes.join(", ")
    )]
    ClassesEmptiedBySkips { classes: Vec<String> },
    /// An image that cannot be stored, without `skip_bad`; `image` names it as the listing does
    /// (a path, or `file#record`).
    #[error("{image}: {source} (pass --skip-bad to leave such images out)")]
    Image { image: String, source: StoreError },
    #[error("no training image could be stored ({skipped} skipped)")]
    NoTrainingImage { skipped: usize },
    #[error(transparent)]
    Write(#[from] ShardWriteError),
    /// `manifest.json` cannot be written.
    #[error(transparent)]
    Manifest(#[from] AtomicWriteError),
    #[error("the shard writer thread panicked")]
    WriterPanicked,
    /// `op` says what was being done, e.g. "cannot create", "fsync failed".
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{from}: cannot rename to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

impl PackError {
    /// Whether the options themselves are wrong (a usage error, exit status 2), rather than the
    /// input or the file system.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            PackError::OutIsRoot { .. }
                | PackError::OutContainsRoot { .. }
                | PackError::Quality { .. }
                | PackError::ShortSide { .. }
                | PackError::ZeroPerClass
                | PackError::NoFileName { .. }
        )
    }

    fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> PackError {
        move |source| PackError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// Why one image cannot be stored: with `skip_bad` it is left out, and this is the reason the
/// manifest lists; without, the pack fails with [`PackError::Image`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The item's own name is in the message around it.
    #[error("{}", .source.reason())]
    Read { source: crate::bounded::ReadError },
    #[error("the file was not read")]
    NotRead,
    #[error("cannot decode image: {source}")]
    Decode { source: ImageError },
    #[error("{source}")]
    Resize { source: ImageError },
    #[error("{source}")]
    Encode { source: ImageError },
    #[error(
        "{bytes} bytes is too large for one record (the limit is {}): choose a smaller \
         --short-side",
        image_ops::MAX_RECORD_BYTES
    )]
    TooLarge { bytes: usize },
    /// The JPEG written does not say the size of the pixels it was encoded from.
    #[error("the encoded JPEG is {}x{}x{}, the image {}x{}x{}",
        .encoded.1, .encoded.0, .encoded.2, .image.1, .image.0, .image.2)]
    EncodedShape {
        encoded: (u32, u32, u8),
        image: (u32, u32, u8),
    },
}

/// What `pack` was asked to do.
#[derive(Clone, Debug)]
pub struct PackOptions {
    pub source: Source,
    pub root: PathBuf,
    pub out: PathBuf,
    /// Dataset name for the manifest; the source name when `None`.
    pub name: Option<String>,
    /// `Some(None)` keeps sizes; `None` uses the source's default.
    pub short_side: Option<Option<u32>>,
    pub encoding: Encoding,
    pub jpeg_quality: u8,
    pub per_class: Option<usize>,
    pub seed: u64,
    pub skip_bad: bool,
    pub force: bool,
    /// Target size of one shard file.
    pub shard_bytes: u64,
    pub progress: bool,
}

impl PackOptions {
    pub fn new(source: Source, root: PathBuf, out: PathBuf) -> Self {
        PackOptions {
            source,
            root,
            out,
            name: None,
            short_side: None,
            encoding: Encoding::Raw,
            jpeg_quality: 90,
            per_class: None,
            seed: 0,
            skip_bad: false,
            force: false,
            shard_bytes: 256 << 20,
            progress: false,
        }
    }
}

/// The `--short-side` values accepted besides 0 (keep sizes): a larger one makes records of
/// tens of MB, and allocations of GB for long thin images.
pub const SHORT_SIDES: std::ops::RangeInclusive<u32> = 1..=4096;

/// Images processed per parallel batch: bounds memory, not results.
const CHUNK: usize = 64;

/// Chunks of input files read ahead of the workers (see `readahead`): 256 CUB-like images,
/// about 25 MB, outlast a device flush of this VM's disk (0.1-0.4 s) on 2 cores.
const READ_AHEAD_CHUNKS: usize = 4;

/// What a successful `pack` wrote, and what it found beside it.
#[derive(Clone, Debug)]
pub struct Packed {
    pub manifest: Manifest,
    /// Leftovers of killed packs into the same `--out` (`.NAME.partial-PID`, PID gone) that
    /// were removed.
    pub removed_partials: Vec<PathBuf>,
    /// Such folders of processes still running, left alone.
    pub live_partials: Vec<PathBuf>,
    /// `--per-class` kept every training image: no class has more.
    pub per_class_kept_all: bool,
    /// Records of different sizes in a pack that kept sizes: the first record and the first one
    /// whose size differs from it. Training such a pack needs `--crop`.
    pub mixed_sizes: Option<[SizedImage; 2]>,
}

/// An input image and the size of the record it was stored as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizedImage {
    pub path: String,
    pub height: u32,
    pub width: u32,
}

/// Packs and returns the manifest written.
pub fn pack(opts: &PackOptions) -> Result<Packed, PackError> {
    check_out(opts)?;
    if opts.jpeg_quality == 0 || opts.jpeg_quality > 100 {
        return Err(PackError::Quality {
            quality: opts.jpeg_quality,
        });
    }
    if let Some(Some(short_side)) = opts.short_side
        && !SHORT_SIDES.contains(&short_side)
    {
        return Err(PackError::ShortSide { short_side });
    }
    let mut listing = opts.source.load(&opts.root)?;
    let mut kept_all = false;
    if let Some(k) = opts.per_class {
        if k == 0 {
            return Err(PackError::ZeroPerClass);
        }
        kept_all = train_counts(&listing).iter().all(|&n| n <= k);
        listing.train = select_per_class(
            std::mem::take(&mut listing.train),
            listing.classes.len(),
            k,
            opts.seed,
        );
    }
    let empty = classes_without_training(&listing.classes, &train_counts(&listing));
    if !empty.is_empty() {
        return Err(PackError::ClassesWithoutTraining { classes: empty });
    }
    let short_side = opts.short_side.unwrap_or(listing.default_short_side);

    let parent = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = opts
        .out
        .file_name()
        .ok_or_else(|| PackError::NoFileName {
            path: opts.out.clone(),
        })?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&parent).map_err(PackError::io(&parent, "cannot create"))?;
    let (removed_partials, live_partials) = clean_partials(&parent, &file_name)?;
    let tmp = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(PackError::io(&tmp, "cannot create"))?;
    let result = pack_into(opts, &listing, short_side, &tmp).and_then(|m| {
        replace_dir(&tmp, &opts.out)?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let (manifest, mixed_sizes) = result?;
    Ok(Packed {
        manifest,
        removed_partials,
        live_partials,
        per_class_kept_all: kept_all,
        mixed_sizes,
    })
}

/// Removes the `.NAME.partial-PID` folders that killed packs into the same `--out` left in
/// `parent`, when no process PID is running; returns (removed, left for running processes).
/// Only folders named exactly so are touched, and never this process's own.
fn clean_partials(
    parent: &Path,
    file_name: &str,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), PackError> {
    let prefix = format!(".{file_name}.partial-");
    let (mut removed, mut live) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(parent).map_err(PackError::io(parent, "cannot list"))? {
        let entry = entry.map_err(PackError::io(parent, "cannot list"))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = parse_pid(pid) else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || pid == std::process::id() {
            continue;
        }
        let path = entry.path();
        if process_alive(pid) {
            live.push(path);
        } else {
            std::fs::remove_dir_all(&path).map_err(PackError::io(&path, "cannot remove"))?;
            removed.push(path);
        }
    }
    Ok((removed, live))
}

/// A process id as `pack` writes it: decimal digits only.
fn parse_pid(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Whether process `pid` exists (in doubt, yes: its folder is then left alone).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false; // beyond any process id
    };
    if pid <= 0 {
        return true; // kill() would address a process group
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let status = unsafe { libc::kill(pid, 0) };
    status == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn pack_into(
    opts: &PackOptions,
    listing: &Listing,
    short_side: Option<u32>,
    dir: &Path,
) -> Result<(Manifest, Option<[SizedImage; 2]>), PackError> {
    let total = (listing.train.len() + listing.test.len()) as u64;
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:40}] {pos}/{len} images, {rate}, eta {eta}",
        )
        .expect("static template")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} images/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    let mut skipped = Vec::new();
    let mut stats = PixelStats::default();
    let mut sizes = SizeWatch::default();
    // One stream of work over both splits, train first, so that the workers never wait for a
    // split's last images to be written before the next split starts.
    let splits = [(Split::Train, &listing.train), (Split::Test, &listing.test)];
    let work: Vec<(Split, &Item)> = splits
        .into_iter()
        .flat_map(|(split, items)| items.iter().map(move |item| (split, item)))
        .collect();
    let flusher = Flusher::new();
    // Enough spare buffers for every image in flight: one chunk decoding, one waiting, one
    // being written.
    let pool = BufferPool::new(3 * CHUNK);
    let mut writers = splits.map(|(split, items)| {
        SplitWriter::new(
            dir,
            &flusher,
            split,
            opts.shard_bytes,
            listing.classes.len(),
            items.len(),
        )
    });
    // Workers decode and resize chunk k+1 while the writer thread stores chunk k.
    let (send, receive) = std::sync::mpsc::sync_channel::<Vec<Result<Stored, StoreError>>>(1);
    std::thread::scope(|scope| -> Result<(), PackError> {
        let writing = scope.spawn(|| -> Result<(), PackError> {
            let mut current = None;
            for (chunk, processed) in work.chunks(CHUNK).zip(receive) {
                for (&(split, item), result) in chunk.iter().zip(processed) {
                    if current != Some(split) {
                        if split == Split::Test {
                            // The train split is complete: its last shard can go to disk now.
                            writers[Split::Train as usize].close()?;
                        }
                        bar.set_prefix(split.name());
                        current = Some(split);
                    }
                    let writer = &mut writers[split as usize];
                    match result {
                        Ok(stored) => {
                            if split == Split::Train {
                                stats.add(&stored.sums);
                            }
                            let shape = (stored.height, stored.width, stored.channels);
                            sizes.see(&item.name, stored.height, stored.width);
                            writer.push(item.label, shape, &stored.bytes)?;
                            pool.give(stored.bytes);
                        }
                        Err(reason) if opts.skip_bad => {
                            writer.skip();
                            skipped.push(SkippedImage {
                                split: split.name().into(),
                                path: item.name.clone(),
                                reason: reason.to_string(),
                            });
                        }
                        Err(source) => {
                            return Err(PackError::Image {
                                image: item.name.clone(),
                                source,
                            });
                        }
                    }
                    bar.inc(1);
                }
            }
            Ok(())
        });
        // The loader reads the input files of the next chunks while this one is decoded.
        let (send_inputs, receive_inputs) = std::sync::mpsc::sync_channel(READ_AHEAD_CHUNKS);
        let all = &work;
        scope.spawn(move || {
            for chunk in all.chunks(CHUNK) {
                let items = chunk.iter().map(|&(_, item)| item);
                if send_inputs.send(readahead::read_chunk(items)).is_err() {
                    break; // the workers stopped
                }
            }
        });
        for (chunk, inputs) in work.chunks(CHUNK).zip(receive_inputs) {
            let processed = chunk
                .par_iter()
                .zip(inputs)
                .map_init(Resizer::new, |r, (&(split, item), input)| {
                    store(
                        item,
                        input,
                        short_side,
                        opts,
                        split == Split::Train,
                        r,
                        &pool,
                    )
                })
                .collect();
            if send.send(processed).is_err() {
                break; // the writer stopped on an error, reported below
            }
        }
        drop(send);
        writing.join().map_err(|_| PackError::WriterPanicked)?
    })?;
    let [train, test] = writers;
    let (train, test) = (train.finish()?, test.finish()?);
    // The shards' fsyncs and checksums ran in the background; wait for the last of them.
    bar.set_prefix("syncing");
    let (train, test) = (train.wait()?, test.wait()?);
    flusher.finish()?;
    bar.finish_and_clear();
    if train.count == 0 {
        return Err(PackError::NoTrainingImage {
            skipped: skipped.len(),
        });
    }
    let channels = stats.channels();
    let (train_mean, train_std) = stats.mean_std(channels);
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: crate::format::FORMAT_VERSION,
        dataset: opts
            .name
            .clone()
            .unwrap_or_else(|| opts.source.to_string().replace(':', "-")),
        source: opts.source.to_string(),
        created_by: format!("datasets-prep {}", env!("CARGO_PKG_VERSION")),
        storage: Storage {
            encoding: opts.encoding,
            jpeg_quality: (opts.encoding == Encoding::Jpeg).then_some(opts.jpeg_quality),
        },
        resize: Resize {
            short_side,
            filter: image_ops::RESIZE_FILTER.into(),
        },
        channels,
        classes: listing.classes.clone(),
        selection: opts.per_class.map(|per_class| Selection {
            per_class,
            seed: opts.seed,
        }),
        train,
        test,
        train_mean,
        train_std,
        skipped,
    };
    let counts: Vec<usize> = (manifest.train.per_class.iter())
        .map(|&c| c as usize)
        .collect();
    let empty = classes_without_training(&manifest.classes, &counts);
    if !empty.is_empty() {
        return Err(PackError::ClassesEmptiedBySkips { classes: empty });
    }
    // Written last and atomically: a directory with a manifest.json holds every shard it names,
    // even under its temporary name. Syncing `dir` for the manifest's rename also makes the
    // shard files' entries durable.
    atomic::write_file(&dir.join("manifest.json"), manifest.to_json().as_bytes())?;
    Ok((manifest, sizes.mixed()))
}

/// The first stored record, and the first one of another size.
#[derive(Default)]
struct SizeWatch {
    first: Option<SizedImage>,
    other: Option<SizedImage>,
}

impl SizeWatch {
    fn see(&mut self, path: &str, height: u32, width: u32) {
        let sized = || SizedImage {
            path: path.to_string(),
            height,
            width,
        };
        match &self.first {
            None => self.first = Some(sized()),
            Some(f) if self.other.is_none() && (f.height, f.width) != (height, width) => {
                self.other = Some(sized())
            }
            Some(_) => {}
        }
    }

    fn mixed(self) -> Option<[SizedImage; 2]> {
        Some([self.first?, self.other?])
    }
}

/// Keeps `k` training images per class, chosen by a seeded shuffle per class, in listing order.
pub fn select_per_class(items: Vec<Item>, classes: usize, k: usize, seed: u64) -> Vec<Item> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, item) in items.iter().enumerate() {
        by_class[item.label].push(i);
    }
    let mut keep = vec![false; items.len()];
    for (class, mut indices) in by_class.into_iter().enumerate() {
        SplitMix64::stream(seed, class as u64).shuffle(&mut indices);
        for &i in indices.iter().take(k) {
            keep[i] = true;
        }
    }
    items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, k)| k.then_some(item))
        .collect()
}

/// Training images per class of the listing.
fn train_counts(listing: &Listing) -> Vec<usize> {
    let mut counts = vec![0usize; listing.classes.len()];
    for item in &listing.train {
        counts[item.label] += 1;
    }
    counts
}

/// The classes, as `id (name)`, whose count is zero.
fn classes_without_training(classes: &[ClassInfo], counts: &[usize]) -> Vec<String> {
    classes
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n == 0)
        .map(|(c, _)| format!("{} ({})", c.id, c.name))
        .collect()
}

/// One image ready to be written.
struct Stored {
    bytes: Vec<u8>,
    height: u32,
    width: u32,
    channels: u8,
    /// Pixel sums of the image as stored (before JPEG encoding), for the train statistics.
    sums: ChannelSums,
}

/// Per-channel sums of one image's pixels and of their squares (exact integers).
#[derive(Clone, Copy, Debug, Default)]
struct ChannelSums {
    channels: u8,
    sum: [u64; 3],
    squares: [u64; 3],
    pixels: u64,
}

impl ChannelSums {
    fn of(p: &Pixels) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { Self::of_avx2(p) };
        }
        Self::of_any_cpu(p)
    }

    /// The same loop compiled for AVX2: twice the lanes of the baseline x86-64 build's SSE2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn of_avx2(p: &Pixels) -> Self {
        Self::of_any_cpu(p)
    }

    #[inline(always)]
    fn of_any_cpu(p: &Pixels) -> Self {
        // Lane-wise u32 accumulators over 48-byte blocks (48 is a multiple of 1 and 3, so lane j
        // always holds channel j % channels); this vectorises, unlike a per-pixel loop. Flushed
        // to u64 before a lane's sum of squares could overflow (1024 * 255^2 < 2^32).
        const LANES: usize = 48;
        const BLOCKS_PER_FLUSH: usize = 1024;
        let c = usize::from(p.channels);
        let mut s = ChannelSums {
            channels: p.channels,
            pixels: (p.data.len() / c) as u64,
            ..Default::default()
        };
        let blocks = p.data.chunks_exact(LANES);
        let tail = blocks.remainder();
        let mut flush = |sum: &mut [u32; LANES], sq: &mut [u32; LANES]| {
            for j in 0..LANES {
                s.sum[j % c] += u64::from(sum[j]);
                s.squares[j % c] += u64::from(sq[j]);
            }
            *sum = [0; LANES];
            *sq = [0; LANES];
        };
        let (mut sum, mut sq) = ([0u32; LANES], [0u32; LANES]);
        for (k, block) in blocks.enumerate() {
            for j in 0..LANES {
                let v = u32::from(block[j]);
                sum[j] += v;
                sq[j] += v * v;
            }
            if k % BLOCKS_PER_FLUSH == BLOCKS_PER_FLUSH - 1 {
                flush(&mut sum, &mut sq);
            }
        }
        flush(&mut sum, &mut sq);
        let done = p.data.len() - tail.len();
        for (i, &v) in tail.iter().enumerate() {
            s.sum[(done + i) % c] += u64::from(v);
            s.squares[(done + i) % c] += u64::from(v) * u64::from(v);
        }
        s
    }
}

fn store(
    item: &Item,
    input: readahead::Input,
    short_side: Option<u32>,
    opts: &PackOptions,
    train: bool,
    resizer: &mut Resizer,
    pool: &BufferPool,
) -> Result<Stored, StoreError> {
    let pixels = match (&item.data, input) {
        (_, Some(bytes)) => {
            let bytes = bytes.map_err(|source| StoreError::Read { source })?;
            image_ops::decode_image(&bytes, pool).map_err(|source| StoreError::Decode { source })?
        }
        (ImageData::Pixels(p), None) => p.clone(),
        (ImageData::File(_), None) => return Err(StoreError::NotRead),
    };
    let pixels = match short_side {
        Some(target) => image_ops::resize_short_side(pixels, target, resizer, pool)
            .map_err(|source| StoreError::Resize { source })?,
        None => pixels,
    };
    // Statistics are of the train split only.
    let sums = if train {
        ChannelSums::of(&pixels)
    } else {
        ChannelSums::default()
    };
    let (height, width, channels) = (pixels.height, pixels.width, pixels.channels);
    if pixels.data.len() as u64 > image_ops::MAX_RECORD_BYTES {
        return Err(StoreError::TooLarge {
            bytes: pixels.data.len(),
        });
    }
    let bytes = match opts.encoding {
        Encoding::Raw => pixels.data,
        Encoding::Jpeg => {
            let encoded = image_ops::encode_jpeg(&pixels, opts.jpeg_quality);
            pool.give(pixels.data);
            let encoded = encoded.map_err(|source| StoreError::Encode { source })?;
            let shape =
                image_ops::jpeg_shape(&encoded).map_err(|source| StoreError::Encode { source })?;
            if shape != (height, width, channels) {
                return Err(StoreError::EncodedShape {
                    encoded: shape,
                    image: (height, width, channels),
                });
            }
            encoded
        }
    };
    Ok(Stored {
        bytes,
        height,
        width,
        channels,
        sums,
    })
}

/// Exact per-channel pixel sums of the train split (integers, so order does not matter).
#[derive(Default)]
struct PixelStats {
    rgb: [(u128, u128); 3],
    rgb_count: u128,
    grey: (u128, u128),
    grey_count: u128,
}

impl PixelStats {
    fn add(&mut self, s: &ChannelSums) {
        if s.channels == 1 {
            self.grey.0 += u128::from(s.sum[0]);
            self.grey.1 += u128::from(s.squares[0]);
            self.grey_count += u128::from(s.pixels);
        } else {
            for (total, (&sum, &sq)) in self.rgb.iter_mut().zip(s.sum.iter().zip(&s.squares)) {
                total.0 += u128::from(sum);
                total.1 += u128::from(sq);
            }
            self.rgb_count += u128::from(s.pixels);
        }
    }

    /// 3 if any stored image is RGB, else 1.
    fn channels(&self) -> u8 {
        if self.rgb_count > 0 { 3 } else { 1 }
    }

    /// Grey images count as equal R, G and B in an RGB dataset.
    fn mean_std(&self, channels: u8) -> (Vec<f64>, Vec<f64>) {
        let finish = |sum: u128, sq: u128, n: u128| -> (f64, f64) {
            if n == 0 {
                return (0.0, 0.0);
            }
            let mean = sum as f64 / n as f64;
            let var = (sq as f64 / n as f64 - mean * mean).max(0.0);
            (mean, var.sqrt())
        };
        if channels == 1 {
            let (m, s) = finish(self.grey.0, self.grey.1, self.grey_count);
            return (vec![m], vec![s]);
        }
        (0..3)
            .map(|c| {
                finish(
                    self.rgb[c].0 + self.grey.0,
                    self.rgb[c].1 + self.grey.1,
                    self.rgb_count + self.grey_count,
                )
            })
            .unzip()
    }
}

fn sync_dir(dir: &Path) -> Result<(), PackError> {
    atomic::sync_dir(dir).map_err(PackError::io(dir, "fsync failed"))
}

/// Moves the finished `tmp` directory to `out`, replacing an existing `out` (only reached with
/// `--force`, after [`check_out`] found it to be a shard directory) so that at every moment one
/// complete directory exists under one of the names. Of the replaced directory only the files
/// this tool writes are removed: anything else found there is left, with the directory.
fn replace_dir(tmp: &Path, out: &Path) -> Result<(), PackError> {
    if std::fs::symlink_metadata(out).is_ok() {
        let old = out.with_file_name(format!(
            ".{}.old-{}",
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(out, &old).map_err(PackError::io(out, "cannot move aside"))?;
        rename(tmp, out)?;
        remove_shard_dir(&old)?;
    } else {
        rename(tmp, out)?;
    }
    // The rename is durable once the directory holding both names is synced ("" for a bare
    // name means the current directory).
    match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
        _ => sync_dir(Path::new("."))?,
    }
    Ok(())
}

/// Removes `manifest.json` and the shard files of `dir`, then `dir` itself if that left it empty.
fn remove_shard_dir(dir: &Path) -> Result<(), PackError> {
    let entries = std::fs::read_dir(dir).map_err(PackError::io(dir, "cannot list"))?;
    for entry in entries {
        let entry = entry.map_err(PackError::io(dir, "cannot list"))?;
        let ours = entry.file_name().to_str().is_some_and(is_own_file_name);
        if ours && entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(PackError::io(&path, "cannot remove"))?;
        }
    }
    std::fs::remove_dir(dir).map_err(PackError::io(
        dir,
        "cannot remove the replaced directory (files datasets-prep did not write appeared in it; \
         they are left there)",
    ))
}

/// The names of the files `pack` writes into a shard directory.
fn is_own_file_name(name: &str) -> bool {
    if name == "manifest.json" {
        return true;
    }
    let Some(stem) = name.strip_suffix(".shard") else {
        return false;
    };
    let digits = stem
        .strip_prefix("train-")
        .or_else(|| stem.strip_prefix("test-"));
    digits.is_some_and(|d| d.len() >= 5 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Refuses, before anything is touched, an `--out` that is or contains `--root`, an existing
/// `--out` without `--force`, and with it one that is not a shard directory this tool wrote.
fn check_out(opts: &PackOptions) -> Result<(), PackError> {
    if let (Ok(root), Some(out)) = (std::fs::canonicalize(&opts.root), resolve(&opts.out)) {
        if out == root {
            return Err(PackError::OutIsRoot {
                out: opts.out.clone(),
            });
        }
        if root.starts_with(&out) {
            return Err(PackError::OutContainsRoot {
                out: opts.out.clone(),
                root: opts.root.clone(),
            });
        }
    }
    let meta = match std::fs::symlink_metadata(&opts.out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PackError::io(&opts.out, "cannot inspect")(e)),
    };
    if !opts.force {
        return Err(PackError::OutExists {
            path: opts.out.clone(),
        });
    }
    check_own_shard_dir(&opts.out, &meta)
}

/// Whether `dir` is a shard directory this tool wrote: a directory holding a `manifest.json`
/// that parses, and otherwise only shard files (or nothing at all).
fn check_own_shard_dir(dir: &Path, meta: &std::fs::Metadata) -> Result<(), PackError> {
    let refuse = |reason: String| PackError::NotAShardDir {
        path: dir.to_path_buf(),
        reason,
    };
    if !meta.is_dir() {
        return Err(refuse(format!(
            "it is {}",
            crate::bounded::describe(meta.file_type())
        )));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(PackError::io(dir, "cannot list"))? {
        let entry = entry.map_err(PackError::io(dir, "cannot list"))?;
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        match name.to_str() {
            Some(n) if is_file && is_own_file_name(n) => names.push(n.to_string()),
            _ => {
                return Err(refuse(format!(
                    "it holds {}, which datasets-prep does not write",
                    entry.path().display()
                )));
            }
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    if !names.iter().any(|n| n == "manifest.json") {
        return Err(refuse("it has shard files but no manifest.json".into()));
    }
    let path = dir.join("manifest.json");
    let bytes = crate::bounded::read_limited(&path, crate::manifest::MAX_MANIFEST_BYTES)
        .map_err(|e| refuse(format!("its manifest.json cannot be read: {e}")))?;
    Manifest::parse(&path, &bytes).map_err(|e| {
        refuse(format!(
            "its manifest.json is not one datasets-prep writes: {e}"
        ))
    })?;
    Ok(())
}

/// `path` made absolute with symbolic links resolved, also when it does not exist yet: its
/// nearest existing ancestor is canonicalised and the rest of the path appended.
fn resolve(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    let mut missing = Vec::new();
    let mut base = absolute.as_path();
    loop {
        if let Ok(mut real) = std::fs::canonicalize(base) {
            real.extend(missing.iter().rev());
            return Some(real);
        }
        missing.push(base.file_name()?);
        base = base.parent()?;
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), PackError> {
    std::fs::rename(from, to).map_err(|source| PackError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_plain_decimal_and_this_process_is_alive() {
        assert_eq!(parse_pid("1234"), Some(1234));
        for bad in ["", "+12", "12x", "-1", " 12", "99999999999"] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }

    #[test]
    fn own_file_names_are_the_manifest_and_shards_only() {
        for name in [
            "manifest.json",
            "train-00000.shard",
            "test-00012.shard",
            "test-123456.shard",
        ] {
            assert!(is_own_file_name(name), "{name}");
        }
        for name in [
            "notes.txt",
            "train-0000.shard",
            "train-0000x.shard",
            "val-00000.shard",
            "train-00000.shard.bak",
            ".manifest.json.tmp-1-0",
        ] {
            assert!(!is_own_file_name(name), "{name}");
        }
    }

    #[test]
    fn channel_sums_match_a_per_pixel_loop() {
        let mut rng = SplitMix64::new(7);
        // Lengths around the 48-byte blocks and past the 1024-block flush, grey and colour.
        for (channels, pixels) in [
            (1u8, 1),
            (1, 47),
            (3, 16),
            (3, 17),
            (1, 60_000),
            (3, 20_011),
        ] {
            let data: Vec<u8> = (0..pixels * usize::from(channels))
                .map(|_| rng.next_u64() as u8)
                .collect();
            let mut sum = [0u64; 3];
            let mut squares = [0u64; 3];
            for (i, &v) in data.iter().enumerate() {
                sum[i % usize::from(channels)] += u64::from(v);
                squares[i % usize::from(channels)] += u64::from(v) * u64::from(v);
            }
            let p = Pixels {
                height: 1,
                width: pixels as u32,
                channels,
                data,
            };
            for s in [ChannelSums::of(&p), ChannelSums::of_any_cpu(&p)] {
                assert_eq!((s.sum, s.squares), (sum, squares), "{channels} x {pixels}");
                assert_eq!(s.pixels, pixels as u64);
            }
        }
    }
}
