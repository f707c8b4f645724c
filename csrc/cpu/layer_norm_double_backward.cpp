// CPU kernel of bissl::layer_norm_double_backward: the double backward of layer_norm's first
// backward (formulas and torch reference in bissl/ops/layernorm_double_backward.py). Per row of D
// features: one pass for the five row sums, one pass that writes d_gy and d_x and adds gy*s*P(u)
// into d_w's partial. The reference spends about twenty full-size torch ops on the same work, each
// a separate pass over memory with its own allocation and dispatch: that, not arithmetic, is its cost.
//
// d_w sums over rows. Rows are taken in fixed blocks of kRowBlock; each block adds its rows in
// order into its own float64 partial, and the partials are added in block order, so the result
// does not depend on the number of threads.
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace bissl {
namespace {

constexpr const char* kOp = "layer_norm_double_backward";
constexpr int64_t kRowBlock = 16;
// Below this many elements one thread does it all: an OpenMP fork costs more than the work.
constexpr int64_t kSerialElements = int64_t{1} << 15;

void check_rows(const char* name, const at::Tensor& t, const at::Tensor& like, int64_t m, int64_t d) {
  const char* op = kOp;
  const char* kernel = "CPU";
  BISSL_CHECK_ARG(VALUE, t.defined() && t.device().is_cpu(), " must be a CPU tensor");
  BISSL_CHECK_ARG(VALUE, t.dim() == 2 && t.size(0) == m && t.size(1) == d, " must have shape (", m, ", ", d,
                  "), got ", t.sizes());
  BISSL_CHECK_ARG(VALUE, t.is_contiguous(), " is not contiguous (stride ", t.strides(), ")");
  BISSL_CHECK_ARG(TYPE, t.scalar_type() == like.scalar_type(), " is ", t.scalar_type(), " but xhat is ",
                  like.scalar_type());
}

// An optional per-feature (D,) or per-row (M, 1) vector: defined -> contiguous, n elements.
void check_vector(const char* name, const at::Tensor& t, const at::Tensor& like, int64_t n) {
  const char* op = kOp;
  const char* kernel = "CPU";
  BISSL_CHECK_ARG(VALUE, t.device().is_cpu(), " must be a CPU tensor");
  BISSL_CHECK_ARG(VALUE, t.numel() == n, " must have ", n, " elements, got shape ", t.sizes());
  BISSL_CHECK_ARG(VALUE, t.is_contiguous(), " is not contiguous (stride ", t.strides(), ")");
  BISSL_CHECK_ARG(TYPE, t.scalar_type() == like.scalar_type(), " is ", t.scalar_type(), " but xhat is ",
                  like.scalar_type());
}

template <typename T>
struct Rows {
  const T *u, *cw, *cb, *gy, *xh, *s, *gx, *mg, *w;
  T *dgy, *dx;
  int64_t d;
};

// Rows [r0, r1); adds gy*s*P(u) into dw (D doubles, this block's partial) when non-null. Absent
// c_w, c_b, w arrive as zeros, zeros, ones (D-sized, in L1): one loop shape, same values.
template <typename T>
void rows_kernel(const Rows<T>& a, int64_t r0, int64_t r1, double* dw) {
  const int64_t d = a.d;
  const double inv_d = 1.0 / static_cast<double>(d);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * d;
    const T* __restrict__ u = a.u + o;
    const T* __restrict__ gy = a.gy + o;
    const T* __restrict__ xh = a.xh + o;
    const T* __restrict__ gx = a.gx + o;
    const T* __restrict__ cw = a.cw;
    double su = 0.0, suxh = 0.0, sugx = 0.0, sz = 0.0, szxh = 0.0;
#pragma omp simd reduction(+ : su, suxh, sugx, sz, szxh)
    for (int64_t j = 0; j < d; ++j) {
      const double uj = u[j];
      const double z = static_cast<double>(cw[j]) * gy[j];
      su += uj;
      suxh += uj * xh[j];
      sugx += uj * gx[j];
      sz += z;
      szxh += z * xh[j];
    }
    const double sr = a.s[r];
    const T mu = static_cast<T>(su * inv_d), mux = static_cast<T>(suxh * inv_d);
    const T mz = static_cast<T>(sz * inv_d), mzx = static_cast<T>(szxh * inv_d);
    const T s = static_cast<T>(sr);
    const T ca = static_cast<T>(-sr * sr * static_cast<double>(a.mg[r]));
    const T cb_ = static_cast<T>(-sr * sugx * inv_d);
    const T cc = static_cast<T>(-sr * suxh * inv_d);
    const T* __restrict__ w = a.w;
    const T* __restrict__ cbias = a.cb;
    T* __restrict__ dgy = a.dgy + o;
    T* __restrict__ dx = a.dx + o;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const T pu = u[j] - mu - xh[j] * mux;
      const T spu = s * pu;
      dgy[j] = spu * w[j] + xh[j] * cw[j] + cbias[j];
      dx[j] = pu * ca + xh[j] * cb_ + gx[j] * cc + s * (cw[j] * gy[j] - mz - xh[j] * mzx);
    }
    if (dw != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        dw[j] += static_cast<double>(gy[j] * (s * (u[j] - mu - xh[j] * mux)));
      }
    }
  }
}

// All m rows in parallel blocks; d_w (D values) is written when non-null. (A function of its own:
// an OpenMP pragma may not sit inside the AT_DISPATCH macro's argument.)
template <typename T>
void run_rows(const Rows<T>& a, int64_t m, T* d_w) {
  const int64_t d = a.d;
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(d_w != nullptr ? static_cast<size_t>(blocks * d) : 0, 0.0);
  double* p = partial.data();
  const int threads = m * d < kSerialElements ? 1 : threads_for(blocks);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    rows_kernel(a, b * kRowBlock, std::min(m, (b + 1) * kRowBlock), d_w != nullptr ? p + b * d : nullptr);
  }
  if (d_w == nullptr) return;
  for (int64_t j = 0; j < d; ++j) {
    double acc = 0.0;
    for (int64_t b = 0; b < blocks; ++b) acc += p[b * d + j];
    d_w[j] = static_cast<T>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_double_backward_cpu(
    const at::Tensor& u, const std::optional<at::Tensor>& c_w, const std::optional<at::Tensor>& c_b,
    const at::Tensor& gy, const at::Tensor& xhat, const at::Tensor& s, const at::Tensor& gx,
    const at::Tensor& m_gxh, const std::optional<at::Tensor>& w) {
  {
    const char* op = kOp;
    const char* kernel = "CPU";
    const char* name = "xhat";
    BISSL_CHECK_ARG(VALUE, xhat.dim() == 2, " must be (M, D) rows, got shape ", xhat.sizes());
    BISSL_CHECK_ARG(TYPE, xhat.scalar_type() == at::kFloat || xhat.scalar_type() == at::kDouble, " has dtype ",
                    xhat.scalar_type(), "; supported: float32, float64");
  }
  const int64_t m = xhat.size(0), d = xhat.size(1);
  check_rows("xhat", xhat, xhat, m, d);
  check_rows("u", u, xhat, m, d);
  check_rows("gy", gy, xhat, m, d);
  check_rows("gx", gx, xhat, m, d);
  check_vector("s", s, xhat, m);
  check_vector("m_gxh", m_gxh, xhat, m);
  const bool has_w = w.has_value() && w->defined();
  const bool has_cw = c_w.has_value() && c_w->defined();
  const bool has_cb = c_b.has_value() && c_b->defined();
  if (has_w) check_vector("w", *w, xhat, d);
  if (has_cw) check_vector("c_w", *c_w, xhat, d);
  if (has_cb) check_vector("c_b", *c_b, xhat, d);

  at::Tensor d_gy = at::empty({m, d}, xhat.options());
  at::Tensor d_x = at::empty({m, d}, xhat.options());
  at::Tensor d_w = at::empty({has_w ? d : 0}, xhat.options());
  if (m == 0 || d == 0) {
    if (has_w) d_w.zero_();
    return {d_gy, d_x, d_w};
  }
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "bissl_layer_norm_double_backward_cpu", [&] {
    // Absent optional vectors as their neutral values, so the row loops have one shape.
    std::vector<scalar_t> zeros(static_cast<size_t>(d), scalar_t(0)), ones(static_cast<size_t>(d), scalar_t(1));
    Rows<scalar_t> a{u.const_data_ptr<scalar_t>(),
                     has_cw ? c_w->const_data_ptr<scalar_t>() : zeros.data(),
                     has_cb ? c_b->const_data_ptr<scalar_t>() : zeros.data(),
                     gy.const_data_ptr<scalar_t>(),
                     xhat.const_data_ptr<scalar_t>(),
                     s.const_data_ptr<scalar_t>(),
                     gx.const_data_ptr<scalar_t>(),
                     m_gxh.const_data_ptr<scalar_t>(),
                     has_w ? w->const_data_ptr<scalar_t>() : ones.data(),
                     d_gy.mutable_data_ptr<scalar_t>(),
                     d_x.mutable_data_ptr<scalar_t>(),
                     d};
    run_rows(a, m, has_w ? d_w.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {d_gy, d_x, d_w};
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("layer_norm_double_backward", &bissl::layer_norm_double_backward_cpu); }
