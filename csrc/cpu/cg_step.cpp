// CPU kernel of bissl::cg_step_: x += alpha*p, r -= alpha*Ap and the new r.r in one pass
// (reads x, r, p, Ap; writes x, r). r.r accumulates in double.
#include "bissl_cg_loops.h"
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

namespace bissl {
namespace {

at::Tensor cg_step_cpu(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& ap,
                       const at::Tensor& alpha) {
  check_flat_vectors("cg_step_", c10::DeviceType::CPU, {{"x", &x}, {"r", &r}, {"p", &p}, {"ap", &ap}});
  const double a = cpu_step_size("cg_step_", "alpha", alpha);
  double rr = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bissl_cg_step_cpu", [&] {
    scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
    scalar_t* r_p = r.mutable_data_ptr<scalar_t>();
    const scalar_t* p_p = p.const_data_ptr<scalar_t>();
    const scalar_t* ap_p = ap.const_data_ptr<scalar_t>();
    const auto alpha_t = static_cast<scalar_t>(a);
    rr = chunked_sum(x.numel(), [&](int64_t b, int64_t e) {
      return cg_step_segment<scalar_t>(x_p, r_p, p_p, ap_p, alpha_t, b, e);
    });
  });
  return at::scalar_tensor(rr, x.options());
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("cg_step_", &bissl::cg_step_cpu); }
