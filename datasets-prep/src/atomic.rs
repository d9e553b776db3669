//! Replacing a small file atomically and durably, for the whole workspace (manifests here,
//! checkpoints and plots in the trainer).
//!
//! The bytes go to a temporary sibling (`.NAME.tmp-PID-N`, in the same directory so that the
//! rename stays on one file system), which is fsynced, renamed over the target, and then the
//! directory is fsynced so that the rename itself survives a crash. At every moment the target
//! holds either its old content or the whole new one; on any failure the temporary file is
//! removed and the target is left as it was.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an atomic write failed. `path` is the file being replaced, or its directory when only
/// the final directory sync failed (the new content is then in place, perhaps not yet durable).
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {op}: {source}")]
pub struct AtomicWriteError {
    pub path: PathBuf,
    /// What failed: "create", "write", "sync", "rename" or "sync directory".
    pub op: &'static str,
    pub source: std::io::Error,
}

/// Replaces `path` with `bytes`: temporary sibling, `write_all`, fsync, rename, fsync of the
/// directory.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    replace(path, |tmp| {
        let mut file = File::create(tmp).map_err(|e| ("create", e))?;
        file.write_all(bytes).map_err(|e| ("write", e))?;
        file.sync_all().map_err(|e| ("sync", e))
    })
}

/// Replaces `path` with what `write` writes to the temporary path it is given, for encoders
/// that insist on writing a path themselves. The file is then fsynced, renamed over `path`, and
/// the directory fsynced. An error from `write` is reported with op "write".
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<(), AtomicWriteError> {
    replace(path, |tmp| {
        write(tmp).map_err(|e| ("write", e))?;
        // fsync through a read-only handle is enough: it flushes the file, not the handle.
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| ("sync", e))
    })
}

/// Fsyncs a directory, making the creations, renames and removals of its entries durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Distinguishes the temporary files of concurrent writes from one process.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Writes the temporary sibling with `write` (which also makes it durable), renames it over
/// `path` and syncs the directory; removes the temporary file on failure.
fn replace(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), (&'static str, std::io::Error)>,
) -> Result<(), AtomicWriteError> {
    let fail = |op, source| AtomicWriteError {
        path: path.to_path_buf(),
        op,
        source,
    };
    let Some(name) = path.file_name() else {
        let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name");
        return Err(fail("create", source));
    };
    // A bare file name lives in the current directory.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| ("rename", e)));
    if let Err((op, source)) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(op, source));
    }
    sync_dir(dir).map_err(|source| AtomicWriteError {
        path: dir.to_path_buf(),
        op: "sync directory",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn content_is_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.json");
        write_file(&path, b"a much longer first version").unwrap();
        write_file(&path, b"short").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
        write_with(&path, |p| std::fs::write(p, b"from a path")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"from a path");
        assert_eq!(names(tmp.path()), ["m.json"], "no temporary file is left");
    }

    #[test]
    fn a_failing_writer_leaves_the_old_file_and_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("plot.png");
        write_file(&path, b"old").unwrap();
        let err = write_with(&path, |p| {
            std::fs::write(p, b"half")?;
            Err(std::io::Error::other("encoder gave up"))
        })
        .unwrap_err();
        assert_eq!((err.op, err.path.as_path()), ("write", path.as_path()));
        assert!(
            err.to_string().contains("cannot write: encoder gave up"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(tmp.path()), ["plot.png"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("nope/manifest.json");
        let err = write_file(&path, b"x").unwrap_err();
        assert_eq!(err.op, "create");
        assert_eq!(err.path, path);
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cannot create: ", path.display())),
            "{err}"
        );
        assert!(!tmp.path().join("nope").exists());
        let err = write_file(Path::new("/"), b"x").unwrap_err();
        assert_eq!(err.op, "create", "{err}");
    }
}
