// Input checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda/binding.cpp) kernels of the fused
// vector ops. The op schemas live in bissl/ops/_library.py (the single definition); the kernels
// only register against them with TORCH_LIBRARY_IMPL(bissl, CPU|CUDA, m).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace bissl {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// The flat-vector contract (twin of kernels/_checks.py): 1-D, contiguous, float32/float64, one
// dtype, one length, all on `device`. Errors name the op, the kernel, the argument and the problem,
// and raise the Python exception types of the Python checks (ValueError; TypeError for a dtype).
#define BISSL_CHECK_ARG(kind, cond, ...) \
  TORCH_CHECK_##kind(cond, "bissl.", op, " (", kernel, " kernel): ", name, __VA_ARGS__)

inline void check_flat_vectors(const char* op, c10::DeviceType device, std::initializer_list<NamedTensor> vectors) {
  const char* kernel = device == c10::DeviceType::CPU ? "CPU" : "CUDA";
  const NamedTensor& first = *vectors.begin();
  const at::Tensor& f = *first.second;
  for (const NamedTensor& nt : vectors) {
    const char* name = nt.first;
    const at::Tensor& t = *nt.second;
    BISSL_CHECK_ARG(VALUE, t.defined(), " is undefined");
    BISSL_CHECK_ARG(VALUE, t.device().type() == device, " is on ", t.device(), " but this kernel runs on ", kernel);
    BISSL_CHECK_ARG(VALUE, t.device() == f.device(), " is on ", t.device(), " but ", first.first, " is on ", f.device());
    BISSL_CHECK_ARG(VALUE, t.dim() == 1, " must be a flat (P,) tensor, got shape ", t.sizes());
    BISSL_CHECK_ARG(VALUE, t.is_contiguous(), " is not contiguous (stride ", t.strides(),
                    "); the fused ops work on flat buffers, pass a contiguous tensor");
    BISSL_CHECK_ARG(TYPE, t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, " has dtype ",
                    t.scalar_type(), "; supported: float32, float64");
    BISSL_CHECK_ARG(VALUE, t.numel() == f.numel(), " has ", t.numel(), " elements but ", first.first, " has ",
                    f.numel());
    BISSL_CHECK_ARG(VALUE, t.scalar_type() == f.scalar_type(), " is ", t.scalar_type(), " but ", first.first,
                    " is ", f.scalar_type());
  }
}

// A step size (alpha/beta) for a CPU kernel: a one-element floating CPU tensor. Reading it on the
// host is free here (no device sync).
inline double cpu_step_size(const char* op, const char* name, const at::Tensor& s) {
  const char* kernel = "CPU";
  BISSL_CHECK_ARG(VALUE, s.defined() && s.numel() == 1, " must have one element");
  BISSL_CHECK_ARG(TYPE, s.is_floating_point(), " must be floating point, got ", s.scalar_type());
  BISSL_CHECK_ARG(VALUE, s.device().is_cpu(), " is on ", s.device(), ", expected cpu");
  return s.item<double>();
}

}  // namespace bissl
