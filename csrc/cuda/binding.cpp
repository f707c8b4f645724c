// Thin torch binding of the CUDA kernels: validates tensors (csrc/bissl_ops.h), picks the current
// stream, allocates outputs and registers each kernel for the bissl::<op> schema (defined in
// bissl/ops/_library.py) under the CUDA dispatch key. Built on GPU machines by
// bissl.ops._backends.load_cuda_extension() with torch.utils.cpp_extension.load.
#include "bissl_ops.h"
#include "cuda/launchers.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace bissl {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "bissl.", op, " (CUDA kernel): launch failed: ", cudaGetErrorString(err));
}

// A step size as a one-element tensor of `like`'s dtype on its device. No host sync: a CUDA
// scalar is converted on the device; a CPU scalar is copied asynchronously.
at::Tensor device_step_size(const char* op, const char* name, const at::Tensor& s, const at::Tensor& like) {
  TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, "bissl.", op, " (CUDA kernel): ", name, " must have one element");
  TORCH_CHECK_TYPE(s.is_floating_point(), "bissl.", op, " (CUDA kernel): ", name, " must be floating point, got ",
                   s.scalar_type());
  TORCH_CHECK_VALUE(s.is_cpu() || s.device() == like.device(), "bissl.", op, " (CUDA kernel): ", name, " is on ",
                    s.device(), " but the vectors are on ", like.device());
  return s.reshape({1}).to(like.options(), /*non_blocking=*/true);
}

at::Tensor partials_for(int64_t n, const at::Tensor& like) {
  return at::empty({cuda::reduction_blocks(n)}, like.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor> damped_matvec_cuda(const at::Tensor& hv, const at::Tensor& v, double scale,
                                                      double shift) {
  check_flat_vectors("damped_matvec", c10::DeviceType::CUDA, {{"hv", &hv}, {"v", &v}});
  const c10::cuda::CUDAGuard guard(hv.device());
  const int64_t n = hv.numel();
  at::Tensor av = at::empty_like(hv);
  if (n == 0) return {av, at::zeros({}, hv.options())};
  at::Tensor vav = at::empty({}, hv.options());
  at::Tensor partials = partials_for(n, hv);
  AT_DISPATCH_FLOATING_TYPES(hv.scalar_type(), "bissl_damped_matvec_cuda", [&] {
    check_launch(cuda::damped_matvec_launch<scalar_t>(
                     hv.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), av.mutable_data_ptr<scalar_t>(),
                     vav.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<double>(), scale, shift, n,
                     c10::cuda::getCurrentCUDAStream()),
                 "damped_matvec");
  });
  return {av, vav};
}

at::Tensor cg_step_cuda(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& ap,
                        const at::Tensor& alpha) {
  check_flat_vectors("cg_step_", c10::DeviceType::CUDA, {{"x", &x}, {"r", &r}, {"p", &p}, {"ap", &ap}});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return at::zeros({}, x.options());
  const at::Tensor a = device_step_size("cg_step_", "alpha", alpha, x);
  at::Tensor rr = at::empty({}, x.options());
  at::Tensor partials = partials_for(n, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bissl_cg_step_cuda", [&] {
    check_launch(cuda::cg_step_launch<scalar_t>(
                     x.mutable_data_ptr<scalar_t>(), r.mutable_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
                     ap.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), rr.mutable_data_ptr<scalar_t>(),
                     partials.mutable_data_ptr<double>(), n, c10::cuda::getCurrentCUDAStream()),
                 "cg_step_");
  });
  return rr;
}

void cg_direction_cuda(at::Tensor& p, const at::Tensor& r, const at::Tensor& beta) {
  check_flat_vectors("cg_direction_", c10::DeviceType::CUDA, {{"p", &p}, {"r", &r}});
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t n = p.numel();
  if (n == 0) return;
  const at::Tensor b = device_step_size("cg_direction_", "beta", beta, p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "bissl_cg_direction_cuda", [&] {
    check_launch(cuda::cg_direction_launch<scalar_t>(p.mutable_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                                     b.const_data_ptr<scalar_t>(), n,
                                                     c10::cuda::getCurrentCUDAStream()),
                 "cg_direction_");
  });
}

at::Tensor prox_grad_cuda(const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& phi, double lam) {
  check_flat_vectors("prox_grad", c10::DeviceType::CUDA, {{"grad", &grad}, {"theta", &theta}, {"phi", &phi}});
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "bissl_prox_grad_cuda", [&] {
    check_launch(cuda::prox_grad_launch<scalar_t>(grad.const_data_ptr<scalar_t>(), theta.const_data_ptr<scalar_t>(),
                                                  phi.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                  lam, n, c10::cuda::getCurrentCUDAStream()),
                 "prox_grad");
  });
  return out;
}

at::Tensor axpby_cuda(double a, const at::Tensor& x, double b, const at::Tensor& y) {
  check_flat_vectors("axpby", c10::DeviceType::CUDA, {{"x", &x}, {"y", &y}});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bissl_axpby_cuda", [&] {
    check_launch(cuda::axpby_launch<scalar_t>(a, x.const_data_ptr<scalar_t>(), b, y.const_data_ptr<scalar_t>(),
                                              out.mutable_data_ptr<scalar_t>(), n, c10::cuda::getCurrentCUDAStream()),
                 "axpby");
  });
  return out;
}

}  // namespace
}  // namespace bissl

TORCH_LIBRARY_IMPL(bissl, CUDA, m) {
  m.impl("damped_matvec", &bissl::damped_matvec_cuda);
  m.impl("cg_step_", &bissl::cg_step_cuda);
  m.impl("cg_direction_", &bissl::cg_direction_cuda);
  m.impl("prox_grad", &bissl::prox_grad_cuda);
  m.impl("axpby", &bissl::axpby_cuda);
}
