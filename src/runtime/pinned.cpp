// Page-locked host tensors allocated as such (libtorch's pinned allocator), for batches bound
// for a GPU. tch offers only Tensor::pin_memory(device), which copies an existing tensor and whose
// device argument libtorch 2.11 deprecates with a warning per call.
#include <ATen/ATen.h>

#include <cstring>
#include <exception>

extern "C" {

// dtype: 0 = float32, 1 = int64. Returns a new at::Tensor* (what tch's C_tensor points to), or
// null with *error set to a malloc'd message.
void *cosine_empty_pinned(const int64_t *sizes, int64_t ndim, int dtype, char **error) {
  try {
    auto kind = dtype == 1 ? at::kLong : at::kFloat;
    auto options = at::TensorOptions().dtype(kind).device(at::kCPU).pinned_memory(true);
    auto t = at::empty(at::IntArrayRef(sizes, static_cast<size_t>(ndim)), options);
    return new at::Tensor(std::move(t));
  } catch (const c10::Error &e) {
    *error = strdup(e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception &e) {
    *error = strdup(e.what());
    return nullptr;
  }
}

void cosine_free_error(char *error) { free(error); }
}
