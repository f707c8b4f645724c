// CUDA kernel of bissl::cg_step_: x += alpha*p, r -= alpha*Ap and r.r in one pass (reads x, r, p,
// Ap; writes x, r). alpha is read from device memory; r.r accumulates in float64 (cheap on data
// centre GPUs; on consumer parts with 1/64-rate float64 this add could become the bottleneck).
#include "reduce.cuh"

namespace bissl {
namespace cuda {
namespace {

template <typename T>
__global__ void cg_step_kernel(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p,
                               const T* __restrict__ ap, const T* __restrict__ alpha, double* __restrict__ partials,
                               int64_t n) {
  const T a = *alpha;
  double acc = 0.0;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    x[i] = x[i] + a * p[i];
    const T ri = r[i] - a * ap[i];
    r[i] = ri;
    acc += static_cast<double>(ri) * static_cast<double>(ri);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

}  // namespace

template <typename T>
cudaError_t cg_step_launch(T* x, T* r, const T* p, const T* ap, const T* alpha, T* rr, double* partials, int64_t n,
                           cudaStream_t stream) {
  const int blocks = reduction_blocks(n);
  cg_step_kernel<T><<<blocks, kThreads, 0, stream>>>(x, r, p, ap, alpha, partials, n);
  finalize_sum_kernel<T><<<1, kThreads, 0, stream>>>(partials, blocks, rr);
  return cudaGetLastError();
}

template cudaError_t cg_step_launch<float>(float*, float*, const float*, const float*, const float*, float*, double*,
                                           int64_t, cudaStream_t);
template cudaError_t cg_step_launch<double>(double*, double*, const double*, const double*, const double*, double*,
                                            double*, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace bissl
