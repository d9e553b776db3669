//! Which files of a run directory a run wrote, so that starting a run over an old one removes
//! exactly those and nothing of the user's. A directory that holds no run but is not empty is
//! refused: `--out` naming a folder of one's own files must never cost them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::checkpoint::{BN_RANKS, MODEL, OPTIMIZER, STATE};
use super::{CHECKPOINTS, CONFIG, LOG, METRICS, TENSORBOARD_PREFIX, WEIGHTS};

/// What a run directory holds.
#[derive(Debug, Default)]
pub struct Contents {
    /// Files and folders a run writes, to remove when a new run replaces it.
    pub ours: Vec<PathBuf>,
    /// Anything else; never removed.
    pub foreign: Vec<PathBuf>,
    /// `config.json` or `metrics.jsonl` is there.
    pub is_run: bool,
    /// The run got somewhere: a metrics line, a checkpoint or final weights. A run that died
    /// before its first epoch may be started again without `--force`.
    pub has_progress: bool,
}

/// Names in the top level of a run directory that a run writes (besides `checkpoints/`).
fn is_run_file(name: &str) -> bool {
    [CONFIG, METRICS, LOG, WEIGHTS].contains(&name)
        || name.starts_with(TENSORBOARD_PREFIX)
        || is_temporary(name)
}

/// The temporary siblings of atomic writes and the writability probe, left by a killed run.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".write-test-"))
}

/// A checkpoint's folder (`step-*`, or `.partial-step-*` while it is written).
fn is_checkpoint_dir(name: &str) -> bool {
    name.starts_with("step-") || name.starts_with(".partial-step-")
}

fn is_checkpoint_file(name: &str) -> bool {
    [STATE, MODEL, OPTIMIZER, BN_RANKS].contains(&name) || is_temporary(name)
}

fn entries(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    let listing =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in listing {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        match entry.file_name().into_string() {
            Ok(name) => out.push((name, path, is_dir)),
            // Not a name this program writes.
            Err(_) => out.push((String::new(), path, is_dir)),
        }
    }
    out.sort();
    Ok(out)
}

impl Contents {
    /// Sorts the entries of the existing directory `out` into ours and foreign.
    pub fn scan(out: &Path) -> anyhow::Result<Self> {
        let mut c = Contents::default();
        for (name, path, is_dir) in entries(out)? {
            if name == CHECKPOINTS && is_dir {
                c.scan_checkpoints(&path)?;
            } else if !is_dir && is_run_file(&name) {
                if name == CONFIG || name == METRICS {
                    c.is_run = true;
                }
                if name == WEIGHTS || (name == METRICS && non_empty(&path)) {
                    c.has_progress = true;
                }
                c.ours.push(path);
            } else {
                c.foreign.push(path);
            }
        }
        // Without config.json or metrics.jsonl nothing here was written by a run, whatever the
        // names: a user's folder that happens to hold a `log.txt` or `checkpoints/`.
        if !c.is_run {
            c.foreign.append(&mut c.ours);
            c.has_progress = false;
        }
        Ok(c)
    }

    fn scan_checkpoints(&mut self, root: &Path) -> anyhow::Result<()> {
        let mut all_ours = true;
        for (name, path, is_dir) in entries(root)? {
            if !(is_dir && is_checkpoint_dir(&name)) {
                all_ours = false;
                self.foreign.push(path);
                continue;
            }
            let mut whole = true;
            for (file, fpath, fdir) in entries(&path)? {
                if fdir || !is_checkpoint_file(&file) {
                    whole = false;
                    self.foreign.push(fpath);
                } else {
                    self.ours.push(fpath);
                }
            }
            if whole {
                self.ours.push(path.clone());
            } else {
                all_ours = false;
            }
            if name.starts_with("step-") {
                self.has_progress = true;
            }
        }
        if all_ours {
            self.ours.push(root.to_path_buf());
        }
        Ok(())
    }

    /// Removes what a run wrote (files first, then the folders left empty).
    pub fn remove_ours(&self) -> anyhow::Result<()> {
        let (dirs, files): (Vec<&PathBuf>, Vec<&PathBuf>) =
            self.ours.iter().partition(|p| p.is_dir());
        for f in files {
            std::fs::remove_file(f).with_context(|| format!("{}: cannot remove", f.display()))?;
        }
        // Deepest first: checkpoint folders before `checkpoints/`.
        let mut dirs = dirs;
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            std::fs::remove_dir(d).with_context(|| format!("{}: cannot remove", d.display()))?;
        }
        Ok(())
    }
}

fn non_empty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// Makes the run directory `out` ready for a run: creates it if needed; refuses a directory of
/// someone else's files; refuses a run that got somewhere unless `force` (or `resuming`); when
/// starting fresh, removes only the files of the run it replaces.
pub fn prepare(out: &Path, force: bool, resuming: bool) -> anyhow::Result<()> {
    match std::fs::metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::create_dir_all(out)
                .with_context(|| format!("{}: cannot create the run directory", out.display()));
        }
        Err(e) => bail!("--out {}: {e}", out.display()),
        Ok(m) if !m.is_dir() => bail!("--out {}: exists and is not a directory", out.display()),
        Ok(_) => {}
    }
    let contents = Contents::scan(out)?;
    if !contents.is_run {
        if let Some(first) = contents.foreign.first() {
            bail!(
                "--out {}: is not empty and holds no run ({} and {} more); choose a new or empty \
                 directory (nothing was changed)",
                out.display(),
                first.display(),
                contents.foreign.len() - 1
            );
        }
        return Ok(());
    }
    if resuming {
        return Ok(());
    }
    if contents.has_progress && !force {
        bail!(
            "{}: already holds a run (metrics.jsonl); choose another --out, pass --force to \
             replace it, or --resume to continue it",
            out.display()
        );
    }
    contents.remove_ours()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn a_folder_of_user_files_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        touch(&out.join("checkpoints/mine.txt"));
        touch(&out.join("log.txt"));
        let err = prepare(out, true, false).unwrap_err().to_string();
        assert!(err.contains("holds no run"), "{err}");
        assert!(out.join("checkpoints/mine.txt").exists());
        assert!(out.join("log.txt").exists());
    }

    #[test]
    fn force_removes_only_the_runs_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join(CONFIG), b"{}").unwrap();
        std::fs::write(out.join(METRICS), b"{\"epoch\":1}\n").unwrap();
        touch(&out.join("checkpoints/step-000000000001/state.json"));
        touch(&out.join("checkpoints/step-000000000002/model.safetensors"));
        touch(&out.join("checkpoints/step-000000000002/notes.md"));
        touch(&out.join("notes.md"));
        let err = prepare(out, false, false).unwrap_err().to_string();
        assert!(err.contains("already holds a run"), "{err}");
        prepare(out, true, false).unwrap();
        assert!(!out.join(METRICS).exists() && !out.join(CONFIG).exists());
        assert!(!out.join("checkpoints/step-000000000001").exists());
        assert!(
            !out.join("checkpoints/step-000000000002/model.safetensors")
                .exists()
        );
        assert!(out.join("checkpoints/step-000000000002/notes.md").exists());
        assert!(out.join("notes.md").exists());
    }

    #[test]
    fn a_run_that_died_before_its_first_epoch_restarts_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join(CONFIG), b"{}").unwrap();
        std::fs::write(out.join(METRICS), b"").unwrap();
        std::fs::write(out.join(LOG), b"error\n").unwrap();
        prepare(out, false, false).unwrap();
        assert!(std::fs::read_dir(out).unwrap().next().is_none());
    }
}
