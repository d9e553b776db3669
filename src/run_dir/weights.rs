//! `model.safetensors`: every variable of a network (parameters and BatchNorm buffers) under
//! torchvision-style names, with a `__metadata__` table that makes the file usable alone (the
//! architecture, objective, classes and the evaluation preprocessing), written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use datasets_prep::Manifest;
use tch::nn::VarStore;

use super::records::Versions;
use crate::config::{EmbeddingSpec, InitFrom, RunConfig};
use crate::objective::Head;

/// The `format` entry of the metadata; bumped when a key changes meaning.
pub const METADATA_FORMAT: &str = "cosine-train-weights/1";

/// What a weights file says about itself: every value is text (JSON for lists), as the
/// safetensors format requires. Keys: `format`, `arch`, `loss`, `classes` (`[{"id","name"}]`
/// in output order), `channels`, `mean` and `std` (per channel, on 0-255 pixel values),
/// `short_side` (the pack's resize, `null` if none), `crop` (centre crop at evaluation, `null`
/// if none), `conv_padding` (how the CIFAR ResNets pad a stride-2 convolution: `same` or
/// `symmetric`), `embedding` (and `embedding_xxh3` for a file), `cosine_train` and `git`.
pub fn metadata(
    config: &RunConfig,
    manifest: &Manifest,
) -> anyhow::Result<BTreeMap<String, String>> {
    let json = |v: serde_json::Value| v.to_string();
    let mut m = BTreeMap::new();
    m.insert("format".into(), METADATA_FORMAT.into());
    m.insert("arch".into(), config.arch.to_string());
    m.insert("loss".into(), config.objective.loss.to_string());
    m.insert("classes".into(), serde_json::to_string(&manifest.classes)?);
    m.insert("channels".into(), manifest.channels.to_string());
    m.insert("mean".into(), json(serde_json::json!(manifest.train_mean)));
    m.insert("std".into(), json(serde_json::json!(manifest.train_std)));
    m.insert(
        "short_side".into(),
        json(serde_json::json!(manifest.resize.short_side)),
    );
    m.insert("crop".into(), json(serde_json::json!(config.augment.crop)));
    m.insert("conv_padding".into(), config.conv_padding.to_string());
    m.insert("embedding".into(), config.embedding.to_string());
    if let EmbeddingSpec::File(path) = &config.embedding {
        m.insert("embedding_xxh3".into(), super::checkpoint::file_hash(path)?);
    }
    let versions = Versions::current();
    m.insert("cosine_train".into(), versions.cosine_train);
    m.insert("git".into(), versions.git);
    Ok(m)
}

/// Saves the variables of `vs` with `metadata` to `path` (temp file, fsync, rename,
/// directory sync).
pub fn save(vs: &VarStore, path: &Path, metadata: BTreeMap<String, String>) -> anyhow::Result<()> {
    let tensors = crate::tensors::sorted_variables(vs);
    let bytes = super::checkpoint::to_safetensors_with(&tensors, &metadata)?;
    datasets_prep::atomic::write_file(path, &bytes)
        .with_context(|| format!("{}: cannot write the weights", path.display()))
}

/// Loads `path` into the variables of `vs`; every variable must be there with its shape.
pub fn load(vs: &mut VarStore, path: &Path, model_of: &str) -> anyhow::Result<()> {
    // A FIFO or device would block or never end inside libtorch's reader.
    datasets_prep::bounded::check_regular(path).context("cannot load weights")?;
    vs.load(path).with_context(|| {
        format!(
            "{}: cannot load weights matching the model of {model_of}",
            path.display()
        )
    })
}

/// A run's final weights, or, for a run that has not finished (stopped, preempted, still
/// training), its newest checkpoint's model.
pub fn of_run(run: &Path) -> anyhow::Result<PathBuf> {
    let final_weights = run.join(super::WEIGHTS);
    if final_weights.exists() {
        return Ok(final_weights);
    }
    let root = super::checkpoint::checkpoints_dir(run);
    match super::checkpoint::list(&root).pop() {
        Some(newest) => {
            tracing::warn!(
                "{}: no {} (the run has not finished); using its newest checkpoint {}",
                run.display(),
                super::WEIGHTS,
                newest.display()
            );
            Ok(newest.join(super::checkpoint::MODEL))
        }
        None => anyhow::bail!(
            "{}: has no {} and no checkpoint: the run has not finished an epoch \
             (give the weights with --weights)",
            run.display(),
            super::WEIGHTS
        ),
    }
}

/// Copies `init.weights` into the variables of `vs` (the head's too unless `init.new_head`):
/// every variable must be in the file with its shape, and the file must be the one hashed when
/// the run was configured.
pub fn init_from(vs: &VarStore, init: &InitFrom) -> anyhow::Result<()> {
    let path = &init.weights;
    let what = format!("--init-from {}", path.display());
    let bytes = datasets_prep::bounded::read_limited(path, INIT_LIMIT).context("--init-from")?;
    let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
    if format!("{hash:016x}") != init.xxh3 {
        anyhow::bail!("{what}: the file changed since the run was configured (its hash differs)");
    }
    let saved: BTreeMap<String, tch::Tensor> = super::checkpoint::from_safetensors(&bytes, &what)?
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    tch::no_grad(|| {
        for (name, t) in vs.variables() {
            if init.new_head && Head::owns(&name) {
                continue;
            }
            match saved.get(&name) {
                None => problems.push(format!("{name} is missing")),
                Some(src) if src.size() != t.size() => problems.push(format!(
                    "{name} is {:?}, the model needs {:?}",
                    src.size(),
                    t.size()
                )),
                Some(src) => {
                    t.shallow_clone()
                        .copy_(&src.to_kind(t.kind()).to_device(t.device()));
                }
            }
        }
    });
    if !problems.is_empty() {
        let hint = if problems.iter().any(|p| Head::owns(p)) && !init.new_head {
            " (for other classes, add --new-head)"
        } else {
            ""
        };
        anyhow::bail!(
            "{what}: does not fit this model: {}{hint}",
            problems.join("; ")
        );
    }
    Ok(())
}

/// The largest weights file read for `--init-from` (ResNet-50 takes ~100 MB).
const INIT_LIMIT: u64 = 4 << 30;
