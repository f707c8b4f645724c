// CUDA kernel of bissl::prox_grad: grad + lam*(theta - phi) (reads 3 vectors, writes 1).
#include "reduce.cuh"

namespace bissl {
namespace cuda {
namespace {

template <typename T>
__global__ void prox_grad_kernel(const T* __restrict__ grad, const T* __restrict__ theta, const T* __restrict__ phi,
                                 T* __restrict__ out, T lam, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) out[i] = grad[i] + lam * (theta[i] - phi[i]);
}

}  // namespace

template <typename T>
cudaError_t prox_grad_launch(const T* grad, const T* theta, const T* phi, T* out, double lam, int64_t n,
                             cudaStream_t stream) {
  prox_grad_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(grad, theta, phi, out, static_cast<T>(lam), n);
  return cudaGetLastError();
}

template cudaError_t prox_grad_launch<float>(const float*, const float*, const float*, float*, double, int64_t,
                                             cudaStream_t);
template cudaError_t prox_grad_launch<double>(const double*, const double*, const double*, double*, double, int64_t,
                                              cudaStream_t);

}  // namespace cuda
}  // namespace bissl
