//! Evaluation on the test split and precise BatchNorm statistics, both shared exactly between
//! ranks: each rank takes a disjoint contiguous slice (no padding, no duplicates) and the counts
//! are summed, so the result is the same for any world size.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use datasets_prep::Split;
use tch::Device;

use super::data_parallel::{DataParallel, share};
use crate::data::batches;
use crate::data::loader::LoaderSpec;
use crate::model::layers::Pass;
use crate::network::Network;

/// Correct predictions per class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalCounts {
    pub total: Vec<u64>,
    pub correct: Vec<u64>,
    /// Cosine+CE: the embedding's nearest-class predictions.
    pub embedding_correct: Option<Vec<u64>>,
    /// With a hierarchy: the sum over samples of S[prediction][truth].
    pub hierarchical_sum: Option<f64>,
    /// Per class: samples whose class is among the 5 best scores.
    pub top5_correct: Vec<u64>,
    /// When asked for: counts by (true class, predicted class), row-major C x C.
    pub confusion: Option<Vec<u64>>,
}

impl EvalCounts {
    pub fn top1(&self) -> f64 {
        ratio(self.correct.iter().sum(), self.total.iter().sum())
    }
    /// Mean of the per-class accuracies (classes without test images left out).
    pub fn balanced(&self) -> f64 {
        let per_class: Vec<f64> = self
            .total
            .iter()
            .zip(&self.correct)
            .filter(|(t, _)| **t > 0)
            .map(|(&t, &c)| c as f64 / t as f64)
            .collect();
        if per_class.is_empty() {
            0.0
        } else {
            per_class.iter().sum::<f64>() / per_class.len() as f64
        }
    }
    pub fn hierarchical(&self) -> Option<f64> {
        let n: u64 = self.total.iter().sum();
        self.hierarchical_sum
            .map(|s| if n == 0 { 0.0 } else { s / n as f64 })
    }
    pub fn top5(&self) -> f64 {
        ratio(self.top5_correct.iter().sum(), self.total.iter().sum())
    }
    pub fn embedding_top1(&self) -> Option<f64> {
        self.embedding_correct
            .as_ref()
            .map(|c| ratio(c.iter().sum(), self.total.iter().sum()))
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Class similarities S (C x C, row-major, manifest class order) from a hierarchy file.
pub fn class_similarity(
    path: &Path,
    is_a: bool,
    classes: &[datasets_prep::manifest::ClassInfo],
) -> anyhow::Result<Vec<f64>> {
    crate::embedding::hierarchy::check_class_count(classes.len(), "--hierarchy")?;
    let h = crate::embedding::hierarchy::Hierarchy::from_file(path, is_a)?;
    let path = path.display();
    let ids: Vec<i64> = classes
        .iter()
        .map(|c| {
            c.id.parse::<i64>().with_context(|| {
                format!(
                    "--hierarchy {path}: class id {:?} of the data is not an integer",
                    c.id
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let leaves = h.leaves();
    let missing: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|i| leaves.binary_search(i).is_err())
        .take(10)
        .collect();
    if !missing.is_empty() {
        bail!(
            "--hierarchy {path}: classes {missing:?} of the data are not leaves of the hierarchy"
        );
    }
    Ok(h.similarity(&ids))
}

/// Evaluates on `records` of the loader's split (`None`: all of them), in order, without
/// augmentation; this rank takes its contiguous share and the counts of all ranks are summed.
/// `similarity` (C x C) adds the hierarchical accuracy; `confusion` the C x C counts of
/// (truth, prediction).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    net: &Network,
    loader: &LoaderSpec,
    records: Option<&[usize]>,
    batch: usize,
    classes: usize,
    device: Device,
    similarity: Option<&[f64]>,
    confusion: bool,
    dp: &DataParallel,
) -> anyhow::Result<EvalCounts> {
    let records: Vec<usize> = match records {
        Some(r) => r.to_vec(),
        None => (0..loader.shards.split(loader.split).len()).collect(),
    };
    let mine = dp.my_share(records.len());
    let mut total = vec![0u64; classes];
    let mut correct = vec![0u64; classes];
    let mut embedding_correct: Option<Vec<u64>> = None;
    let mut hierarchical_sum = 0f64;
    let mut top5 = vec![0u64; classes];
    let mut matrix = confusion.then(|| vec![0u64; classes * classes]);
    let k = classes.min(5) as i64;
    tch::no_grad(|| -> anyhow::Result<()> {
        for b in loader.start(0, records[mine].to_vec(), batch, false) {
            let b = b?;
            let out = net.forward_t(&b.to_device(device).0, false);
            let (pred, embedding_pred) = net.head.predict(&out);
            let scores = net.head.scores(&out);
            let on_device = b.labels.to_device(pred.device());
            let hits = net.head.hits(&scores, &pred, &on_device);
            let hits = Vec::<bool>::try_from(hits.to_device(Device::Cpu))?;
            let labels = Vec::<i64>::try_from(&b.labels)?;
            let pred = Vec::<i64>::try_from(pred.to_device(Device::Cpu))?;
            let embedding_pred = embedding_pred
                .map(|p| Vec::<i64>::try_from(p.to_device(Device::Cpu)))
                .transpose()?;
            let best = scores.topk(k, 1, true, true).1;
            let best = Vec::<i64>::try_from(best.to_device(Device::Cpu).reshape([-1]))?;
            for (k, &y) in labels.iter().enumerate() {
                let y = y as usize;
                total[y] += 1;
                correct[y] += u64::from(hits[k]);
                let row = &best[k * classes.min(5)..(k + 1) * classes.min(5)];
                top5[y] += u64::from(row.contains(&(y as i64)));
                if let Some(m) = matrix.as_mut() {
                    m[y * classes + pred[k] as usize] += 1;
                }
                if let Some(s) = similarity {
                    hierarchical_sum += s[pred[k] as usize * classes + y];
                }
                if let Some(e) = &embedding_pred {
                    embedding_correct.get_or_insert_with(|| vec![0; classes])[y] +=
                        u64::from(e[k] == y as i64);
                }
            }
        }
        Ok(())
    })?;
    if dp.world() == 1 {
        return Ok(EvalCounts {
            total,
            correct,
            embedding_correct,
            hierarchical_sum: similarity.map(|_| hierarchical_sum),
            top5_correct: top5,
            confusion: matrix,
        });
    }
    // One all-reduce: totals, corrects, embedding corrects (+ whether there are any), the
    // hierarchical sum. f64 counts are exact up to 2^53.
    let has_embedding = embedding_correct.is_some();
    let embedding = embedding_correct.unwrap_or_else(|| vec![0; classes]);
    let mut packed: Vec<f64> = total
        .iter()
        .chain(&correct)
        .chain(&embedding)
        .map(|&c| c as f64)
        .collect();
    packed.push(f64::from(u8::from(has_embedding)));
    packed.push(hierarchical_sum);
    packed.extend(top5.iter().map(|&c| c as f64));
    if let Some(m) = &matrix {
        packed.extend(m.iter().map(|&c| c as f64));
    }
    dp.sum_f64(&mut packed, "summing evaluation counts")?;
    let count = |i: usize| packed[i].round() as u64;
    let top5_at = 3 * classes + 2;
    Ok(EvalCounts {
        top5_correct: (top5_at..top5_at + classes).map(count).collect(),
        confusion: matrix.map(|m| {
            let at = top5_at + classes;
            (at..at + m.len()).map(count).collect()
        }),
        total: (0..classes).map(count).collect(),
        correct: (classes..2 * classes).map(count).collect(),
        embedding_correct: (packed[3 * classes] > 0.0)
            .then(|| (2 * classes..3 * classes).map(count).collect()),
        hierarchical_sum: similarity.map(|_| packed[3 * classes + 1]),
    })
}

/// Replaces every BatchNorm's running statistics by their average over one pass of the
/// training images (`records` of the training split, `None`: all), preprocessed as test images
/// are (precise BN). The pass is cut into the same batches for any world size; each rank
/// averages a contiguous run of them and the ranks' averages are combined weighted by their
/// batch counts.
pub fn recompute_bn_statistics(
    net: &Network,
    loader: &LoaderSpec,
    records: Option<&[usize]>,
    batch: usize,
    device: Device,
    dp: &DataParallel,
) -> anyhow::Result<()> {
    let records: Vec<usize> = match records {
        Some(r) => r.to_vec(),
        None => (0..loader.shards.split(Split::Train).len()).collect(),
    };
    let n = records.len();
    let batch = batch.max(1);
    let mine = share(batches(n, batch), dp.world(), dp.rank());
    let plan: Vec<_> = mine
        .clone()
        .map(|b| b * batch..((b + 1) * batch).min(n))
        .collect();
    tch::no_grad(|| -> anyhow::Result<()> {
        let batches = loader.start_plan(0, Arc::new(records), plan, false);
        for (k, b) in (1..).zip(batches) {
            let _ = net.forward(&b?.to_device(device).0, Pass::PreciseStats { batch: k });
        }
        Ok(())
    })?;
    dp.average_bn_buffers(&net.vs, mine.len() as f64)
}
