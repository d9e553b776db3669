//! Saving and restoring the training state through checkpoints (`run_dir::checkpoint`), across
//! ranks: every rank joins the collectives, rank 0 reads and writes the files (so checkpoints
//! need no file system shared between nodes), and a resume on any world size continues with the
//! same global batches, data order, augmentation draws and learning rates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use tch::Tensor;

use super::data_parallel::DataParallel;
use crate::config::RunConfig;
use crate::optim::Sgd;
use crate::run_dir::checkpoint::{
    self, BN_RANKS, Loaded, MODEL, OPTIMIZER, ResumeMode, State, checkpoints_dir,
};
use crate::tensors::{bn_buffers, sorted_variables};

/// Writes a checkpoint of the current state (collective; rank 0 writes). Live state is not
/// changed, so a run that checkpoints more often follows the same trajectory.
pub fn save(
    run: &Path,
    keep: usize,
    vs: &tch::nn::VarStore,
    opt: &Sgd,
    dp: &DataParallel,
    state: State,
) -> anyhow::Result<Option<PathBuf>> {
    let per_rank = dp.gather_bn(vs)?;
    let mut written = None;
    if dp.is_lead() {
        let bn = bn_buffers(vs).0;
        let world = per_rank.len();
        let n = per_rank[0].len();
        let average: Vec<f32> = (0..n)
            .map(|i| per_rank.iter().map(|r| r[i]).sum::<f32>() / world as f32)
            .collect();
        let mut averaged: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut at = 0;
        for (name, t) in &bn {
            let len = t.numel();
            averaged.insert(
                name.clone(),
                Tensor::from_slice(&average[at..at + len]).view(t.size().as_slice()),
            );
            at += len;
        }
        let model: Vec<(String, Tensor)> = sorted_variables(vs)
            .into_iter()
            .map(|(name, t)| match averaged.remove(&name) {
                Some(avg) => (name, avg),
                None => (name, t),
            })
            .collect();
        let velocities: Vec<(String, Tensor)> = opt
            .params
            .iter()
            .map(|p| (p.name.clone(), p.velocity.shallow_clone()))
            .collect();
        let mut files = vec![
            (MODEL, checkpoint::to_safetensors(&model)?),
            (OPTIMIZER, checkpoint::to_safetensors(&velocities)?),
        ];
        if world > 1 {
            let mut ranks = Vec::new();
            for (r, values) in per_rank.iter().enumerate() {
                let mut at = 0;
                for (name, t) in &bn {
                    let len = t.numel();
                    ranks.push((
                        format!("rank{r}/{name}"),
                        Tensor::from_slice(&values[at..at + len]).view(t.size().as_slice()),
                    ));
                    at += len;
                }
            }
            files.push((BN_RANKS, checkpoint::to_safetensors(&ranks)?));
        }
        let root = checkpoints_dir(run);
        let name = checkpoint::name_for(state.global_step);
        let dir = checkpoint::write(&root, &name, &files, state)?;
        checkpoint::prune(&root, keep)?;
        written = Some(dir);
    }
    // Nobody goes on (or exits after a preemption checkpoint) before rank 0 has written it; a
    // failure on rank 0 ends every rank instead.
    dp.barrier("waiting for rank 0 to write a checkpoint")?;
    Ok(written)
}

/// Finds the checkpoint to resume from on rank 0 and sends it to every rank. `None` when
/// starting fresh (`auto` without a checkpoint). Skipped damaged checkpoints are reported on
/// rank 0 through `warn`.
pub fn fetch(
    run: &Path,
    mode: &ResumeMode,
    dp: &DataParallel,
    warn: &mut dyn FnMut(&str),
) -> anyhow::Result<Option<Loaded>> {
    let mut found: Option<Loaded> = None;
    if dp.is_lead() {
        found = match mode {
            ResumeMode::From(dir) => Some(checkpoint::load(dir)?),
            ResumeMode::Last | ResumeMode::Auto => {
                let root = checkpoints_dir(run);
                let (latest, skipped) = checkpoint::load_latest(&root);
                for s in &skipped {
                    warn(&format!("skipping a damaged checkpoint: {s}"));
                }
                match (latest, mode) {
                    (Some(l), _) => Some(l),
                    (None, ResumeMode::Auto) => None,
                    (None, _) if skipped.is_empty() => bail!(
                        "--resume: {} holds no checkpoint (use --resume auto to start fresh when there is none)",
                        root.display()
                    ),
                    (None, _) => bail!(
                        "--resume: no valid checkpoint in {}: {}",
                        root.display(),
                        skipped.join("; ")
                    ),
                }
            }
        };
    }
    let mut state_bytes = match &found {
        Some(l) => serde_json::to_vec(&l.state)?,
        None => Vec::new(),
    };
    dp.broadcast_bytes(
        &mut state_bytes,
        "sending the checkpoint state to every rank",
    )?;
    if state_bytes.is_empty() {
        return Ok(None);
    }
    let state: State =
        serde_json::from_slice(&state_bytes).context("the checkpoint state rank 0 sent")?;
    let mut files = BTreeMap::new();
    for name in state.files.keys() {
        let mut bytes = found
            .as_ref()
            .and_then(|l| l.files.get(name).cloned())
            .unwrap_or_default();
        dp.broadcast_bytes(&mut bytes, &format!("sending checkpoint file {name}"))?;
        files.insert(name.clone(), bytes);
    }
    let dir = found.map(|l| l.dir).unwrap_or_default();
    Ok(Some(Loaded { dir, state, files }))
}

/// Flattens a JSON object into `path -> value` pairs (`schedule.max_lr`).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Settings that may differ on resume: where the data lives (its content is checked through the
/// manifest hash) and the device.
const MAY_CHANGE: [&str; 2] = ["data", "device"];

/// The settings of `now` that differ from the checkpoint's, as `key: old -> new`.
pub fn config_differences(saved: &RunConfig, now: &RunConfig) -> anyhow::Result<Vec<String>> {
    Ok(all_differences(saved, now)?
        .into_iter()
        .filter(|d| !MAY_CHANGE.contains(&d.split([':', '.']).next().unwrap_or("")))
        .collect())
}

/// Every setting of `now` that differs from `saved`, as `key: old -> new` (nested keys joined
/// with dots).
pub fn all_differences(saved: &RunConfig, now: &RunConfig) -> anyhow::Result<Vec<String>> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &serde_json::to_value(saved)?, &mut a);
    flatten("", &serde_json::to_value(now)?, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (old, new) = (a.get(k), b.get(k));
            (old != new).then(|| {
                format!(
                    "{k}: {} -> {}",
                    old.map_or("(absent)", String::as_str),
                    new.map_or("(absent)", String::as_str)
                )
            })
        })
        .collect())
}

/// Loads a fetched checkpoint into the model and optimiser of this rank, after checking that it
/// belongs to this configuration and data.
pub fn restore(
    loaded: &Loaded,
    config: &RunConfig,
    manifest: &str,
    vs: &tch::nn::VarStore,
    opt: &mut Sgd,
    dp: &DataParallel,
) -> anyhow::Result<()> {
    let where_ = loaded.dir.join(checkpoint::STATE);
    let mut differences = config_differences(&loaded.state.config, config)?;
    // More (or fewer) epochs extend or shorten the plan, not what has been trained so far.
    if config.epochs >= loaded.state.epoch {
        differences.retain(|d| !d.starts_with("epochs: "));
    } else {
        bail!(
            "{}: --epochs {} is fewer than the {} epochs the checkpoint has trained",
            where_.display(),
            config.epochs,
            loaded.state.epoch
        );
    }
    if !differences.is_empty() {
        bail!(
            "{}: this run's settings differ from the checkpoint's, which would change the result: {}; \
             resume with the original settings, or start a new run in another --out",
            where_.display(),
            differences.join(", ")
        );
    }
    if loaded.state.manifest_xxh3 != manifest {
        bail!(
            "{}: the data changed since the checkpoint (manifest hash {} then, {} now)",
            where_.display(),
            loaded.state.manifest_xxh3,
            manifest
        );
    }
    let file = |name: &str| -> anyhow::Result<Vec<(String, Tensor)>> {
        let bytes = loaded
            .files
            .get(name)
            .with_context(|| format!("{}: has no {name}", loaded.dir.display()))?;
        checkpoint::from_safetensors(bytes, &loaded.dir.join(name).display().to_string())
    };
    let model: BTreeMap<String, Tensor> = file(MODEL)?.into_iter().collect();
    let mut ranks: BTreeMap<String, Tensor> = BTreeMap::new();
    if loaded.state.world_size == dp.world() && dp.world() > 1 {
        let prefix = format!("rank{}/", dp.rank());
        for (name, t) in file(BN_RANKS)? {
            if let Some(rest) = name.strip_prefix(&prefix) {
                ranks.insert(rest.to_string(), t);
            }
        }
    }
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, t) in vs.variables() {
            let src = ranks
                .get(&name)
                .or_else(|| model.get(&name))
                .with_context(|| {
                    format!(
                        "{}: has no tensor {name} (another model?)",
                        loaded.dir.join(MODEL).display()
                    )
                })?;
            if src.size() != t.size() || src.kind() != t.kind() {
                bail!(
                    "{}: {name} is {:?} {:?}, the model needs {:?} {:?}",
                    loaded.dir.join(MODEL).display(),
                    src.kind(),
                    src.size(),
                    t.kind(),
                    t.size()
                );
            }
            t.shallow_clone().copy_(&src.to_device(t.device()));
        }
        let velocities: BTreeMap<String, Tensor> = file(OPTIMIZER)?.into_iter().collect();
        for p in &mut opt.params {
            let v = velocities.get(&p.name).with_context(|| {
                format!(
                    "{}: has no velocity for {}",
                    loaded.dir.join(OPTIMIZER).display(),
                    p.name
                )
            })?;
            if v.size() != p.velocity.size() {
                bail!(
                    "{}: velocity of {} has the wrong shape",
                    loaded.dir.join(OPTIMIZER).display(),
                    p.name
                );
            }
            p.velocity.copy_(&v.to_device(p.velocity.device()));
        }
        Ok(())
    })?;
    Ok(())
}
