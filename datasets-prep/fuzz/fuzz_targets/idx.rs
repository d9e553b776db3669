//! Any bytes as an IDX file (raw or gzipped): an error, or dimensions whose product is the data.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for dims in [1, 3] {
        if let Ok((shape, values)) =
            datasets_prep::sources::parse_idx(std::path::Path::new("fuzz"), data.to_vec(), dims)
        {
            assert_eq!(shape.iter().product::<usize>(), values.len());
        }
    }
});
