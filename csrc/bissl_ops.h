// Shared by the CPU kernels of the fused vector ops: input checks and a deterministic OpenMP
// chunked loop/reduction. The op schemas live in bissl/ops/_library.py (the single definition);
// each csrc/cpu/<op>.cpp only registers its kernel with TORCH_LIBRARY_IMPL(bissl, CPU, m).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace bissl {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// The flat-vector contract (twin of kernels/_checks.py): 1-D, contiguous, float32/float64, one
// dtype, one length, all on `device`. Errors name the op, the argument and the problem, and raise
// the same Python exception types as the Python checks (ValueError, TypeError for a dtype).
inline void check_flat_vectors(const char* op, c10::DeviceType device, std::initializer_list<NamedTensor> vectors) {
  const NamedTensor& first = *vectors.begin();
  for (const NamedTensor& nt : vectors) {
    const char* name = nt.first;
    const char* kernel = c10::DeviceTypeName(device).c_str();
    const at::Tensor& t = *nt.second;
    TORCH_CHECK_VALUE(t.defined(), "bissl.", op, " (", kernel, " kernel): ", name, " is undefined");
    TORCH_CHECK_VALUE(t.device().type() == device, "bissl.", op, " (", kernel, " kernel): ", name, " is on ", t.device(),
                " but this kernel runs on ", kernel);
    TORCH_CHECK_VALUE(t.dim() == 1, "bissl.", op, " (", kernel, " kernel): ", name, " must be a flat (P,) tensor, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), "bissl.", op, " (", kernel, " kernel): ", name, " is not contiguous (stride ", t.strides(),
                "); the fused ops work on flat buffers, pass a contiguous tensor");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "bissl.", op, " (", kernel, " kernel): ", name,
                " has dtype ", t.scalar_type(), "; supported: float32, float64");
    const at::Tensor& f = *first.second;
    TORCH_CHECK_VALUE(t.numel() == f.numel(), "bissl.", op, " (", kernel, " kernel): ", name, " has ", t.numel(), " elements but ",
                first.first, " has ", f.numel());
    TORCH_CHECK_VALUE(t.scalar_type() == f.scalar_type(), "bissl.", op, " (", kernel, " kernel): ", name, " is ", t.scalar_type(),
                " but ", first.first, " is ", f.scalar_type());
  }
}

// A step size (alpha/beta): one-element floating tensor. On CPU reading it is free (no sync).
inline double cpu_step_size(const char* op, const char* name, const at::Tensor& s) {
  TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, "bissl.", op, " (", kernel, " kernel): ", name, " must have one element");
  TORCH_CHECK_TYPE(s.is_floating_point(), "bissl.", op, " (", kernel, " kernel): ", name, " must be floating point, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.device().is_cpu(), "bissl.", op, " (", kernel, " kernel): ", name, " is on ", s.device(), ", expected cpu");
  return s.item<double>();
}

// Elements per parallel task. 16 Ki elements (64 KiB of float32 per vector) keeps each task's
// arrays streaming through L2 and makes thread start-up negligible from ~1e5 elements on.
constexpr int64_t kChunk = int64_t{1} << 14;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

inline int threads_for(int64_t chunks) {
  // Follow torch.set_num_threads (the same libgomp is shared with torch).
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)));
}

// f(begin, end) over fixed chunks of [0, n), in parallel.
template <typename F>
void chunked_for(int64_t n, const F& f) {
  const int64_t chunks = num_chunks(n);
  if (chunks <= 1) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads_for(chunks))
  for (int64_t c = 0; c < chunks; ++c) {
    f(c * kChunk, std::min(n, (c + 1) * kChunk));
  }
}

// Sum of f(begin, end) -> double over fixed chunks of [0, n). Deterministic for ANY thread count:
// the chunk boundaries depend on n only and the per-chunk partials are added in chunk order
// (an OpenMP `reduction` clause would combine per-thread sums in an unspecified order).
template <typename F>
double chunked_sum(int64_t n, const F& f) {
  const int64_t chunks = num_chunks(n);
  if (chunks <= 1) {
    return f(int64_t{0}, n);
  }
  std::vector<double> partial(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(static) num_threads(threads_for(chunks))
  for (int64_t c = 0; c < chunks; ++c) {
    partial[c] = f(c * kChunk, std::min(n, (c + 1) * kChunk));
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace bissl
