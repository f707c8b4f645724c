// CUDA kernel of bissl::cg_direction_: p = r + beta*p in place (reads r, p; writes p).
#include "reduce.cuh"

namespace bissl {
namespace cuda {
namespace {

template <typename T>
__global__ void cg_direction_kernel(T* __restrict__ p, const T* __restrict__ r, const T* __restrict__ beta,
                                    int64_t n) {
  const T b = *beta;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) p[i] = r[i] + b * p[i];
}

}  // namespace

template <typename T>
cudaError_t cg_direction_launch(T* p, const T* r, const T* beta, int64_t n, cudaStream_t stream) {
  cg_direction_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(p, r, beta, n);
  return cudaGetLastError();
}

template cudaError_t cg_direction_launch<float>(float*, const float*, const float*, int64_t, cudaStream_t);
template cudaError_t cg_direction_launch<double>(double*, const double*, const double*, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace bissl
