// CPU kernel of bissl::axpby: a*x + b*y (reads 2 vectors, writes 1).
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace bissl {
namespace {

template <typename T>
void axpby_chunk(T a, const T* __restrict__ x, T b, const T* __restrict__ y, T* __restrict__ out, int64_t begin,
                 int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    out[i] = a * x[i] + b * y[i];
  }
}

at::Tensor axpby_cpu(double a, const at::Tensor& x, double b, const at::Tensor& y) {
  check_flat_vectors("axpby", c10::DeviceType::CPU, {{"x", &x}, {"y", &y}});
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bissl_axpby_cpu", [&] {
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* y_p = y.const_data_ptr<scalar_t>();
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    const auto a_t = static_cast<scalar_t>(a), b_t = static_cast<scalar_t>(b);
    chunked_for(x.numel(), [&](int64_t lo, int64_t hi) { axpby_chunk<scalar_t>(a_t, x_p, b_t, y_p, o_p, lo, hi); });
  });
  return out;
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("axpby", &bissl::axpby_cpu); }
