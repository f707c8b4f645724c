// CUDA kernel of bissl::axpby: a*x + b*y (reads 2 vectors, writes 1).
#include "reduce.cuh"

namespace bissl {
namespace cuda {
namespace {

template <typename T>
__global__ void axpby_kernel(T a, const T* __restrict__ x, T b, const T* __restrict__ y, T* __restrict__ out,
                             int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) out[i] = a * x[i] + b * y[i];
}

}  // namespace

template <typename T>
cudaError_t axpby_launch(double a, const T* x, double b, const T* y, T* out, int64_t n, cudaStream_t stream) {
  axpby_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(static_cast<T>(a), x, static_cast<T>(b), y, out, n);
  return cudaGetLastError();
}

template cudaError_t axpby_launch<float>(double, const float*, double, const float*, float*, int64_t, cudaStream_t);
template cudaError_t axpby_launch<double>(double, const double*, double, const double*, double*, int64_t,
                                          cudaStream_t);

}  // namespace cuda
}  // namespace bissl
