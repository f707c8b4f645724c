// CPU kernel of bissl::cg_direction_: p = r + beta*p in place (reads r, p; writes p).
#include "bissl_cg_loops.h"
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace bissl {
namespace {

void cg_direction_cpu(at::Tensor& p, const at::Tensor& r, const at::Tensor& beta) {
  check_flat_vectors("cg_direction_", c10::DeviceType::CPU, {{"p", &p}, {"r", &r}});
  const double b = cpu_step_size("cg_direction_", "beta", beta);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "bissl_cg_direction_cpu", [&] {
    scalar_t* p_p = p.mutable_data_ptr<scalar_t>();
    const scalar_t* r_p = r.const_data_ptr<scalar_t>();
    const auto beta_t = static_cast<scalar_t>(b);
    chunked_for(p.numel(), [&](int64_t lo, int64_t hi) { cg_direction_segment<scalar_t>(p_p, r_p, beta_t, lo, hi); });
  });
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("cg_direction_", &bissl::cg_direction_cpu); }
