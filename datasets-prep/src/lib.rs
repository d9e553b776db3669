//! datasets-prep: packs image datasets into verified, memory-mapped shard directories that
//! cosine-train reads without copying. The shard format is defined here and only here.
