// Deterministic block reduction shared by the CUDA reduction kernels (float64 accumulation).
#pragma once

#include <cuda_runtime.h>

#include "launchers.h"

namespace bissl {
namespace cuda {

// Sum of `v` over the block, valid in thread 0. Fixed order: warp shuffles, then warp 0 adds the
// per-warp totals. Requires blockDim.x == kThreads (a multiple of 32).
__device__ inline double block_sum(double v) {
  __shared__ double warp_totals[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_totals[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// out[0] = sum(partials[0:count]) in a fixed order, rounded once to T. One block of kThreads.
template <typename T>
__global__ void finalize_sum_kernel(const double* __restrict__ partials, int count, T* __restrict__ out) {
  double v = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) v += partials[i];
  v = block_sum(v);
  if (threadIdx.x == 0) out[0] = static_cast<T>(v);
}

__device__ inline int64_t grid_start() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ inline int64_t grid_stride() { return int64_t{gridDim.x} * blockDim.x; }

}  // namespace cuda
}  // namespace bissl
