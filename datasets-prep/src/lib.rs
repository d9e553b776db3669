//! datasets-prep: packs image datasets into verified, memory-mapped shard directories that
//! cosine-train reads without copying.
//!
//! * [`format`] defines the bytes of a shard file (the only place that does; see `FORMAT.md`),
//!   [`manifest`] the `manifest.json` beside them, [`reader`] opens and validates both.
//! * [`sources`] reads each raw dataset layout; [`pack`] turns a listing into a shard directory.
//! * [`mat`] and [`pickle`] are safe readers for the MATLAB and Python files some datasets ship.
//! * [`image_ops`] decodes and pre-resizes one image, into buffers recycled through
//!   [`buffers::BufferPool`].
//! * [`atomic`] replaces a small file atomically and durably (for the whole workspace).
//! * [`bounded`] opens only regular files and reads them up to a limit (for the whole workspace).

pub mod atomic;
pub mod bounded;
pub mod buffers;
pub mod format;
pub mod image_ops;
pub mod manifest;
pub mod mat;
pub mod pack;
pub mod pickle;
mod readahead;
pub mod reader;
pub mod rng;
pub mod sources;
pub mod verify;
mod writeback;

pub use format::ShardError;
pub use manifest::{Encoding, Manifest, Split};
pub use reader::{Record, ShardDir, SplitReader};

#[cfg(test)]
mod tests {
    /// Callers move these errors across threads and into `anyhow` (which needs all three).
    #[test]
    fn public_errors_are_send_sync_and_static() {
        fn check<E: std::error::Error + Send + Sync + 'static>() {}
        check::<crate::atomic::AtomicWriteError>();
        check::<crate::bounded::ReadError>();
        check::<crate::format::ShardError>();
        check::<crate::format::ShardWriteError>();
        check::<crate::image_ops::ImageError>();
        check::<crate::mat::MatError>();
        check::<crate::pack::PackError>();
        check::<crate::pack::StoreError>();
        check::<crate::pickle::PickleError>();
        check::<crate::reader::PixelsError>();
        check::<crate::sources::SourceError>();
    }
}
