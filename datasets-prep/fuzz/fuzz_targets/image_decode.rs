//! Any bytes as an image file: an error, or pixels that fill width x height x channels, within
//! the decoder's limits.
#![no_main]
use datasets_prep::buffers::BufferPool;
use datasets_prep::image_ops::{MAX_PIXELS, decode_image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_image(data, &BufferPool::new(0)) {
        let n = p.height as usize * p.width as usize;
        assert!(n as u64 <= MAX_PIXELS);
        assert_eq!(p.data.len(), n * usize::from(p.channels));
    }
});
