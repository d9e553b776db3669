// The few libtorch calls tch does not expose, as C functions over tch's tensor handles (each a
// heap at::Tensor*). Every function returns null on success, or a malloc'd error message that
// the caller frees with cosine_free_error; a tensor it creates is a new at::Tensor* that the
// caller owns.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace {

// Returned when the message itself cannot be copied; never freed.
char kNoMemory[] = "out of memory while reporting a libtorch error";

char *error_text(const char *text) {
  char *copy = strdup(text);
  return copy != nullptr ? copy : kNoMemory;
}

// Runs body; nothing may unwind into Rust.
template <typename F> char *guarded(F body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error &e) {
    return error_text(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return error_text(e.what());
  } catch (...) {
    return error_text("an unknown C++ exception");
  }
}

std::vector<at::Tensor> list(at::Tensor **tensors, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

// Moves results into new handles; if one allocation fails, the ones made are freed again.
void hand_out(std::vector<at::Tensor> results, at::Tensor **out) {
  size_t made = 0;
  try {
    for (; made < results.size(); ++made) out[made] = new at::Tensor(std::move(results[made]));
  } catch (...) {
    for (size_t j = 0; j < made; ++j) {
      delete out[j];
      out[j] = nullptr;
    }
    throw;
  }
}

// The operator counter: the outermost dispatched operators (those not called by another
// operator), on every thread, while it is on.
// Also counted apart: those that only make a new view or handle of existing memory (no
// kernel on a GPU).
std::atomic<int64_t> outer_ops{0};
std::atomic<int64_t> outer_views{0};
thread_local int depth = 0;
thread_local int64_t outer_ops_here = 0;
std::mutex counter_lock;
std::optional<at::CallbackHandle> counter;
int counters_alive = 0;  // under counter_lock: the callback goes when the last counter does

bool is_view_only(const char *name) {
  static const std::unordered_set<std::string_view> views = {
      "aten::detach",    "aten::detach_",     "aten::alias",     "aten::view",
      "aten::_unsafe_view", "aten::reshape",  "aten::_reshape_alias", "aten::as_strided",
      "aten::narrow",    "aten::slice",       "aten::select",    "aten::t",
      "aten::transpose", "aten::permute",     "aten::expand",    "aten::unsqueeze",
      "aten::squeeze",   "aten::split_with_sizes", "aten::unbind", "aten::lift_fresh",
      "aten::empty",     "aten::empty_strided", "aten::empty_like", "aten::set_",
      "aten::resize_",   "aten::flatten",     "aten::numpy_T",   "aten::chunk",
      "aten::split",     "aten::unflatten",   "aten::expand_as", "aten::view_as"};
  return name != nullptr && views.count(name) != 0;
}

std::unique_ptr<at::ObserverContext> op_started(const at::RecordFunction &fn) {
  if (depth++ == 0) {
    outer_ops.fetch_add(1, std::memory_order_relaxed);
    ++outer_ops_here;
    if (is_view_only(fn.name())) outer_views.fetch_add(1, std::memory_order_relaxed);
  }
  return nullptr;
}

void op_ended(const at::RecordFunction &, at::ObserverContext *) { --depth; }

}  // namespace

extern "C" {

void cosine_free_error(char *error) {
  if (error != kNoMemory) free(error);
}

// Page-locked host tensors allocated as such (libtorch's caching host allocator), for batches
// bound for a GPU; tch only offers pin_memory(device), a copy whose device argument libtorch
// 2.11 deprecates. dtype: 0 = float32, 1 = int64.
char *cosine_empty_pinned(const int64_t *sizes, int64_t ndim, int dtype, at::Tensor **out) {
  return guarded([&] {
    auto kind = dtype == 1 ? at::kLong : at::kFloat;
    auto options = at::TensorOptions().dtype(kind).device(at::kCPU).pinned_memory(true);
    *out = new at::Tensor(at::empty(at::IntArrayRef(sizes, static_cast<size_t>(ndim)), options));
  });
}

// Multi-tensor ops: one kernel launch per group of tensors on CUDA instead of one per tensor;
// on the CPU libtorch runs the per-tensor op for each, so results equal a loop of them.
char *cosine_foreach_zero_(at::Tensor **a, int64_t n) {
  return guarded([&] { at::_foreach_zero_(list(a, n)); });
}

char *cosine_foreach_mul_scalar_(at::Tensor **a, int64_t n, double s) {
  return guarded([&] { at::_foreach_mul_(list(a, n), s); });
}

char *cosine_foreach_mul_tensor_(at::Tensor **a, int64_t n, at::Tensor *t) {
  return guarded([&] { at::_foreach_mul_(list(a, n), *t); });
}

char *cosine_foreach_mul_scalar(at::Tensor **a, int64_t n, double s, at::Tensor **out) {
  return guarded([&] { hand_out(at::_foreach_mul(list(a, n), s), out); });
}

char *cosine_foreach_mul_scalars(at::Tensor **a, int64_t n, const double *s, at::Tensor **out) {
  return guarded([&] {
    std::vector<at::Scalar> scalars(s, s + n);
    hand_out(at::_foreach_mul(list(a, n), scalars), out);
  });
}

char *cosine_foreach_add_list(at::Tensor **a, at::Tensor **b, int64_t n, at::Tensor **out) {
  return guarded([&] { hand_out(at::_foreach_add(list(a, n), list(b, n)), out); });
}

char *cosine_foreach_add_list_(at::Tensor **a, at::Tensor **b, int64_t n) {
  return guarded([&] { at::_foreach_add_(list(a, n), list(b, n)); });
}

// Leaves each tensor without a gradient (PyTorch's zero_grad(set_to_none=True)): backward
// then stores the new gradient instead of adding it to zeros.
char *cosine_clear_grads(at::Tensor **a, int64_t n) {
  return guarded([&] {
    for (int64_t i = 0; i < n; ++i) a[i]->mutable_grad().reset();
  });
}

// The 2-norm of each tensor (0-dim tensors on their device).
char *cosine_foreach_norm(at::Tensor **a, int64_t n, at::Tensor **out) {
  return guarded([&] { hand_out(at::_foreach_norm(list(a, n), 2), out); });
}

char *cosine_foreach_sub_list_(at::Tensor **a, at::Tensor **b, int64_t n) {
  return guarded([&] { at::_foreach_sub_(list(a, n), list(b, n)); });
}

// A counter starts (on != 0) or ends: operators are counted while any counter lives. Counting
// slows every operator a little: it is for benchmarks, not training.
char *cosine_count_ops(int on) {
  return guarded([&] {
    std::lock_guard<std::mutex> guard(counter_lock);
    if (on != 0) {
      if (!counter) {
        counter = at::addGlobalCallback(
            at::RecordFunctionCallback(op_started, op_ended).scopes({at::RecordScope::FUNCTION}));
      }
      ++counters_alive;
    } else if (counters_alive > 0 && --counters_alive == 0 && counter) {
      at::removeCallback(*counter);
      counter.reset();
    }
  });
}

// Outermost operators dispatched while counting was on, since the process started.
int64_t cosine_ops_counted() { return outer_ops.load(std::memory_order_relaxed); }

// Of those, the ones that only make a view or handle of existing memory.
int64_t cosine_view_ops_counted() { return outer_views.load(std::memory_order_relaxed); }

// The same as cosine_ops_counted, on the calling thread only.
int64_t cosine_ops_counted_here() { return outer_ops_here; }
}
