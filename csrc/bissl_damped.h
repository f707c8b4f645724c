// The damped-matvec inner loop shared by the CPU kernels bissl::damped_matvec (one flat Hv) and
// bissl::damped_into_ (Hv as pieces): out = scale*hv + shift*v over n elements, returning v.out
// summed in double: SIMD lanes within kSumBlock-element blocks, the block sums added in order.
#pragma once

#include "bissl_parallel.h"

#include <algorithm>
#include <cstdint>

namespace bissl {

template <typename T>
double damped_segment(const T* __restrict__ hv, const T* __restrict__ v, T* __restrict__ out, T scale, T shift,
                      int64_t n) {
  double acc = 0.0;
  for (int64_t lo = 0; lo < n; lo += kSumBlock) {
    const int64_t hi = std::min(n, lo + kSumBlock);
    double block = 0.0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = lo; i < hi; ++i) {
      const T a = scale * hv[i] + shift * v[i];
      out[i] = a;
      block += static_cast<double>(v[i]) * static_cast<double>(a);
    }
    acc += block;
  }
  return acc;
}

}  // namespace bissl
