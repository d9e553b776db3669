//! Worker threads that turn records into ready batches, in order, through bounded queues.
//!
//! Worker k builds batches k, k + W, k + 2W, ... of an epoch and sends them through its own
//! bounded channel; the consumer takes batch b from worker b mod W. So batches arrive in order,
//! at most `prefetch` are buffered, and which thread built a batch never changes its content.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use datasets_prep::{ShardDir, Split};
use tch::Tensor;

use super::augment::{self, AugmentConfig, Normalize, Source};

/// A batch on the host: images (N, C, H, W) f32 and labels (N) i64.
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Images and labels on `device`; the copy is asynchronous when the batch is page-locked
    /// (the loader pins batches bound for a GPU).
    pub fn to_device(&self, device: tch::Device) -> (Tensor, Tensor) {
        let copy = |t: &Tensor, kind| t.to_device_(device, kind, device.is_cuda(), false);
        (
            copy(&self.images, tch::Kind::Float),
            copy(&self.labels, tch::Kind::Int64),
        )
    }
}

/// What every worker needs to know.
#[derive(Clone)]
pub struct LoaderSpec {
    pub shards: Arc<ShardDir>,
    pub split: Split,
    pub augment: AugmentConfig,
    /// Channels of the batches (grey records are repeated into 3 when this is 3).
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub seed: u64,
    pub workers: usize,
    pub prefetch: usize,
    /// Batches go to a GPU: workers then build them in page-locked memory, so that the copy
    /// can run asynchronously (`Tensor::to_device_` with `non_blocking`).
    pub pinned: bool,
}

/// The batches of one pass, in order.
pub struct EpochBatches {
    receivers: Vec<Receiver<anyhow::Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
}

/// The data's normalisation: the training split's per-channel mean and std (0-255 values).
pub fn normalization(m: &datasets_prep::Manifest) -> (Vec<f32>, Vec<f32>) {
    let mean = m.train_mean.iter().map(|&v| v as f32).collect();
    // A channel without variation (a constant image border) would divide by zero.
    let std = m.train_std.iter().map(|&v| (v as f32).max(1e-3)).collect();
    (mean, std)
}

impl LoaderSpec {
    /// The loader of `split` of `shards`: the data's own normalisation (train-split mean and
    /// std), `channels` as stored, `workers` threads with two batches each buffered, and
    /// page-locked batches when they go to a GPU.
    pub fn new(
        shards: Arc<ShardDir>,
        split: Split,
        augment: AugmentConfig,
        seed: u64,
        workers: usize,
        device: tch::Device,
    ) -> Self {
        let m = shards.manifest();
        let (mean, std) = normalization(m);
        LoaderSpec {
            channels: usize::from(m.channels),
            mean,
            std,
            shards,
            split,
            augment,
            seed,
            workers,
            prefetch: 2 * workers.max(1),
            pinned: device.is_cuda(),
        }
    }

    /// Starts the workers for one pass over `indices` in batches of `batch`; `train` turns
    /// augmentation on with draws seeded by (seed, epoch, index). An index is a record of the
    /// split, or record + k * (the split's length) for the k-th repeat of a record in an epoch
    /// (see [`super::epoch_samples`]).
    pub fn start(
        &self,
        epoch: u64,
        indices: Vec<usize>,
        batch: usize,
        train: bool,
    ) -> EpochBatches {
        let batch = batch.max(1);
        let plan = (0..super::batches(indices.len(), batch))
            .map(|b| b * batch..((b + 1) * batch).min(indices.len()))
            .collect();
        self.start_plan(epoch, Arc::new(indices), plan, train)
    }

    /// Starts the workers for batches `plan[0], plan[1], ...`, each a range of positions in
    /// `indices`. Empty ranges give empty batches (a rank's share of a batch smaller than the
    /// world).
    pub fn start_plan(
        &self,
        epoch: u64,
        indices: Arc<Vec<usize>>,
        plan: Vec<Range<usize>>,
        train: bool,
    ) -> EpochBatches {
        let plan = Arc::new(plan);
        let total = plan.len();
        let workers = self.workers.max(1).min(total.max(1));
        let per_worker = (self.prefetch / workers).max(1);
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for k in 0..workers {
            let (send, receive) = sync_channel(per_worker);
            let spec = self.clone();
            let indices = Arc::clone(&indices);
            let plan = Arc::clone(&plan);
            handles.push(std::thread::spawn(move || {
                for b in (k..total).step_by(workers) {
                    let chunk = &indices[plan[b].clone()];
                    if send.send(spec.build(epoch, chunk, train)).is_err() {
                        return; // the consumer stopped early
                    }
                }
            }));
            receivers.push(receive);
        }
        EpochBatches {
            receivers,
            handles,
            next: 0,
            total,
        }
    }

    fn build(&self, epoch: u64, indices: &[usize], train: bool) -> anyhow::Result<Batch> {
        let reader = self.shards.split(self.split);
        if indices.is_empty() || reader.is_empty() {
            // A rank's empty share of a batch: shaped like the others, so that a forward pass
            // (which synchronised BatchNorm needs on every rank) works on it.
            let (h, w) = match (self.augment.crop, reader.is_empty()) {
                (Some(c), _) => (i64::from(c), i64::from(c)),
                (None, false) => {
                    let r = reader.record(0)?;
                    (i64::from(r.height), i64::from(r.width))
                }
                (None, true) => (1, 1),
            };
            return Ok(Batch {
                images: Tensor::zeros(
                    [0, self.channels as i64, h, w],
                    (tch::Kind::Float, tch::Device::Cpu),
                ),
                labels: Tensor::zeros([0], (tch::Kind::Int64, tch::Device::Cpu)),
            });
        }
        let first = reader.record(indices[0] % reader.len())?;
        let (h, w) = match self.augment.crop {
            Some(c) => (c as usize, c as usize),
            None => (first.height as usize, first.width as usize),
        };
        let c = self.channels;
        let per_image = c * h * w;
        let n = indices.len() as i64;
        // Samples are written straight into the batch tensor (page-locked when bound for a GPU).
        // It is made with `empty` and cleared here: libtorch's own fill would start an OpenMP
        // team for this loader thread, whose spinning threads take cores from training.
        let shape = [n, c as i64, h as i64, w as i64];
        let images = if self.pinned {
            pinned_tensor(&shape, tch::Kind::Float)?
        } else {
            Tensor::empty(shape, tch::kind::FLOAT_CPU)
        };
        let mut labels = Vec::with_capacity(indices.len());
        let norm = Normalize {
            mean: &self.mean,
            std: &self.std,
        };
        {
            let len = indices.len() * per_image;
            let ptr = images.data_ptr() as *mut f32;
            // SAFETY: `images` is a contiguous f32 CPU tensor of exactly `len` elements, created
            // above and not shared until this function returns. The memory is zeroed through
            // the raw pointer before the slice over it is made, and the slice does not outlive
            // this block.
            let buf: &mut [f32] = unsafe {
                std::ptr::write_bytes(ptr, 0, len);
                std::slice::from_raw_parts_mut(ptr, len)
            };
            let records = reader.len();
            for (slot, &key) in indices.iter().enumerate() {
                // A key past the split's end is record key % len in a later pass of the
                // training list (`--train-repeats`): the same image with fresh draws.
                let i = key % records;
                let r = reader.record(i)?;
                if self.augment.crop.is_none() && (r.height as usize, r.width as usize) != (h, w) {
                    bail!(
                        "{} record {i} is {}x{} but the batch's first image is {h}x{w}: images of different sizes need --crop",
                        self.split.name(),
                        r.height,
                        r.width
                    );
                }
                let pixels = r
                    .pixels()
                    .with_context(|| format!("{} record {i}", self.split.name()))?;
                let src = Source {
                    pixels: &pixels,
                    height: r.height as usize,
                    width: r.width as usize,
                    channels: r.channels as usize,
                };
                let mut rng = train.then(|| augment::sample_rng(self.seed, epoch, key as u64));
                augment::process(
                    &src,
                    c,
                    &norm,
                    &self.augment,
                    rng.as_mut(),
                    &mut buf[slot * per_image..(slot + 1) * per_image],
                );
                labels.push(i64::from(r.label));
            }
        }
        let labels = if self.pinned {
            let mut pinned = pinned_tensor(&[n], tch::Kind::Int64)?;
            pinned.copy_(&Tensor::from_slice(&labels));
            pinned
        } else {
            Tensor::from_slice(&labels)
        };
        Ok(Batch { images, labels })
    }
}

fn pinned_tensor(shape: &[i64], kind: tch::Kind) -> anyhow::Result<Tensor> {
    crate::libtorch_shim::empty_pinned(shape, kind)
        .map_err(|e| anyhow::anyhow!("allocating a batch in page-locked memory: {e}"))
}

impl Iterator for EpochBatches {
    type Item = anyhow::Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let k = self.next % self.receivers.len();
        self.next += 1;
        Some(
            self.receivers[k]
                .recv()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a loader thread stopped unexpectedly"))),
        )
    }
}

impl Drop for EpochBatches {
    fn drop(&mut self) {
        self.receivers.clear(); // unblocks workers waiting to send
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
