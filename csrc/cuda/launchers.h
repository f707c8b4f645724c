// Torch-free interface of the CUDA kernels (csrc/cuda/<op>.cu): raw pointers, a length and a
// stream. csrc/cuda/binding.cpp is the thin torch layer that validates tensors and calls these.
// Kept free of torch headers so `make cuda-check` can compile every .cu with plain nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace bissl {
namespace cuda {

constexpr int kThreads = 256;     // threads per block (8 warps)
constexpr int kMaxBlocks = 1024;  // reduction partials; one block sums them in a fixed order

// Blocks of a grid-stride reduction over n elements: a function of n only, so the float64
// partials, and therefore the result, are the same on every run (no atomics anywhere).
inline int reduction_blocks(int64_t n) {
  const int64_t per_block = int64_t{kThreads} * 4;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Blocks of a grid-stride elementwise kernel over n elements (4 elements per thread at least).
inline int elementwise_blocks(int64_t n) {
  const int64_t per_block = int64_t{kThreads} * 4;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError(). Reductions need
// `partials` of reduction_blocks(n) doubles and write their scalar result to device memory.
// Step sizes (alpha, beta) are device pointers: the CG loop never reads them on the host.

template <typename T>
cudaError_t damped_matvec_launch(const T* hv, const T* v, T* av, T* vav, double* partials, double scale,
                                 double shift, int64_t n, cudaStream_t stream);

template <typename T>
cudaError_t cg_step_launch(T* x, T* r, const T* p, const T* ap, const T* alpha, T* rr, double* partials, int64_t n,
                           cudaStream_t stream);

template <typename T>
cudaError_t cg_direction_launch(T* p, const T* r, const T* beta, int64_t n, cudaStream_t stream);

template <typename T>
cudaError_t prox_grad_launch(const T* grad, const T* theta, const T* phi, T* out, double lam, int64_t n,
                             cudaStream_t stream);

template <typename T>
cudaError_t axpby_launch(double a, const T* x, double b, const T* y, T* out, int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace bissl
