// CPU kernel of bissl::damped_into_: out = scale*cat(hv) + shift*v fused with vAv = v.out, reading
// the matvec's pieces where they lie (no concatenated copy) and writing a preallocated buffer.
// Chunks of the concatenated index space run in parallel, each over the pieces it overlaps, with the
// loop of damped_matvec (bissl_damped.h); the chunk partials are summed in order.
#include "bissl_damped.h"
#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace bissl {
namespace {

at::Tensor damped_into_cpu(at::Tensor& out, at::TensorList hv, const at::Tensor& v, double scale, double shift) {
  check_flat_vectors("damped_into_", c10::DeviceType::CPU, {{"out", &out}, {"v", &v}});
  const std::vector<int64_t> offsets = piece_offsets("damped_into_", hv, v);
  double vav = 0.0;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bissl_damped_into_cpu", [&] {
    const std::vector<const scalar_t*> ptrs = piece_pointers<scalar_t>(hv);
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale), d = static_cast<scalar_t>(shift);
    vav = chunked_sum(v.numel(), [&](int64_t b, int64_t e) {
      return damped_pieces<scalar_t>(ptrs, offsets, v_p, out_p, s, d, b, e);
    });
  });
  return at::scalar_tensor(vav, v.options());
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) { m.impl("damped_into_", &bissl::damped_into_cpu); }
