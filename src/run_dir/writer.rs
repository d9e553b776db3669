//! The files rank 0 appends to while a run trains: `metrics.jsonl` (one record per line),
//! `log.txt`, and a TensorBoard event file with the same epochs as scalars.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use super::records::{EpochMetrics, MetricsLine};
use super::tensorboard::EventWriter;
use super::{LOG, METRICS};

/// Appends lines to `metrics.jsonl` and `log.txt`, flushing each.
pub struct RunWriter {
    metrics: std::fs::File,
    log: std::fs::File,
    /// A new event file per process (a resumed run adds one; TensorBoard merges them).
    events: EventWriter,
    echo: bool,
}

impl RunWriter {
    pub fn open(out: &Path, echo: bool) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let path = out.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("{}: cannot open", path.display()))
        };
        Ok(RunWriter {
            metrics: open(METRICS)?,
            log: open(LOG)?,
            events: EventWriter::create(out)?,
            echo,
        })
    }
    /// Tells TensorBoard that the run restarts at `epoch` (1-based): the earlier event files'
    /// scalars from that epoch on, written after the checkpoint resumed from, are then hidden.
    pub fn restart_at_epoch(&mut self, epoch: usize) -> anyhow::Result<()> {
        self.events.session_start(epoch as i64)?;
        Ok(self.events.flush()?)
    }

    /// Cuts `metrics.jsonl` back to `bytes` (what a checkpoint covered), so that a resumed run
    /// does not repeat lines written after it.
    pub fn truncate_metrics(out: &Path, bytes: u64) -> anyhow::Result<()> {
        let path = out.join(METRICS);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < bytes {
            anyhow::bail!(
                "{}: is {len} bytes, shorter than the {bytes} the checkpoint covers (lost lines?)",
                path.display()
            );
        }
        f.set_len(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("{}: cannot truncate", path.display()))
    }

    /// Current length of `metrics.jsonl`.
    pub fn metrics_len(&self) -> u64 {
        self.metrics.metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Appends one record to `metrics.jsonl`.
    pub fn metric(&mut self, line: &MetricsLine) -> anyhow::Result<()> {
        let text = serde_json::to_string(line).context("encoding a metrics record")?;
        writeln!(self.metrics, "{text}")
            .and_then(|_| self.metrics.flush())
            .context("writing metrics.jsonl")?;
        if let MetricsLine::Epoch(epoch) = line {
            self.scalars(epoch)?;
        }
        Ok(())
    }

    /// The epoch's figures as TensorBoard scalars, at step = the 1-based epoch.
    fn scalars(&mut self, m: &EpochMetrics) -> anyhow::Result<()> {
        let step = m.epoch as i64;
        let mut figures = vec![
            ("train/loss", m.train_loss),
            ("train/lr", m.lr),
            ("train/images_per_sec", m.images_per_sec),
        ];
        let optional = [
            ("test/top1", m.test_top1),
            ("test/balanced", m.test_balanced),
            ("test/hierarchical", m.test_hierarchical),
            ("test/embedding_top1", m.test_embedding_top1),
            ("time/eval_seconds", m.eval_seconds),
        ];
        figures.extend(optional.into_iter().filter_map(|(t, v)| v.map(|v| (t, v))));
        for (tag, value) in figures {
            self.events.scalar(tag, step, value as f32)?;
        }
        Ok(self.events.flush()?)
    }
    /// Appends a line to `log.txt`, echoed on stderr when there is no progress bar.
    pub fn log(&mut self, line: &str) -> anyhow::Result<()> {
        if self.echo {
            eprintln!("{line}");
        }
        self.log_only(line)
    }

    /// Appends a line to `log.txt` only (for what the program prints anyway, such as the error
    /// that ends a run).
    pub fn log_only(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.log, "{line}")
            .and_then(|_| self.log.flush())
            .context("writing log.txt")
    }
}
