//! The libtorch calls tch does not expose, through `csrc/libtorch_shim.cpp`: tensors allocated
//! page-locked, multi-tensor (`_foreach_*`) ops, and a count of dispatched operators for
//! benchmarks ([`OpCounter`]). On CUDA a multi-tensor op is one kernel
//! launch per group of tensors instead of one per tensor; on the CPU libtorch runs the
//! per-tensor op on each, so results are those of a loop of them, bit for bit.

use std::ffi::{CStr, c_char, c_int};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

unsafe extern "C" {
    fn cosine_free_error(error: *mut c_char);
    fn cosine_empty_pinned(
        sizes: *const i64,
        ndim: i64,
        dtype: c_int,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cosine_foreach_zero_(a: *const *mut C_tensor, n: i64) -> *mut c_char;
    fn cosine_foreach_mul_scalar_(a: *const *mut C_tensor, n: i64, s: f64) -> *mut c_char;
    fn cosine_foreach_mul_tensor_(
        a: *const *mut C_tensor,
        n: i64,
        t: *const C_tensor,
    ) -> *mut c_char;
    fn cosine_foreach_mul_scalar(
        a: *const *mut C_tensor,
        n: i64,
        s: f64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cosine_foreach_mul_scalars(
        a: *const *mut C_tensor,
        n: i64,
        s: *const f64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cosine_foreach_add_list(
        a: *const *mut C_tensor,
        b: *const *mut C_tensor,
        n: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cosine_foreach_add_list_(
        a: *const *mut C_tensor,
        b: *const *mut C_tensor,
        n: i64,
    ) -> *mut c_char;
    fn cosine_foreach_norm(a: *const *mut C_tensor, n: i64, out: *mut *mut C_tensor)
    -> *mut c_char;
    fn cosine_clear_grads(a: *const *mut C_tensor, n: i64) -> *mut c_char;
    fn cosine_count_ops(on: c_int) -> *mut c_char;
    fn cosine_ops_counted() -> i64;
    fn cosine_ops_counted_here() -> i64;
    fn cosine_view_ops_counted() -> i64;
    fn cosine_foreach_sub_list_(
        a: *const *mut C_tensor,
        b: *const *mut C_tensor,
        n: i64,
    ) -> *mut c_char;
}

/// A libtorch error raised inside the shim (its message, without the C++ backtrace).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShimError(pub String);

type Result<T> = std::result::Result<T, ShimError>;

/// Turns the shim's returned message (null: success) into a result, freeing it.
fn check(error: *mut c_char) -> Result<()> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from strdup in the shim, freed right after being read.
    let text = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    unsafe { cosine_free_error(error) };
    Err(ShimError(text))
}

/// The handles of `tensors`, for a call that reads them or modifies their data in place.
fn handles(tensors: &[Tensor]) -> Vec<*mut C_tensor> {
    // The shim copies each at::Tensor (a reference-counted handle) and never frees these.
    tensors
        .iter()
        .map(|t| t.as_ptr() as *mut C_tensor)
        .collect()
}

/// Wraps `n` new at::Tensor* written by the shim.
fn adopt(out: Vec<*mut C_tensor>) -> Vec<Tensor> {
    // SAFETY: each pointer is a new heap at::Tensor* the shim handed over; tch's Tensor takes
    // ownership and deletes it on drop.
    out.into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect()
}

/// An uninitialised page-locked CPU tensor of `size`; `kind` is `Float` or `Int64`. Fails (with
/// libtorch's message) where there is no pinned allocator, i.e. without CUDA.
pub fn empty_pinned(size: &[i64], kind: Kind) -> Result<Tensor> {
    let dtype = match kind {
        Kind::Float => 0,
        Kind::Int64 => 1,
        other => {
            return Err(ShimError(format!(
                "pinned tensors of {other:?} are not supported"
            )));
        }
    };
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `size` outlives the call; on success `out` receives a new at::Tensor*.
    check(unsafe { cosine_empty_pinned(size.as_ptr(), size.len() as i64, dtype, &mut out) })?;
    Ok(adopt(vec![out]).remove(0))
}

/// `t.zero_()` for each tensor.
pub fn zero_(tensors: &[Tensor]) -> Result<()> {
    if tensors.is_empty() {
        return Ok(()); // libtorch refuses empty lists
    }
    let a = handles(tensors);
    // SAFETY: `a` holds live handles for the duration of the call.
    check(unsafe { cosine_foreach_zero_(a.as_ptr(), a.len() as i64) })
}

/// `t.mul_(s)` for each tensor.
pub fn mul_scalar_(tensors: &[Tensor], s: f64) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let a = handles(tensors);
    // SAFETY: as in `zero_`.
    check(unsafe { cosine_foreach_mul_scalar_(a.as_ptr(), a.len() as i64, s) })
}

/// `t.mul_(factor)` for each tensor, `factor` a 0-dim tensor on their device (read there: no
/// host synchronisation).
pub fn mul_tensor_(tensors: &[Tensor], factor: &Tensor) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let a = handles(tensors);
    // SAFETY: as in `zero_`; `factor` is live for the call.
    check(unsafe { cosine_foreach_mul_tensor_(a.as_ptr(), a.len() as i64, factor.as_ptr()) })
}

/// `t * s` for each tensor.
pub fn mul_scalar(tensors: &[Tensor], s: f64) -> Result<Vec<Tensor>> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let a = handles(tensors);
    let mut out = vec![std::ptr::null_mut(); a.len()];
    // SAFETY: as in `zero_`; `out` has room for one result per tensor.
    check(unsafe { cosine_foreach_mul_scalar(a.as_ptr(), a.len() as i64, s, out.as_mut_ptr()) })?;
    Ok(adopt(out))
}

/// `t[i] * s[i]` for each tensor.
pub fn mul_scalars(tensors: &[Tensor], s: &[f64]) -> Result<Vec<Tensor>> {
    assert_eq!(tensors.len(), s.len(), "one scalar per tensor");
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let a = handles(tensors);
    let mut out = vec![std::ptr::null_mut(); a.len()];
    // SAFETY: as in `mul_scalar`; `s` has one value per tensor.
    check(unsafe {
        cosine_foreach_mul_scalars(a.as_ptr(), a.len() as i64, s.as_ptr(), out.as_mut_ptr())
    })?;
    Ok(adopt(out))
}

/// `a[i] + b[i]` for each pair.
pub fn add(a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    assert_eq!(a.len(), b.len(), "lists of equal length");
    if a.is_empty() {
        return Ok(Vec::new());
    }
    let (ha, hb) = (handles(a), handles(b));
    let mut out = vec![std::ptr::null_mut(); a.len()];
    // SAFETY: as in `mul_scalar`.
    check(unsafe {
        cosine_foreach_add_list(ha.as_ptr(), hb.as_ptr(), ha.len() as i64, out.as_mut_ptr())
    })?;
    Ok(adopt(out))
}

/// `a[i].add_(b[i])` for each pair.
pub fn add_(a: &[Tensor], b: &[Tensor]) -> Result<()> {
    in_place_pairs(a, b, cosine_foreach_add_list_)
}

/// `a[i].sub_(b[i])` for each pair.
pub fn sub_(a: &[Tensor], b: &[Tensor]) -> Result<()> {
    in_place_pairs(a, b, cosine_foreach_sub_list_)
}

/// Runs the shim's in-place list-list `op` on `a` and `b`.
fn in_place_pairs(
    a: &[Tensor],
    b: &[Tensor],
    op: unsafe extern "C" fn(*const *mut C_tensor, *const *mut C_tensor, i64) -> *mut c_char,
) -> Result<()> {
    assert_eq!(a.len(), b.len(), "lists of equal length");
    if a.is_empty() {
        return Ok(()); // libtorch refuses empty lists
    }
    let (ha, hb) = (handles(a), handles(b));
    // SAFETY: `ha` and `hb` hold live handles, as many as `op` is told, for the call.
    check(unsafe { op(ha.as_ptr(), hb.as_ptr(), ha.len() as i64) })
}

/// Leaves each tensor without a gradient, so that backward stores the next one instead of
/// adding it to zeros (PyTorch's `zero_grad(set_to_none=True)`).
pub fn clear_grads(tensors: &[Tensor]) -> Result<()> {
    let a = handles(tensors);
    // SAFETY: as in `zero_`; each handle's gradient slot is reset in place.
    check(unsafe { cosine_clear_grads(a.as_ptr(), a.len() as i64) })
}

/// The 2-norm of each tensor, as 0-dim tensors on their device (on CUDA one launch per group
/// of tensors; on the CPU libtorch's `linalg_vector_norm` of each, not a sum of squares).
pub fn norms(tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let a = handles(tensors);
    let mut out = vec![std::ptr::null_mut(); a.len()];
    // SAFETY: as in `mul_scalar`.
    check(unsafe { cosine_foreach_norm(a.as_ptr(), a.len() as i64, out.as_mut_ptr()) })?;
    Ok(adopt(out))
}

/// Counts the operators libtorch dispatches, on every thread, while it lives: the outermost
/// ones only (an operator that another calls is part of that one). Autograd's accumulation of
/// each parameter's gradient is not seen (measured: a backward pass counts the same with a
/// gradient to add to and without). On a GPU each is roughly a
/// kernel launch, so the count per step is what the host must issue. Counting slows each
/// operator slightly; benchmarks use it, training does not. Counters may overlap.
pub struct OpCounter {
    start: i64,
    start_views: i64,
    start_here: i64,
}

impl OpCounter {
    pub fn start() -> Result<Self> {
        // SAFETY: takes a lock in the shim; adding the callback twice is prevented there.
        check(unsafe { cosine_count_ops(1) })?;
        Ok(OpCounter {
            // SAFETY: reads an atomic.
            start: unsafe { cosine_ops_counted() },
            // SAFETY: reads an atomic.
            start_views: unsafe { cosine_view_ops_counted() },
            // SAFETY: reads a thread-local.
            start_here: unsafe { cosine_ops_counted_here() },
        })
    }

    /// Operators dispatched since [`OpCounter::start`].
    pub fn count(&self) -> u64 {
        // SAFETY: reads an atomic.
        (unsafe { cosine_ops_counted() } - self.start).max(0) as u64
    }

    /// Of [`OpCounter::count`], those that only make a view or a new handle of existing memory
    /// (`detach`, `view`, `narrow`, `empty`...): no kernel on a GPU.
    pub fn views(&self) -> u64 {
        // SAFETY: reads an atomic.
        (unsafe { cosine_view_ops_counted() } - self.start_views).max(0) as u64
    }

    /// Operators dispatched since [`OpCounter::start`] by this thread (when it started the
    /// counter).
    pub fn count_here(&self) -> u64 {
        // SAFETY: reads a thread-local.
        (unsafe { cosine_ops_counted_here() } - self.start_here).max(0) as u64
    }
}

impl Drop for OpCounter {
    fn drop(&mut self) {
        // SAFETY: as in `start`. Errors (none are expected) leave the counter on, harmlessly.
        let _ = check(unsafe { cosine_count_ops(0) });
    }
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
            Err(ShimError(message)) => {
                assert!(!tch::Cuda::is_available(), "{message}");
                assert!(message.contains("pin"), "{message}");
                assert!(!message.contains("frame #"), "{message}");
            }
        }
        assert!(empty_pinned(&[1], Kind::Half).is_err());
    }

    fn random(sizes: &[&[i64]], seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        sizes
            .iter()
            .map(|s| Tensor::randn(*s, tch::kind::FLOAT_CPU))
            .collect()
    }

    fn same(a: &[Tensor], b: &[Tensor]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.equal(y))
    }

    /// Each multi-tensor op equals the per-tensor loop bit for bit, including in place on a
    /// channels-last tensor.
    #[test]
    fn multi_tensor_ops_equal_per_tensor_loops() {
        let sizes: &[&[i64]] = &[&[7], &[3, 5], &[4, 3, 2, 2], &[1]];
        let a = random(sizes, 1);
        let b = random(sizes, 2);
        let s = [0.5, -1.25e-3, 3.0, 1e-7];

        let ours = mul_scalar(&a, 0.37).unwrap();
        let loop_: Vec<Tensor> = a.iter().map(|t| t * 0.37).collect();
        assert!(same(&ours, &loop_));
        let ours = mul_scalars(&a, &s).unwrap();
        let loop_: Vec<Tensor> = a.iter().zip(s).map(|(t, s)| t * s).collect();
        assert!(same(&ours, &loop_));
        let ours = add(&a, &b).unwrap();
        let loop_: Vec<Tensor> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert!(same(&ours, &loop_));

        let copies = |v: &[Tensor]| v.iter().map(|t| t.copy()).collect::<Vec<_>>();
        let mut y = copies(&a);
        let x: Vec<Tensor> = (a.iter().enumerate())
            .map(|(i, t)| match i {
                2 => crate::model::channels_last(t),
                _ => t.copy(),
            })
            .collect();
        mul_scalar_(&x, 0.9).unwrap();
        mul_tensor_(&x, &Tensor::from(1.5f32)).unwrap();
        sub_(&x, &b).unwrap();
        add_(&x, &a).unwrap();
        for (t, (bb, aa)) in y.iter_mut().zip(b.iter().zip(&a)) {
            let _ = t.g_mul_scalar_(0.9);
            let _ = t.g_mul_(&Tensor::from(1.5f32));
            let _ = t.g_sub_(bb);
            let _ = t.g_add_(aa);
        }
        assert!(same(&x, &y));
        assert!(crate::model::is_channels_last(&x[2]));
        zero_(&x).unwrap();
        // Empty lists (libtorch refuses them) do nothing.
        zero_(&[]).unwrap();
        assert!(add(&[], &[]).unwrap().is_empty() && mul_scalar(&[], 2.0).unwrap().is_empty());
        assert!(x.iter().all(|t| t.abs().max().double_value(&[]) == 0.0));
    }

    #[test]
    fn the_counter_sees_each_outermost_operator_once() {
        let a = random(&[&[3], &[4], &[5]], 1);
        let counter = OpCounter::start().unwrap();
        // Another counter's end does not stop this one.
        drop(OpCounter::start().unwrap());
        let mut sum = a[0].copy();
        // Other tests run beside this one: count this thread's operators.
        let before = counter.count_here();
        for _ in 0..5 {
            sum = &sum + &a[0];
        }
        let loop_ops = counter.count_here() - before;
        zero_(&a).unwrap();
        let foreach_ops = counter.count_here() - before - loop_ops;
        let views = counter.views();
        let _ = a[1].narrow(0, 1, 2).detach();
        assert!(counter.views() >= views + 2);
        assert!(counter.count() >= loop_ops + foreach_ops);
        assert_eq!((loop_ops, foreach_ops), (5, 1));
        let norms = norms(&random(&[&[3, 4], &[2]], 3)).unwrap();
        assert_eq!(norms.len(), 2);
        assert!(
            norms
                .iter()
                .all(|n| n.dim() == 0 && n.double_value(&[]) > 0.0)
        );
    }

    #[test]
    fn cleared_gradients_are_undefined_and_backward_stores_the_next() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        (&w * 3.0).sum(tch::Kind::Float).backward();
        clear_grads(std::slice::from_ref(&w)).unwrap();
        assert!(!w.grad().defined());
        (&w * 5.0).sum(tch::Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [5.0, 5.0]);
    }

    #[test]
    fn mismatched_lists_are_libtorch_errors_not_crashes() {
        let a = random(&[&[3]], 1);
        let b = random(&[&[4]], 2);
        let err = add_(&a, &b).unwrap_err();
        assert!(!err.0.is_empty() && !err.0.contains("frame #"), "{err}");
    }
}
