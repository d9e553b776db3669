//! The shard format, version 1: the one place that defines its bytes (see `FORMAT.md`).
//!
//! A shard file is a 64-byte header, a table of 32-byte record entries, zero padding up to a
//! page boundary, then the records' bytes back to back in table order. All integers are
//! little-endian. Parsing never trusts a length or offset: every rule broken has its own
//! [`ShardError`] variant naming the file and record.
//!
//! This module holds the constants, the header and table encoding, parsing and validation; its
//! `writer` submodule lays out and writes a split's shard files (errors: [`ShardWriteError`]).

mod writer;

use std::path::{Path, PathBuf};

pub use writer::ShardWriteError;
pub(crate) use writer::SplitWriter;

/// First 8 bytes of every shard file.
pub const MAGIC: [u8; 8] = *b"CTSHARD\0";
/// The version written into headers and manifests; readers refuse any other.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 64;
/// Size of one record-table entry in bytes.
pub const ENTRY_BYTES: usize = 32;
/// The data region starts at a multiple of this.
pub const PAGE_BYTES: u64 = 4096;

/// One parsed record-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordEntry {
    /// Absolute byte offset of the record in the shard file.
    pub offset: u64,
    /// Number of bytes of the record.
    pub length: u32,
    /// Class index (position in the manifest's class list).
    pub label: u32,
    pub height: u32,
    pub width: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
}

/// Everything that can be wrong with a shard directory or file.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a shard directory (no manifest.json); an interrupted pack leaves none")]
    NotAShardDir { path: PathBuf },
    #[error("{path}: is {what}, expected a shard directory")]
    NotADirectory { path: PathBuf, what: &'static str },
    /// A file of the directory that is not a regular file, or too large (see `bounded`).
    #[error(transparent)]
    Read(#[from] crate::bounded::ReadError),
    #[error("{path}: invalid manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path}: file is {got} bytes, the manifest says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("{path}: checksum {got} does not match the manifest's {expected}")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("{path}: file too small for a shard header ({len} bytes, need {HEADER_BYTES})")]
    HeaderTooSmall { path: PathBuf, len: u64 },
    #[error("{path}: bad magic bytes (not a shard file)")]
    BadMagic { path: PathBuf },
    #[error("{path}: format version {found}, this reader understands {FORMAT_VERSION}")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path}: header field {field} is {value}: {reason}")]
    BadHeader {
        path: PathBuf,
        field: &'static str,
        value: u64,
        reason: String,
    },
    #[error("{path}: record {record}: {reason}")]
    BadRecord {
        path: PathBuf,
        record: u64,
        reason: String,
    },
    #[error(
        "{path}: record {record} (offset {offset}, length {length}) lies outside the data region ending at {end}"
    )]
    RecordOutOfBounds {
        path: PathBuf,
        record: u64,
        offset: u64,
        length: u64,
        end: u64,
    },
    #[error("{path}: record {record} does not decode: {reason}")]
    Undecodable {
        path: PathBuf,
        record: u64,
        reason: String,
    },
    #[error("record index {index} out of range: the {split} split has {len} records")]
    IndexOutOfRange {
        split: &'static str,
        index: usize,
        len: usize,
    },
}

impl ShardError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ShardError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The parsed, validated header and table of one shard file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub data_offset: u64,
    pub entries: Vec<RecordEntry>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The smallest data offset for a table of `records` entries: after the table, rounded up to a
/// page. Writers MAY reserve a larger table (zero padding) when they do not yet know the count.
pub fn data_offset_for(records: u64) -> Option<u64> {
    let table_end = (HEADER_BYTES as u64).checked_add(records.checked_mul(ENTRY_BYTES as u64)?)?;
    table_end.checked_next_multiple_of(PAGE_BYTES)
}

/// Parses and validates a whole shard file held in `bytes` (normally a memory map).
///
/// `num_classes` bounds the labels. Checks, in order: header size, magic, version, header
/// fields, the table inside the file, every record contiguous after the previous one starting at
/// the data offset, shapes, and that the last record ends exactly at the end of the file.
pub fn parse_shard(
    path: &Path,
    bytes: &[u8],
    num_classes: usize,
) -> Result<ShardLayout, ShardError> {
    let p = || path.to_path_buf();
    let file_len = bytes.len() as u64;
    if bytes.len() < HEADER_BYTES {
        return Err(ShardError::HeaderTooSmall {
            path: p(),
            len: file_len,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(ShardError::BadMagic { path: p() });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(ShardError::UnsupportedVersion {
            path: p(),
            found: version,
        });
    }
    let header_bytes = u32_at(bytes, 12);
    if header_bytes as usize != HEADER_BYTES {
        return Err(ShardError::BadHeader {
            path: p(),
            field: "header_bytes",
            value: header_bytes.into(),
            reason: format!("expected {HEADER_BYTES}"),
        });
    }
    let count = u64_at(bytes, 16);
    let table_offset = u64_at(bytes, 24);
    let data_offset = u64_at(bytes, 32);
    let data_bytes = u64_at(bytes, 40);
    if table_offset != HEADER_BYTES as u64 {
        return Err(ShardError::BadHeader {
            path: p(),
            field: "table_offset",
            value: table_offset,
            reason: format!("expected {HEADER_BYTES}"),
        });
    }
    let min_data_offset = data_offset_for(count);
    let offset_ok = min_data_offset.is_some_and(|min| data_offset >= min)
        && data_offset.is_multiple_of(PAGE_BYTES)
        && data_offset <= file_len;
    if !offset_ok {
        return Err(ShardError::BadHeader {
            path: p(),
            field: "data_offset",
            value: data_offset,
            reason: format!(
                "must be a multiple of {PAGE_BYTES}, at least {} (the end of a {count}-record table) and within the {file_len}-byte file",
                min_data_offset.map_or("an overflowing offset".to_string(), |d| d.to_string())
            ),
        });
    }
    if data_offset.checked_add(data_bytes) != Some(file_len) {
        return Err(ShardError::BadHeader {
            path: p(),
            field: "data_bytes",
            value: data_bytes,
            reason: format!(
                "data starting at {data_offset} must end at the file's end ({file_len})"
            ),
        });
    }
    if bytes[48..HEADER_BYTES].iter().any(|&b| b != 0) {
        return Err(ShardError::BadHeader {
            path: p(),
            field: "reserved",
            value: 0,
            reason: "reserved header bytes must be zero".into(),
        });
    }

    // The table fits: data_offset >= table end was established above.
    let mut entries = Vec::with_capacity(count as usize);
    let mut next = data_offset;
    for record in 0..count {
        let at = HEADER_BYTES + record as usize * ENTRY_BYTES;
        let e = &bytes[at..at + ENTRY_BYTES];
        let entry = RecordEntry {
            offset: u64_at(e, 0),
            length: u32_at(e, 8),
            label: u32_at(e, 12),
            height: u32_at(e, 16),
            width: u32_at(e, 20),
            channels: e[24],
        };
        let bad = |reason: String| ShardError::BadRecord {
            path: p(),
            record,
            reason,
        };
        if e[25..].iter().any(|&b| b != 0) {
            return Err(bad("reserved entry bytes must be zero".into()));
        }
        let end = entry.offset.checked_add(entry.length.into());
        if entry.offset != next || end.is_none_or(|end| end > file_len) {
            return Err(ShardError::RecordOutOfBounds {
                path: p(),
                record,
                offset: entry.offset,
                length: entry.length.into(),
                end: file_len,
            });
        }
        if entry.channels != 1 && entry.channels != 3 {
            return Err(bad(format!("{} channels; expected 1 or 3", entry.channels)));
        }
        if entry.height == 0 || entry.width == 0 {
            return Err(bad(format!("empty image {}x{}", entry.height, entry.width)));
        }
        if entry.label as usize >= num_classes {
            return Err(bad(format!(
                "label {} out of range for {num_classes} classes",
                entry.label
            )));
        }
        next = end.unwrap_or(next);
        entries.push(entry);
    }
    if next != file_len {
        return Err(ShardError::BadHeader {
            path: p(),
            field: "data_bytes",
            value: data_bytes,
            reason: format!(
                "records end at {next} but the file ends at {file_len} (bytes without a record)"
            ),
        });
    }
    Ok(ShardLayout {
        data_offset,
        entries,
    })
}

/// Serialises a shard's head: header, table and zero padding up to `data_offset` (which must be
/// page-aligned and at least `data_offset_for(entries.len())`). The records' bytes follow it.
pub fn encode_shard_head(entries: &[RecordEntry], data_offset: u64) -> Vec<u8> {
    let count = entries.len() as u64;
    assert!(
        data_offset_for(count).is_some_and(|min| data_offset >= min)
            && data_offset.is_multiple_of(PAGE_BYTES),
        "data offset {data_offset} cannot hold a {count}-record table"
    );
    let data_bytes: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
    let mut out = Vec::with_capacity(data_offset as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(HEADER_BYTES as u64).to_le_bytes());
    out.extend_from_slice(&data_offset.to_le_bytes());
    out.extend_from_slice(&data_bytes.to_le_bytes());
    out.resize(HEADER_BYTES, 0);
    for e in entries {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.label.to_le_bytes());
        out.extend_from_slice(&e.height.to_le_bytes());
        out.extend_from_slice(&e.width.to_le_bytes());
        out.push(e.channels);
        out.extend_from_slice(&[0u8; 7]);
    }
    out.resize(data_offset as usize, 0);
    out
}

/// The xxh3-64 checksum of a file's bytes, as 16 lowercase hex digits.
pub fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(lengths: &[u32]) -> Vec<RecordEntry> {
        let mut offset = data_offset_for(lengths.len() as u64).unwrap();
        lengths
            .iter()
            .enumerate()
            .map(|(i, &length)| {
                let e = RecordEntry {
                    offset,
                    length,
                    label: i as u32 % 3,
                    height: 1,
                    width: length,
                    channels: 1,
                };
                offset += u64::from(length);
                e
            })
            .collect()
    }

    fn shard(lengths: &[u32]) -> Vec<u8> {
        let es = entries(lengths);
        let mut bytes = encode_shard_head(&es, data_offset_for(es.len() as u64).unwrap());
        for e in &es {
            bytes.extend((0..e.length).map(|i| i as u8));
        }
        bytes
    }

    #[test]
    fn round_trip() {
        let bytes = shard(&[5, 1, 300]);
        assert_eq!(bytes.len() as u64, PAGE_BYTES + 306);
        let layout = parse_shard(Path::new("s"), &bytes, 3).unwrap();
        assert_eq!(layout.entries, entries(&[5, 1, 300]));
        assert_eq!(layout.data_offset, PAGE_BYTES);
        let empty = shard(&[]);
        assert!(
            parse_shard(Path::new("s"), &empty, 3)
                .unwrap()
                .entries
                .is_empty()
        );
    }

    #[test]
    fn each_broken_rule_has_its_error() {
        let good = shard(&[5, 7]);
        let p = Path::new("s");
        assert!(matches!(
            parse_shard(p, &good[..10], 3),
            Err(ShardError::HeaderTooSmall { .. })
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::UnsupportedVersion { found: 2, .. })
        ));
        let mut b = good.clone();
        b.pop();
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::BadHeader {
                field: "data_bytes",
                ..
            })
        ));
        let mut b = good.clone();
        b[33] = 0x11; // data offset not on a page
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::BadHeader {
                field: "data_offset",
                ..
            })
        ));
        let mut b = good.clone();
        b[16] = 200; // record count far beyond the table
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::BadHeader {
                field: "data_offset",
                ..
            })
        ));
        let mut b = good.clone();
        b[HEADER_BYTES + ENTRY_BYTES] += 1; // second record's offset leaves a hole
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::RecordOutOfBounds { record: 1, .. })
        ));
        let mut b = good.clone();
        b[HEADER_BYTES + 24] = 4;
        assert!(matches!(
            parse_shard(p, &b, 3),
            Err(ShardError::BadRecord { record: 0, .. })
        ));
        assert!(matches!(
            parse_shard(p, &good, 1),
            Err(ShardError::BadRecord { record: 1, .. })
        ));
    }
}
