//! Opening and reading user-named files without trusting them: only regular files are opened
//! (a FIFO or device would block `open` or never end), the type is checked again on the open
//! handle (the path may be swapped between the check and the open), and every read stops at an
//! explicit limit instead of believing `st_size` (which is 0 for devices and pipes).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a user-named file could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: is {what}, expected a regular file")]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("{path}: larger than the limit of {limit} bytes for this kind of file")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: not valid UTF-8 text")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ReadError {
    /// The message without the path, for callers whose own message names the file already.
    pub fn reason(&self) -> String {
        match self {
            ReadError::NotFound { .. } => "no such file".into(),
            ReadError::NotRegular { what, .. } => format!("is {what}, expected a regular file"),
            ReadError::TooLarge { limit, .. } => {
                format!("larger than the limit of {limit} bytes for this kind of file")
            }
            ReadError::NotUtf8 { .. } => "not valid UTF-8 text".into(),
            ReadError::Io { source, .. } => source.to_string(),
        }
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            ReadError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            ReadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Names a file type that is not a regular file, for error messages.
pub fn describe(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Refuses anything but a regular file (following symbolic links), without opening it.
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata, ReadError> {
    let meta = std::fs::metadata(path).map_err(|e| ReadError::io(path, e))?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_path_buf(),
            what: describe(meta.file_type()),
        });
    }
    Ok(meta)
}

/// Opens a regular file for reading. The open is non-blocking, so a FIFO put in place after the
/// type check cannot hang it; the handle's own type is then checked again.
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    check_regular(path)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ReadError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ReadError::io(path, e))?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_path_buf(),
            what: describe(meta.file_type()),
        });
    }
    Ok(file)
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let file = open_regular(path)?;
    read_handle_limited(file, path, limit)
}

/// Reads a whole regular UTF-8 text file of at most `limit` bytes.
pub fn read_text_limited(path: &Path, limit: u64) -> Result<String, ReadError> {
    let bytes = read_limited(path, limit)?;
    String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

/// Reads everything from `reader` up to `limit` bytes; one byte more is an error (`path` names
/// the source in it).
pub fn read_handle_limited(
    reader: impl Read,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = read_limited(&fifo, 10).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn a_device_reporting_size_zero_stops_at_the_limit() {
        // /dev/zero is a character device: refused by type before any read.
        let err = read_limited(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        let err = read_handle_limited(std::io::repeat(0), Path::new("stream"), 1000).unwrap_err();
        assert!(
            matches!(err, ReadError::TooLarge { limit: 1000, .. }),
            "{err}"
        );
    }

    #[test]
    fn small_files_read_whole_and_large_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        assert_eq!(read_limited(&path, 5).unwrap(), b"hello");
        assert!(matches!(
            read_limited(&path, 4),
            Err(ReadError::TooLarge { .. })
        ));
        assert!(matches!(
            read_limited(&dir.path().join("absent"), 4),
            Err(ReadError::NotFound { .. })
        ));
        let err = read_limited(dir.path(), 4).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
    }
}
