//! The files rank 0 appends to while a run trains: `metrics.jsonl` (one record per line) and
//! `log.txt`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use super::records::MetricsLine;
use super::{LOG, METRICS};

/// Appends lines to `metrics.jsonl` and `log.txt`, flushing each.
pub struct RunWriter {
    metrics: std::fs::File,
    log: std::fs::File,
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
            echo,
        })
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
            .context("writing metrics.jsonl")
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
