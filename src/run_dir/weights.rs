//! `model.safetensors`: every variable of a network (parameters and BatchNorm buffers) under
//! torchvision-style names, written atomically.

use std::path::Path;

use anyhow::Context;
use tch::Tensor;
use tch::nn::VarStore;

/// Saves the variables of `vs` to `path` (temp file, fsync, rename, directory sync).
pub fn save(vs: &VarStore, path: &Path) -> anyhow::Result<()> {
    // Contiguous copies: channels-last kernels are strided, which the writer refuses.
    let tensors: Vec<(String, Tensor)> = crate::tensors::sorted_variables(vs)
        .into_iter()
        .map(|(name, t)| (name, t.contiguous()))
        .collect();
    datasets_prep::atomic::write_with(path, |tmp| {
        Tensor::write_safetensors(&tensors, tmp).map_err(std::io::Error::other)
    })
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
