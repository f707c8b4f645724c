// Deterministic OpenMP loops over fixed chunks, shared by the CPU kernels (csrc/cpu/<op>.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace bissl {

// Elements per parallel task. 16 Ki elements (64 KiB of float32 per vector) keeps each task's
// arrays streaming through L2 and makes thread start-up negligible from ~1e5 elements on.
constexpr int64_t kChunk = int64_t{1} << 14;

// Reductions add kSumBlock terms in SIMD lanes, then add the block sums in order: a two-level sum
// whose rounding error grows with kSumBlock / lanes + chunk / kSumBlock instead of chunk / lanes.
constexpr int64_t kSumBlock = 256;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

inline int threads_for(int64_t chunks) {
  // Follow torch.set_num_threads (the same libgomp is shared with torch).
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)));
}

// f(begin, end) over fixed chunks of [0, n), in parallel.
template <typename F>
void chunked_for(int64_t n, const F& f) {
  const int64_t chunks = num_chunks(n);
  if (chunks <= 1) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads_for(chunks))
  for (int64_t c = 0; c < chunks; ++c) {
    f(c * kChunk, std::min(n, (c + 1) * kChunk));
  }
}

// Sum of f(begin, end) -> double over fixed chunks of [0, n). Deterministic for ANY thread count:
// the chunk boundaries depend on n only and the per-chunk partials are added in chunk order
// (an OpenMP `reduction` clause would combine per-thread sums in an unspecified order).
template <typename F>
double chunked_sum(int64_t n, const F& f) {
  const int64_t chunks = num_chunks(n);
  if (chunks <= 1) {
    return f(int64_t{0}, n);
  }
  std::vector<double> partial(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(static) num_threads(threads_for(chunks))
  for (int64_t c = 0; c < chunks; ++c) {
    partial[c] = f(c * kChunk, std::min(n, (c + 1) * kChunk));
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace bissl
