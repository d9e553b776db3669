//! The run directory (`--out`): what a run writes and what `report`, `eval` and `--resume`
//! read back. One module owns each file:
//! * `config.json` and `metrics.jsonl` as types, in [`records`];
//! * the appending of `metrics.jsonl`, `log.txt` and the TensorBoard events during a run, in
//!   [`writer`] (the event encoding in [`tensorboard`]);
//! * `checkpoints/step-*/` (weights, optimiser state, `state.json`), in [`checkpoint`];
//! * `model.safetensors`, in [`weights`];
//! * which files are a run's (and so may be replaced), in [`ownership`].
//!
//! Whole files are replaced atomically through `datasets_prep::atomic`.

pub mod checkpoint;
pub mod ownership;
pub mod records;
pub mod sweep;
pub mod tensorboard;
pub mod weights;
pub mod writer;

pub use ownership::prepare;

use std::path::Path;

use anyhow::{Context, bail};

pub const CONFIG: &str = "config.json";
pub const METRICS: &str = "metrics.jsonl";
pub const LOG: &str = "log.txt";
pub const WEIGHTS: &str = "model.safetensors";
pub const CHECKPOINTS: &str = "checkpoints";
/// TensorBoard event files start so (`events.out.tfevents.<time>.<host>`).
pub const TENSORBOARD_PREFIX: &str = "events.out.tfevents.";

/// Checks that the run directory takes files and has room for `count` checkpoints of `bytes`.
pub fn check_room(out: &Path, bytes: u64, count: u64) -> anyhow::Result<()> {
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("{}: the run directory is not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    let Ok(path) = std::ffi::CString::new(out.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: statvfs fills the struct for a NUL-terminated path; nothing is kept.
    let free = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut st) == 0)
            .then(|| st.f_bavail as u64 * st.f_frsize as u64)
    };
    let need = bytes.saturating_mul(count);
    if let Some(free) = free
        && free < need
    {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        bail!(
            "{}: {:.1} MiB free, but {count} checkpoints of {:.1} MiB need {:.1} MiB \
             (free space, or lower --keep-checkpoints)",
            out.display(),
            mib(free),
            mib(bytes),
            mib(need)
        );
    }
    Ok(())
}
