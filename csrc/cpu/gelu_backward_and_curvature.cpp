// CPU kernel of bissl::gelu_backward_and_curvature: for the exact (erf) gelu at a linearisation
// point, gx = gy * gelu'(x) (gelu'(x) = d1, precomputed) and the double backward's coefficient
// gy * gelu''(x), gelu''(x) = phi(x) (2 - x^2), phi the standard normal density. One pass reading
// gy, x, d1 and writing both, where the torch reference (bissl/ops/gelu_double_backward.py) takes
// eight full-size passes with four allocations.
//
// float32: exp by Cody-Waite range reduction and a degree-6 polynomial (the Cephes expf
// coefficients; ~2 ulp), written so the compiler vectorises it (std::exp does not vectorise without
// -ffast-math). float64: std::exp, as the reference's precision needs.
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace bissl {
namespace {

constexpr const char* kOp = "gelu_backward_and_curvature";
constexpr double kInvSqrt2Pi = 0.398942280401432677939946059934;

// exp(x) for x <= 0 (the only arguments here: -x^2/2). Below -87, where float32's exp leaves the
// normal range, it returns 0 (std::exp gives a subnormal or 0 there: a difference below 2e-38).
inline float exp_nonpositive(float x) {
  const float keep = x >= -87.0f ? 1.0f : 0.0f;
  x = x >= -87.0f ? x : -87.0f;
  // Round to nearest by adding and removing 1.5 * 2^23 (floor is a library call without SSE4.1).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return keep * (e * scale);
}

inline float gaussian(float x) { return static_cast<float>(kInvSqrt2Pi) * exp_nonpositive(-0.5f * x * x); }
inline double gaussian(double x) { return kInvSqrt2Pi * std::exp(-0.5 * x * x); }

template <typename T>
void segment(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ d1, T* __restrict__ gx,
             T* __restrict__ gy_d2, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i];
    gx[i] = gy[i] * d1[i];
    gy_d2[i] = gy[i] * (gaussian(xi) * (T(2) - xi * xi));
  }
}

void check(const char* name, const at::Tensor& t, const at::Tensor& like) {
  const char* op = kOp;
  const char* kernel = "CPU";
  BISSL_CHECK_ARG(VALUE, t.defined() && t.device().is_cpu(), " must be a CPU tensor");
  BISSL_CHECK_ARG(VALUE, t.sizes() == like.sizes(), " has shape ", t.sizes(), " but x has ", like.sizes());
  BISSL_CHECK_ARG(VALUE, t.is_contiguous(), " is not contiguous (stride ", t.strides(), ")");
  BISSL_CHECK_ARG(TYPE, t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, " has dtype ",
                  t.scalar_type(), "; supported: float32, float64");
  BISSL_CHECK_ARG(TYPE, t.scalar_type() == like.scalar_type(), " is ", t.scalar_type(), " but x is ",
                  like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> gelu_backward_and_curvature_cpu(const at::Tensor& gy, const at::Tensor& x,
                                                                   const at::Tensor& d1) {
  check("x", x, x);
  check("gy", gy, x);
  check("d1", d1, x);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gy_d2 = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bissl_gelu_backward_and_curvature_cpu", [&] {
    const scalar_t* gy_p = gy.const_data_ptr<scalar_t>();
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* d1_p = d1.const_data_ptr<scalar_t>();
    scalar_t* gx_p = gx.mutable_data_ptr<scalar_t>();
    scalar_t* c_p = gy_d2.mutable_data_ptr<scalar_t>();
    chunked_for(x.numel(), [&](int64_t b, int64_t e) {
      segment<scalar_t>(gy_p + b, x_p + b, d1_p + b, gx_p + b, c_p + b, e - b);
    });
  });
  return {gx, gy_d2};
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("gelu_backward_and_curvature", &bissl::gelu_backward_and_curvature_cpu); }
