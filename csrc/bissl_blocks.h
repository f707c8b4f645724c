// Per-block loops over a flat vector cut into blocks (the per-tensor blocks of layer-wise CG), for
// the CPU kernels of csrc/cpu/cg_blocks.cpp. The flat index space is cut into the fixed chunks of
// bissl_parallel.h, run in parallel; a chunk visits the blocks it overlaps, in order. A per-block
// sum adds one partial per (chunk, block) overlap, the partials in index order, so the result does
// not depend on the number of threads.
#pragma once

#include "bissl_parallel.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace bissl {

// Block k is [offsets[k], offsets[k+1]); offsets[0] = 0, offsets.back() = n, non-decreasing.
class BlockPlan {
 public:
  BlockPlan(const std::vector<int64_t>& offsets, int64_t n) : offsets_(offsets), n_(n) {
    const int64_t chunks = num_chunks(n);
    first_block_.resize(static_cast<size_t>(chunks));
    first_record_.resize(static_cast<size_t>(chunks) + 1, 0);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * kChunk, e = std::min(n, (c + 1) * kChunk);
      // The last block starting at or before b (empty blocks are skipped over), and the last one
      // starting before e.
      const int64_t k0 = block_at(b), k1 = block_at(e - 1);
      first_block_[c] = k0;
      first_record_[c + 1] = first_record_[c] + (k1 - k0 + 1);
      for (int64_t k = k0; k <= k1; ++k) record_block_.push_back(k);
    }
  }

  int64_t blocks() const { return static_cast<int64_t>(offsets_.size()) - 1; }

  // f(lo, hi, k) for every non-empty overlap of block k with a chunk, chunks in parallel.
  template <typename F>
  void for_each(const F& f) const {
    run([&](int64_t lo, int64_t hi, int64_t k, int64_t) { f(lo, hi, k); });
  }

  // Per-block sums of f(lo, hi, k) -> double (empty blocks: 0).
  template <typename F>
  std::vector<double> sums(const F& f) const {
    std::vector<double> record(record_block_.size(), 0.0);
    run([&](int64_t lo, int64_t hi, int64_t k, int64_t j) { record[j] = f(lo, hi, k); });
    std::vector<double> out(static_cast<size_t>(blocks()), 0.0);
    for (size_t j = 0; j < record.size(); ++j) out[record_block_[j]] += record[j];
    return out;
  }

 private:
  int64_t block_at(int64_t i) const {
    // The block holding index i: the last k with offsets[k] <= i < offsets[k+1].
    auto it = std::upper_bound(offsets_.begin(), offsets_.end(), i);
    return static_cast<int64_t>(it - offsets_.begin()) - 1;
  }

  // g(lo, hi, k, record) over every overlap; record numbers the (chunk, block) pairs in order.
  template <typename G>
  void run(const G& g) const {
    const int64_t chunks = num_chunks(n_);
    auto chunk = [&](int64_t c) {
      const int64_t b = c * kChunk, e = std::min(n_, (c + 1) * kChunk);
      int64_t k = first_block_[c];
      for (int64_t j = first_record_[c]; j < first_record_[c + 1]; ++j, ++k) {
        const int64_t lo = std::max(b, offsets_[k]), hi = std::min(e, offsets_[k + 1]);
        if (hi > lo) g(lo, hi, k, j);
      }
    };
    if (chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) chunk(c);
      return;
    }
#pragma omp parallel for schedule(static) num_threads(threads_for(chunks))
    for (int64_t c = 0; c < chunks; ++c) chunk(c);
  }

  std::vector<int64_t> offsets_;
  int64_t n_;
  std::vector<int64_t> first_block_;
  std::vector<int64_t> first_record_;
  std::vector<int64_t> record_block_;  // the block of each (chunk, block) record
};

}  // namespace bissl
