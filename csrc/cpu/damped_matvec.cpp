// CPU kernel of bissl::damped_matvec: Av = scale*Hv + shift*v fused with vAv = v.Av.
// One pass reads Hv, v and writes Av; the dot product accumulates in double (float32 inputs too).
#include "bissl_damped.h"
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <tuple>

namespace bissl {
namespace {

std::tuple<at::Tensor, at::Tensor> damped_matvec_cpu(const at::Tensor& hv, const at::Tensor& v, double scale,
                                                     double shift) {
  check_flat_vectors("damped_matvec", c10::DeviceType::CPU, {{"hv", &hv}, {"v", &v}});
  at::Tensor av = at::empty_like(hv);
  double vav = 0.0;
  AT_DISPATCH_FLOATING_TYPES(hv.scalar_type(), "bissl_damped_matvec_cpu", [&] {
    const scalar_t* hv_p = hv.const_data_ptr<scalar_t>();
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    scalar_t* av_p = av.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale), d = static_cast<scalar_t>(shift);
    vav = chunked_sum(hv.numel(), [&](int64_t b, int64_t e) {
      return damped_segment<scalar_t>(hv_p + b, v_p + b, av_p + b, s, d, e - b);
    });
  });
  return {av, at::scalar_tensor(vav, hv.options())};
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("damped_matvec", &bissl::damped_matvec_cpu); }
