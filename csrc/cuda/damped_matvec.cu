// CUDA kernel of bissl::damped_matvec: Av = scale*Hv + shift*v and vAv = v.Av in one pass
// (reads Hv, v; writes Av), then one tiny block sums the per-block float64 partials.
#include "reduce.cuh"

namespace bissl {
namespace cuda {
namespace {

template <typename T>
__global__ void damped_matvec_kernel(const T* __restrict__ hv, const T* __restrict__ v, T* __restrict__ av,
                                     double* __restrict__ partials, T scale, T shift, int64_t n) {
  double acc = 0.0;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const T vi = v[i];
    const T a = scale * hv[i] + shift * vi;
    av[i] = a;
    acc += static_cast<double>(vi) * static_cast<double>(a);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

}  // namespace

template <typename T>
cudaError_t damped_matvec_launch(const T* hv, const T* v, T* av, T* vav, double* partials, double scale,
                                 double shift, int64_t n, cudaStream_t stream) {
  const int blocks = reduction_blocks(n);
  damped_matvec_kernel<T><<<blocks, kThreads, 0, stream>>>(hv, v, av, partials, static_cast<T>(scale),
                                                           static_cast<T>(shift), n);
  finalize_sum_kernel<T><<<1, kThreads, 0, stream>>>(partials, blocks, vav);
  return cudaGetLastError();
}

template cudaError_t damped_matvec_launch<float>(const float*, const float*, float*, float*, double*, double, double,
                                                 int64_t, cudaStream_t);
template cudaError_t damped_matvec_launch<double>(const double*, const double*, double*, double*, double*, double,
                                                  double, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace bissl
