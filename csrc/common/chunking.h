// Helpers of the chunked LM-head drivers (token log-probs, curvature products): tokens go through
// in chunks of `rows` tokens whose [rows, V] logits are computed into a reused buffer.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace unlearn_fast {

// The chunk's row count comes from the caller: unlearn_fast/ops/chunking.py sizes it from the
// device (SM count and free memory on CUDA, a cache-sized budget on the CPU), one policy for every
// backend. Clamped here to [1, tokens].
inline int64_t checked_chunk_rows(int64_t requested, int64_t tokens, const char* op) {
  TORCH_CHECK(requested > 0, op, ": chunk_rows must be positive, got ", requested,
              "; call the Python op (unlearn_fast.ops), which sizes the chunks from the device");
  return std::max<int64_t>(1, std::min<int64_t>(requested, std::max<int64_t>(tokens, 1)));
}

// logits[rows, V] = X_chunk W^T (+ b), written into `out`.
inline void chunk_logits(at::Tensor& out, const at::Tensor& x_chunk, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, x_chunk, weight.t());
  } else {
    at::mm_out(out, x_chunk, weight.t());
  }
}

}  // namespace unlearn_fast
