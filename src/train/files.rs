//! The files of a run directory that rank 0 appends to while training, and atomic writes.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: write failed", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// Appends lines to `metrics.jsonl` and `log.txt`, flushing each.
pub struct RunFiles {
    metrics: std::fs::File,
    log: std::fs::File,
    echo: bool,
}

impl RunFiles {
    pub fn open(out: &Path, echo: bool) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let path = out.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("{}: cannot open", path.display()))
        };
        Ok(RunFiles {
            metrics: open("metrics.jsonl")?,
            log: open("log.txt")?,
            echo,
        })
    }
    /// Cuts `metrics.jsonl` back to `bytes` (what a checkpoint covered), so that a resumed run
    /// does not repeat lines written after it.
    pub fn truncate_metrics(out: &Path, bytes: u64) -> anyhow::Result<()> {
        let path = out.join("metrics.jsonl");
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

    pub fn metric(&mut self, value: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.metrics, "{value}")
            .and_then(|_| self.metrics.flush())
            .context("writing metrics.jsonl")
    }
    pub fn log(&mut self, line: &str) -> anyhow::Result<()> {
        if self.echo {
            eprintln!("{line}");
        }
        writeln!(self.log, "{line}")
            .and_then(|_| self.log.flush())
            .context("writing log.txt")
    }
}
