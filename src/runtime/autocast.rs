//! Mixed precision (`--precision bf16`): libtorch's autocast with bfloat16 on the tensors' device.
//!
//! `tch::autocast` switches on CUDA autocast only, at its default dtype, which is float16: a bf16
//! run through it would silently train in fp16 without loss scaling. libtorch has per-device
//! switches and dtypes (`at::autocast::set_autocast_enabled/set_autocast_dtype`) that torch-sys
//! does not wrap, so they are declared here by their C++ symbols in libtorch_cpu, which every
//! binary links. Both enums are `int8_t` underneath, passed like C integers; the nesting
//! counters return a C `int` (declaring them wider would read garbage into the upper half).

use tch::{Device, Kind};

mod ffi {
    unsafe extern "C" {
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: i8) -> i8;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device: i8) -> bool;
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> std::ffi::c_int;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> std::ffi::c_int;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

/// `c10::DeviceType` values.
const CPU: i8 = 0;
const CUDA: i8 = 1;

fn device_type(device: Device) -> i8 {
    if device.is_cuda() { CUDA } else { CPU }
}

/// The dtype autocast casts to on `device`'s type.
pub fn dtype(device: Device) -> Option<Kind> {
    // SAFETY: a plain getter of a global, for a valid device type.
    let code = unsafe { ffi::get_autocast_dtype(device_type(device)) };
    match code {
        5 => Some(Kind::Half),
        6 => Some(Kind::Float),
        15 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Whether autocast is on for `device`'s type.
pub fn enabled(device: Device) -> bool {
    // SAFETY: a plain getter of a thread-local flag, for a valid device type.
    unsafe { ffi::is_autocast_enabled(device_type(device)) }
}

/// Runs `f` with bfloat16 autocast on `device` when `bf16` is set (as PyTorch's
/// `torch.autocast(device_type, dtype=torch.bfloat16)`), and as is otherwise.
pub fn bf16<T>(bf16: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !bf16 {
        return f();
    }
    let dev = device_type(device);
    // SAFETY: these set libtorch's autocast state (a global dtype and thread-local flags) for
    // a valid device type, and restore the previous state afterwards, as PyTorch's context
    // manager does.
    let (old_dtype, was_enabled) = unsafe {
        let state = (ffi::get_autocast_dtype(dev), ffi::is_autocast_enabled(dev));
        ffi::set_autocast_dtype(dev, 15);
        ffi::set_autocast_enabled(dev, true);
        ffi::increment_nesting();
        state
    };
    struct Restore(i8, i8, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe {
                if ffi::decrement_nesting() == 0 {
                    ffi::clear_cache();
                }
                ffi::set_autocast_enabled(self.0, self.2);
                ffi::set_autocast_dtype(self.0, self.1);
            }
        }
    }
    let _restore = Restore(dev, old_dtype, was_enabled);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_autocast_casts_convolutions_and_restores_the_state() {
        let device = Device::Cpu;
        let before = (dtype(device), enabled(device));
        let x = tch::Tensor::randn([2, 3, 8, 8], tch::kind::FLOAT_CPU);
        let w = tch::Tensor::randn([4, 3, 3, 3], tch::kind::FLOAT_CPU);
        let conv = |x: &tch::Tensor| x.conv2d(&w, None::<&tch::Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let (inside, on) = bf16(true, device, || (conv(&x).kind(), enabled(device)));
        assert_eq!(inside, Kind::BFloat16);
        assert!(on);
        assert_eq!(conv(&x).kind(), Kind::Float);
        assert_eq!((dtype(device), enabled(device)), before);
        assert_eq!(bf16(false, device, || conv(&x).kind()), Kind::Float);
        // The CUDA dtype is set and read back without a GPU: the switch tch lacks.
        let cuda = Device::Cuda(0);
        let old = dtype(cuda);
        bf16(true, cuda, || assert_eq!(dtype(cuda), Some(Kind::BFloat16)));
        assert_eq!(dtype(cuda), old);
    }
}
