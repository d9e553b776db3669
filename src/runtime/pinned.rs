//! Host tensors allocated page-locked (libtorch's pinned, caching allocator), so that a batch
//! bound for a GPU is filled in place and copied asynchronously, with no second copy and none
//! of the deprecated `pin_memory(device)` path.

use std::ffi::{CStr, c_char, c_int};

use tch::{Kind, Tensor};

unsafe extern "C" {
    fn cosine_empty_pinned(
        sizes: *const i64,
        ndim: i64,
        dtype: c_int,
        error: *mut *mut c_char,
    ) -> *mut torch_sys::C_tensor;
    fn cosine_free_error(error: *mut c_char);
}

/// An uninitialised page-locked CPU tensor of `size`; `kind` is `Float` or `Int64`. Fails (with
/// libtorch's message) where there is no pinned allocator, i.e. without CUDA.
pub fn empty_pinned(size: &[i64], kind: Kind) -> Result<Tensor, String> {
    let dtype = match kind {
        Kind::Float => 0,
        Kind::Int64 => 1,
        other => return Err(format!("pinned tensors of {other:?} are not supported")),
    };
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: `size` outlives the call; the shim returns a new at::Tensor* owned by the caller,
    // or null with a malloc'd message in `error`.
    let ptr = unsafe { cosine_empty_pinned(size.as_ptr(), size.len() as i64, dtype, &mut error) };
    if ptr.is_null() {
        let message = if error.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: a NUL-terminated string from strdup, freed right after.
            let text = unsafe { CStr::from_ptr(error) }
                .to_string_lossy()
                .into_owned();
            unsafe { cosine_free_error(error) };
            text
        };
        return Err(message);
    }
    // SAFETY: `ptr` is a heap at::Tensor*, which tch's Tensor takes ownership of (and deletes).
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_tensors_are_pinned_where_cuda_is_and_a_clear_error_elsewhere() {
        match empty_pinned(&[2, 3, 4], Kind::Float) {
            Ok(t) => {
                assert!(tch::Cuda::is_available(), "pinned memory without CUDA");
                assert_eq!(t.size(), [2, 3, 4]);
                assert_eq!(t.kind(), Kind::Float);
                assert!(t.is_pinned(tch::Device::Cuda(0)));
                let labels = empty_pinned(&[5], Kind::Int64).expect("int64");
                assert_eq!(labels.kind(), Kind::Int64);
            }
            Err(message) => {
                assert!(!tch::Cuda::is_available(), "{message}");
                assert!(message.contains("pin"), "{message}");
                assert!(!message.contains("frame #"), "{message}");
            }
        }
        assert!(empty_pinned(&[1], Kind::Half).is_err());
    }
}
