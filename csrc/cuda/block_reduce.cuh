// Block-wide reductions shared by the row kernels (one thread block of kThreads per row):
// shuffles within each warp, then the warps' results through shared memory. Every thread of the
// block receives the result.
#pragma once
#include "common/token_logprobs.h"

namespace unlearn_fast {
namespace cuda {

constexpr int kThreads = token_logprobs::kRowThreads;
constexpr int kWarps = kThreads / 32;

using token_logprobs::LseState;

template <typename acc_t>
__device__ LseState<acc_t> warp_lse(LseState<acc_t> s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    LseState<acc_t> other{__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset)};
    s = token_logprobs::lse_merge(s, other);
  }
  return s;
}

template <typename acc_t>
__device__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The softmax normaliser of a row from the threads' partial states.
template <typename acc_t>
__device__ LseState<acc_t> block_lse(LseState<acc_t> s) {
  __shared__ acc_t warp_max[kWarps];
  __shared__ acc_t warp_total[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  s = warp_lse(s);
  if (lane == 0) {
    warp_max[warp] = s.max;
    warp_total[warp] = s.sum;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? LseState<acc_t>{warp_max[lane], warp_total[lane]} : token_logprobs::lse_init<acc_t>();
    s = warp_lse(s);
    if (lane == 0) {
      warp_max[0] = s.max;
      warp_total[0] = s.sum;
    }
  }
  __syncthreads();
  return {warp_max[0], warp_total[0]};
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t x) {
  __shared__ acc_t partial[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = warp_sum(lane < kWarps ? partial[lane] : acc_t(0));
    if (lane == 0) partial[0] = x;
  }
  __syncthreads();
  return partial[0];
}

}  // namespace cuda
}  // namespace unlearn_fast
