//! The records of a run directory, as types: `config.json` ([`RunRecord`]) and the lines of
//! `metrics.jsonl` ([`EpochMetrics`], one per epoch, and a closing [`Summary`]). Training writes
//! them and `report` and `eval` read them through these same types, so a renamed field is a
//! compile error, not a silent "-" in a table. The key names are a file format: old run
//! directories must keep reading.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::RunConfig;
use crate::dist::Backend;

/// `config.json`: the resolved configuration and what the run ran on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub config: RunConfig,
    pub world_size: usize,
    pub backend: Backend,
    /// Trainable values.
    pub parameters: i64,
    pub classes: usize,
    pub train_images: u64,
    pub test_images: u64,
    /// The shard directory's dataset name.
    pub dataset: String,
    pub versions: Versions,
}

/// The program that wrote a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub cosine_train: String,
    pub git: String,
    pub libtorch_threads: i32,
}

impl Versions {
    /// This binary's.
    pub fn current() -> Self {
        Versions {
            cosine_train: env!("CARGO_PKG_VERSION").to_string(),
            git: env!("COSINE_GIT_REVISION").to_string(),
            libtorch_threads: tch::get_num_threads(),
        }
    }
}

/// JSON writes non-finite numbers as `null`; read them back as NaN.
fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One epoch of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    /// The learning rate of the epoch's last step.
    #[serde(deserialize_with = "nullable_f64")]
    pub lr: f64,
    /// Mean training loss over the epoch's samples.
    #[serde(deserialize_with = "nullable_f64")]
    pub train_loss: f64,
    /// Training images per second (evaluation excluded).
    #[serde(deserialize_with = "nullable_f64")]
    pub images_per_sec: f64,
    #[serde(deserialize_with = "nullable_f64")]
    pub train_seconds: f64,
    /// Seconds of this epoch's evaluation (BatchNorm statistics included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_seconds: Option<f64>,
    /// Seconds in gradient all-reduce calls (multi-rank runs); on NCCL, whose all-reduces are
    /// queued on the GPU, also the host's waits for the queued steps at each read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_top1: Option<f64>,
    /// Top-1 on the images held out of the training split (`--val-per-class`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_balanced: Option<f64>,
    /// Mean per-class accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_balanced: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_hierarchical: Option<f64>,
    /// cosine-ce: the classification head's top-1 (what `test_top1` reports) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_head_top1: Option<f64>,
    /// ... and the embedding's nearest-class top-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_embedding_top1: Option<f64>,
    /// xxh3 of the evaluated model (parameters and buffers), the same on every rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_checksum: Option<String>,
    /// Wall seconds of the epoch, evaluation included.
    #[serde(deserialize_with = "nullable_f64")]
    pub seconds: f64,
}

/// Only `true`: the marker of the summary line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryMarker;

impl Serialize for SummaryMarker {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(true)
    }
}

impl<'de> Deserialize<'de> for SummaryMarker {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if bool::deserialize(d)? {
            Ok(SummaryMarker)
        } else {
            Err(serde::de::Error::custom("summary must be true"))
        }
    }
}

/// The last line of a finished run's `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub summary: SummaryMarker,
    /// The test top-1 of the selected epoch `best_epoch` (see `selected_on`).
    pub best_top1: Option<f64>,
    pub best_epoch: usize,
    pub last_top1: Option<f64>,
    pub epochs: usize,
    pub world_size: usize,
    /// How `best_epoch` was chosen: "val" (highest validation top-1) or "test" (highest test
    /// top-1, the paper's protocol; what summaries without the field mean).
    #[serde(default = "test_selected")]
    pub selected_on: String,
    /// With a validation split: the selected epoch's validation top-1 ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_top1: Option<f64>,
    /// ... and the highest test top-1 of any epoch, for comparison with test selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_test_top1: Option<f64>,
}

fn test_selected() -> String {
    "test".to_string()
}

/// A line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricsLine {
    Summary(Summary),
    Epoch(Box<EpochMetrics>),
}

/// What a `metrics.jsonl` holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub epochs: Vec<EpochMetrics>,
    pub summary: Option<Summary>,
    /// Lines that could not be read, as "line N: why".
    pub damaged: Vec<String>,
}

impl Metrics {
    /// Parses the text of a `metrics.jsonl`; damaged lines are listed, not fatal.
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if serde_json::from_str::<serde_json::Value>(line).is_err() {
                m.damaged
                    .push(format!("line {}: not JSON (cut short?)", i + 1));
                continue;
            }
            match serde_json::from_str::<MetricsLine>(line) {
                Ok(MetricsLine::Summary(s)) => m.summary = Some(s),
                Ok(MetricsLine::Epoch(e)) => m.epochs.push(*e),
                Err(_) => m
                    .damaged
                    .push(format!("line {}: not an epoch or summary record", i + 1)),
            }
        }
        m
    }

    /// The epochs that were evaluated.
    pub fn evaluated(&self) -> impl Iterator<Item = &EpochMetrics> {
        self.epochs.iter().filter(|e| e.test_top1.is_some())
    }
}

/// Reads `RUN/config.json`.
pub fn read_record(run: &Path) -> anyhow::Result<RunRecord> {
    let path = run.join(super::CONFIG);
    let text = datasets_prep::bounded::read_text_limited(&path, RECORD_LIMIT)
        .with_context(|| format!("cannot read {} (not a run directory?)", super::CONFIG))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not the config.json of a run", path.display()))
}

/// The largest `config.json` read (a real one is a few KiB).
const RECORD_LIMIT: u64 = 16 << 20;
/// The largest `metrics.jsonl` read (a line is ~400 bytes; a million epochs fit).
const METRICS_LIMIT: u64 = 1 << 30;

/// Reads `RUN/metrics.jsonl`.
pub fn read_metrics(run: &Path) -> Result<Metrics, datasets_prep::bounded::ReadError> {
    datasets_prep::bounded::read_limited(&run.join(super::METRICS), METRICS_LIMIT)
        .map(|bytes| Metrics::parse(&String::from_utf8_lossy(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_the_current_format_read_back() {
        let text = concat!(
            r#"{"epoch":1,"images_per_sec":314.8,"lr":0.1,"model_checksum":"6977eb663a098d72","seconds":3.7,"test_balanced":0.077,"test_embedding_top1":0.0941,"test_head_top1":0.077,"test_top1":0.077,"train_loss":1.15,"train_seconds":0.31}"#,
            "\n",
            r#"{"epoch":2,"images_per_sec":835.0,"lr":0.09,"seconds":3.0,"train_loss":null,"train_seconds":0.11}"#,
            "\n",
            r#"{"best_epoch":1,"best_top1":0.077,"epochs":2,"last_top1":0.077,"summary":true,"world_size":1}"#,
            "\n{\"epoch\":3,\"lr\"\n",
            "{\"summary\":false}\n",
        );
        let m = Metrics::parse(text);
        assert_eq!(m.epochs.len(), 2);
        assert_eq!(m.epochs[0].test_embedding_top1, Some(0.0941));
        assert!(m.epochs[1].train_loss.is_nan() && m.epochs[1].test_top1.is_none());
        assert_eq!(m.summary.as_ref().map(|s| s.best_epoch), Some(1));
        assert_eq!(
            m.damaged,
            [
                "line 4: not JSON (cut short?)",
                "line 5: not an epoch or summary record"
            ]
        );
        let line =
            serde_json::to_string(&MetricsLine::Epoch(Box::new(m.epochs[0].clone()))).unwrap();
        assert_eq!(Metrics::parse(&line).epochs[0], m.epochs[0]);
    }
}
