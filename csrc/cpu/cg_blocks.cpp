// CPU kernels of layer-wise CG's per-block vector work, every block in one call (schemas and torch
// references in bissl/ops/_library.py and bissl/ops/reference.py):
//
//   damped_into_blocks_(out!, hv[], v, scale, shift, offsets) -> vAv per block
//       out = scale*cat(hv) + shift*v, and v.out summed per block (the epilogue of damped_into_
//       with the block dots that layer-wise CG needs, in the same pass);
//   cg_step_blocks_(x!, r!, p, ap, alpha, offsets) -> r.r per block
//       x += alpha_k p, r -= alpha_k Ap on block k;
//   cg_direction_blocks_(p!, r, beta, offsets)
//       p = r + beta_k p on block k.
//
// The per-block torch loop they replace makes three small calls per block and iteration (a
// ResNet-18 has 60 blocks) and reads p and Ap once more for the block dots. Block k is
// [offsets[k], offsets[k+1]); sums are in double, in a fixed order (bissl_blocks.h).
#include "bissl_blocks.h"
#include "bissl_cg_loops.h"
#include "bissl_damped.h"
#include "bissl_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace bissl {
namespace {

std::vector<int64_t> checked_offsets(const char* op, at::IntArrayRef offsets, int64_t n) {
  const char* kernel = "CPU";
  const char* name = "offsets";
  BISSL_CHECK_ARG(VALUE, offsets.size() >= 2, " must hold at least one block (2 values), got ", offsets.size());
  BISSL_CHECK_ARG(VALUE, offsets.front() == 0 && offsets.back() == n, " must run from 0 to the vectors' length ", n,
                  ", got ", offsets.front(), " .. ", offsets.back());
  for (size_t k = 1; k < offsets.size(); ++k) {
    BISSL_CHECK_ARG(VALUE, offsets[k] >= offsets[k - 1], " must be non-decreasing (offsets[", k, "] = ", offsets[k],
                    " < ", offsets[k - 1], ")");
  }
  return std::vector<int64_t>(offsets.begin(), offsets.end());
}

// One step size per block, read on the host (free on CPU).
std::vector<double> per_block(const char* op, const char* name, const at::Tensor& s, int64_t blocks) {
  const char* kernel = "CPU";
  BISSL_CHECK_ARG(VALUE, s.defined() && s.device().is_cpu() && s.dim() == 1 && s.size(0) == blocks,
                  " must be a CPU tensor of one value per block (", blocks, "), got shape ", s.sizes());
  BISSL_CHECK_ARG(TYPE, s.is_floating_point(), " must be floating point, got ", s.scalar_type());
  const at::Tensor d = s.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + blocks);
}

at::Tensor as_tensor(const std::vector<double>& sums, const at::Tensor& like) {
  at::Tensor out = at::empty({static_cast<int64_t>(sums.size())}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "bissl_block_sums", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (size_t k = 0; k < sums.size(); ++k) o[k] = static_cast<scalar_t>(sums[k]);
  });
  return out;
}

at::Tensor damped_into_blocks_cpu(at::Tensor& out, at::TensorList hv, const at::Tensor& v, double scale,
                                  double shift, at::IntArrayRef offsets) {
  const char* op = "damped_into_blocks_";
  check_flat_vectors(op, c10::DeviceType::CPU, {{"out", &out}, {"v", &v}});
  const std::vector<int64_t> starts = piece_offsets(op, hv, v);
  const BlockPlan plan(checked_offsets(op, offsets, v.numel()), v.numel());
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bissl_damped_into_blocks_cpu", [&] {
    const std::vector<const scalar_t*> ptrs = piece_pointers<scalar_t>(hv);
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale), d = static_cast<scalar_t>(shift);
    sums = plan.sums([&](int64_t b, int64_t e, int64_t) {
      return damped_pieces<scalar_t>(ptrs, starts, v_p, out_p, s, d, b, e);
    });
  });
  return as_tensor(sums, v);
}

at::Tensor cg_step_blocks_cpu(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& ap,
                              const at::Tensor& alpha, at::IntArrayRef offsets) {
  const char* op = "cg_step_blocks_";
  check_flat_vectors(op, c10::DeviceType::CPU, {{"x", &x}, {"r", &r}, {"p", &p}, {"ap", &ap}});
  const BlockPlan plan(checked_offsets(op, offsets, x.numel()), x.numel());
  const std::vector<double> a = per_block(op, "alpha", alpha, plan.blocks());
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bissl_cg_step_blocks_cpu", [&] {
    scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
    scalar_t* r_p = r.mutable_data_ptr<scalar_t>();
    const scalar_t* p_p = p.const_data_ptr<scalar_t>();
    const scalar_t* ap_p = ap.const_data_ptr<scalar_t>();
    sums = plan.sums([&](int64_t b, int64_t e, int64_t k) {
      return cg_step_segment<scalar_t>(x_p, r_p, p_p, ap_p, static_cast<scalar_t>(a[k]), b, e);
    });
  });
  return as_tensor(sums, x);
}

void cg_direction_blocks_cpu(at::Tensor& p, const at::Tensor& r, const at::Tensor& beta, at::IntArrayRef offsets) {
  const char* op = "cg_direction_blocks_";
  check_flat_vectors(op, c10::DeviceType::CPU, {{"p", &p}, {"r", &r}});
  const BlockPlan plan(checked_offsets(op, offsets, p.numel()), p.numel());
  const std::vector<double> bt = per_block(op, "beta", beta, plan.blocks());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "bissl_cg_direction_blocks_cpu", [&] {
    scalar_t* p_p = p.mutable_data_ptr<scalar_t>();
    const scalar_t* r_p = r.const_data_ptr<scalar_t>();
    plan.for_each([&](int64_t b, int64_t e, int64_t k) {
      cg_direction_segment<scalar_t>(p_p, r_p, static_cast<scalar_t>(bt[k]), b, e);
    });
  });
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CPU, m) {
  m.impl("damped_into_blocks_", &bissl::damped_into_blocks_cpu);
  m.impl("cg_step_blocks_", &bissl::cg_step_blocks_cpu);
  m.impl("cg_direction_blocks_", &bissl::cg_direction_blocks_cpu);
}
