// The damped-matvec inner loop shared by the CPU kernels bissl::damped_matvec (one flat Hv),
// bissl::damped_into_ and bissl::damped_into_blocks_ (Hv as pieces): out = scale*hv + shift*v,
// returning v.out summed in double: SIMD lanes within kSumBlock-element blocks, the block sums
// added in order. Also the pieces' checks and the walk over the pieces a range overlaps.
#pragma once

#include "bissl_ops.h"
#include "bissl_parallel.h"

#include <ATen/core/ATen_fwd.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Checks that `hv`'s pieces are contiguous CPU tensors of v's dtype holding v.numel() elements in
// all; returns where each piece starts in the flat vector, and the total last (size pieces + 1).
inline std::vector<int64_t> piece_offsets(const char* op, at::TensorList hv, const at::Tensor& v) {
  const char* kernel = "CPU";
  std::vector<int64_t> starts(hv.size() + 1, 0);
  for (size_t k = 0; k < hv.size(); ++k) {
    const at::Tensor& t = hv[k];
    const char* name = "a piece of hv";
    BISSL_CHECK_ARG(VALUE, t.defined() && t.device().is_cpu(), " must be a CPU tensor");
    BISSL_CHECK_ARG(VALUE, t.is_contiguous(), " (piece ", k, ") is not contiguous");
    BISSL_CHECK_ARG(TYPE, t.scalar_type() == v.scalar_type(), " (piece ", k, ") is ", t.scalar_type(), " but v is ",
                    v.scalar_type());
    starts[k + 1] = starts[k] + t.numel();
  }
  const char* name = "hv";
  BISSL_CHECK_ARG(VALUE, starts.back() == v.numel(), "'s pieces hold ", starts.back(), " elements but v has ",
                  v.numel());
  return starts;
}

// The data of each of hv's pieces (checked by piece_offsets), for damped_pieces.
template <typename T>
std::vector<const T*> piece_pointers(at::TensorList hv) {
  std::vector<const T*> ptrs(hv.size());
  for (size_t k = 0; k < hv.size(); ++k) ptrs[k] = hv[k].const_data_ptr<T>();
  return ptrs;
}

// damped_segment over the flat range [b, e) when hv is given as pieces (piece k holds the flat
// elements [starts[k], starts[k+1])): the last piece starting at or before b, then every piece that
// overlaps the range, read where it lies.
template <typename T>
double damped_pieces(const std::vector<const T*>& pieces, const std::vector<int64_t>& starts, const T* v, T* out,
                     T scale, T shift, int64_t b, int64_t e) {
  size_t k = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), b) - starts.begin()) - 1;
  double acc = 0.0;
  for (int64_t lo = b; lo < e; ++k) {
    const int64_t hi = std::min(e, starts[k + 1]);
    if (hi > lo) acc += damped_segment<T>(pieces[k] + (lo - starts[k]), v + lo, out + lo, scale, shift, hi - lo);
    lo = std::max(lo, hi);
  }
  return acc;
}

}  // namespace bissl
