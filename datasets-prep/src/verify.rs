//! `datasets-prep verify` and `info`: full checks of a shard directory, and its summary.

use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use crate::format::ShardError;
use crate::manifest::{Encoding, Split};
use crate::reader::ShardDir;

/// Every problem found in `dir` (empty when it is intact): the structure (at open), each shard's
/// checksum, a training record for every class, and for JPEG storage that every record decodes
/// (within the decoder's limits) to the size in its table.
pub fn verify(dir: &Path) -> Vec<ShardError> {
    let shards = match ShardDir::open(dir) {
        Ok(s) => s,
        Err(e) => return vec![e],
    };
    let mut problems = shards.verify_checksums();
    let m = shards.manifest();
    let empty: Vec<String> = (m.classes.iter().zip(&m.train.per_class))
        .filter(|(_, n)| **n == 0)
        .map(|(c, _)| format!("{:?} ({})", c.id, c.name))
        .collect();
    if !empty.is_empty() {
        problems.push(ShardError::BadManifest {
            path: dir.join("manifest.json"),
            reason: format!(
                "every class needs a training record; {} class(es) have none: {}",
                empty.len(),
                empty.join(", ")
            ),
        });
    }
    if shards.manifest().storage.encoding == Encoding::Jpeg {
        for split in Split::ALL {
            for (path, map, entries) in shards.split(split).files() {
                let bad: Vec<ShardError> = entries
                    .par_iter()
                    .enumerate()
                    .filter_map(|(i, e)| {
                        let bytes =
                            &map[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
                        let err = match crate::image_ops::decode_jpeg(bytes) {
                            Err(reason) => reason.to_string(),
                            Ok(p)
                                if (p.height, p.width, p.channels)
                                    != (e.height, e.width, e.channels) =>
                            {
                                format!(
                                    "decodes to {}x{}x{}, the table says {}x{}x{}",
                                    p.height, p.width, p.channels, e.height, e.width, e.channels
                                )
                            }
                            Ok(_) => return None,
                        };
                        Some(ShardError::Undecodable {
                            path: path.to_path_buf(),
                            record: i as u64,
                            reason: err,
                        })
                    })
                    .collect();
                problems.extend(bad);
            }
        }
    }
    problems
}

/// The JSON summary printed by `info`.
pub fn info(dir: &Path) -> Result<serde_json::Value, ShardError> {
    let shards = ShardDir::open(dir)?;
    let m = shards.manifest();
    let split_json = |split: Split| {
        let s = m.split(split);
        let per_class: serde_json::Map<String, serde_json::Value> = m
            .classes
            .iter()
            .zip(&s.per_class)
            .map(|(c, &n)| (c.id.clone(), json!(n)))
            .collect();
        json!({
            "count": s.count,
            "shards": s.shards.len(),
            "bytes": s.shards.iter().map(|x| x.bytes).sum::<u64>(),
            "per_class": per_class,
        })
    };
    let total_bytes: u64 = Split::ALL
        .iter()
        .flat_map(|&s| m.split(s).shards.iter().map(|x| x.bytes))
        .sum();
    Ok(json!({
        "path": dir.display().to_string(),
        "dataset": m.dataset,
        "source": m.source,
        "format_version": m.format_version,
        "classes": m.classes.len(),
        "class_list": m.classes.iter().map(|c| json!({"id": c.id, "name": c.name})).collect::<Vec<_>>(),
        "channels": m.channels,
        "storage": m.storage,
        "resize": m.resize,
        "selection": m.selection,
        "train": split_json(Split::Train),
        "test": split_json(Split::Test),
        "train_mean": m.train_mean,
        "train_std": m.train_std,
        "skipped": m.skipped.len(),
        "bytes": total_bytes,
    }))
}
