// The CG vector-update loops shared by the whole-vector CPU kernels (csrc/cpu/cg_step.cpp,
// cg_direction.cpp) and the per-block ones of layer-wise CG (csrc/cpu/cg_blocks.cpp).
#pragma once

#include "bissl_parallel.h"

#include <algorithm>
#include <cstdint>

namespace bissl {

// x += alpha*p, r -= alpha*Ap over [begin, end); returns the new r.r there, summed in double
// (SIMD lanes within kSumBlock-element blocks, the block sums in order).
template <typename T>
double cg_step_segment(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p, const T* __restrict__ ap,
                       T alpha, int64_t begin, int64_t end) {
  double acc = 0.0;
  for (int64_t lo = begin; lo < end; lo += kSumBlock) {
    const int64_t hi = std::min(end, lo + kSumBlock);
    double block = 0.0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = lo; i < hi; ++i) {
      x[i] = x[i] + alpha * p[i];
      const T ri = r[i] - alpha * ap[i];
      r[i] = ri;
      block += static_cast<double>(ri) * static_cast<double>(ri);
    }
    acc += block;
  }
  return acc;
}

// p = r + beta*p over [begin, end).
template <typename T>
void cg_direction_segment(T* __restrict__ p, const T* __restrict__ r, T beta, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    p[i] = r[i] + beta * p[i];
  }
}

}  // namespace bissl
