// CPU kernel of bissl::prox_grad: grad + lam*(theta - phi) (reads 3 vectors, writes 1).
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace bissl {
namespace {

template <typename T>
void prox_grad_chunk(const T* __restrict__ grad, const T* __restrict__ theta, const T* __restrict__ phi,
                     T* __restrict__ out, T lam, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    out[i] = grad[i] + lam * (theta[i] - phi[i]);
  }
}

at::Tensor prox_grad_cpu(const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& phi, double lam) {
  check_flat_vectors("prox_grad", c10::DeviceType::CPU, {{"grad", &grad}, {"theta", &theta}, {"phi", &phi}});
  at::Tensor out = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "bissl_prox_grad_cpu", [&] {
    const scalar_t* g_p = grad.const_data_ptr<scalar_t>();
    const scalar_t* t_p = theta.const_data_ptr<scalar_t>();
    const scalar_t* f_p = phi.const_data_ptr<scalar_t>();
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    const auto lam_t = static_cast<scalar_t>(lam);
    chunked_for(grad.numel(), [&](int64_t b, int64_t e) { prox_grad_chunk<scalar_t>(g_p, t_p, f_p, o_p, lam_t, b, e); });
  });
  return out;
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("prox_grad", &bissl::prox_grad_cpu); }
