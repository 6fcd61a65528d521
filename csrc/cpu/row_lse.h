// The log-sum-exp of one logit row on the CPU, in the CUDA row kernels' arithmetic order: lane t
// of kRowThreads folds logits t, t + kRowThreads, ... with lse_add (as thread t does), then the
// lanes merge with lse_merge as the xor shuffles of each warp and then of warp 0 over the warps'
// results do (csrc/cuda/block_reduce.cuh). One algorithm for both backends, so that the CPU tests
// check the GPU's reduction, -inf rows included.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

#include "common/token_logprobs.h"

namespace unlearn_fast {
namespace token_logprobs {

// lanes[0..32) after the butterfly of __shfl_xor_sync offsets 16, 8, 4, 2, 1; returns lane 0's state.
template <typename acc_t>
LseState<acc_t> warp_butterfly(LseState<acc_t>* lanes) {
  std::array<LseState<acc_t>, 32> next;
  for (int offset = 16; offset > 0; offset >>= 1) {
    for (int i = 0; i < 32; ++i) next[i] = lse_merge(lanes[i], lanes[i ^ offset]);
    for (int i = 0; i < 32; ++i) lanes[i] = next[i];
  }
  return lanes[0];
}

template <typename scalar_t, typename acc_t>
LseState<acc_t> row_lse_state(const scalar_t* row, int64_t vocab) {
  constexpr int kWarps = kRowThreads / 32;
  std::array<LseState<acc_t>, kRowThreads> lanes;
  lanes.fill(lse_init<acc_t>());
  for (int64_t base = 0; base < vocab; base += kRowThreads) {
    const int n = static_cast<int>(std::min<int64_t>(kRowThreads, vocab - base));
    for (int t = 0; t < n; ++t) lse_add(lanes[t], static_cast<acc_t>(row[base + t]));
  }
  std::array<LseState<acc_t>, 32> warps;
  warps.fill(lse_init<acc_t>());
  for (int w = 0; w < kWarps; ++w) warps[w] = warp_butterfly(lanes.data() + 32 * w);
  return warp_butterfly(warps.data());
}

}  // namespace token_logprobs
}  // namespace unlearn_fast
