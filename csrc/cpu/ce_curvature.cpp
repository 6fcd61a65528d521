// C++ CPU row kernels of the curvature product op: one thread per block of tokens, all K probes
// of a token in one visit. The CUDA twin (csrc/cuda/ce_curvature.cu) runs the same math with one
// thread block per (token, probe).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/ce_curvature.h"
#include "common/ce_curvature_driver.h"
#include "cpu/row_lse.h"

namespace unlearn_fast {
namespace ce_curvature {
namespace {

// Sums in four double partials: one float running sum over a 50k-entry vocabulary would lose
// more precision than the GPU's tree reduction, and one accumulator would serialise the loop.
template <typename F>
double sum4(int64_t count, F term) {
  double partial[4] = {0, 0, 0, 0};
  int64_t v = 0;
  for (; v + 4 <= count; v += 4) {
    for (int lane = 0; lane < 4; ++lane) partial[lane] += term(v + lane);
  }
  for (; v < count; ++v) partial[0] += term(v);
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

struct CpuRows {
  // logits [n,V]; tangents [K,n,V] contiguous, overwritten with r; weights [n] in acc dtype.
  static void apply(const at::Tensor& logits, at::Tensor& tangents, const at::Tensor& weights) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_curvature_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t K = tangents.size(0), n = tangents.size(1), vocab = tangents.size(2);
      const scalar_t* L = logits.const_data_ptr<scalar_t>();
      scalar_t* U = tangents.mutable_data_ptr<scalar_t>();
      const acc_t* w = weights.const_data_ptr<acc_t>();
      const int64_t logits_stride = logits.stride(0);
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> prob(vocab);  // the row's softmax, computed once for its K probes
        for (int64_t r = begin; r < end; ++r) {
          if (w[r] == acc_t(0)) {  // an ignored token: no curvature, and no softmax to compute
            for (int64_t k = 0; k < K; ++k) std::fill_n(U + (k * n + r) * vocab, vocab, scalar_t(0));
            continue;
          }
          const scalar_t* row = L + r * logits_stride;
          const acc_t lse = lse_value(token_logprobs::row_lse_state<scalar_t, acc_t>(row, vocab));
          for (int64_t v = 0; v < vocab; ++v) prob[v] = softmax_prob(static_cast<acc_t>(row[v]), lse);
          for (int64_t k = 0; k < K; ++k) {
            scalar_t* u = U + (k * n + r) * vocab;
            const acc_t mean = static_cast<acc_t>(
                sum4(vocab, [&](int64_t v) { return double(mean_term(prob[v], static_cast<acc_t>(u[v]))); }));
            for (int64_t v = 0; v < vocab; ++v) {
              u[v] = static_cast<scalar_t>(curvature_value(prob[v], static_cast<acc_t>(u[v]), mean, w[r]));
            }
          }
        }
      });
    });
  }
};

}  // namespace
}  // namespace ce_curvature
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  UNLEARN_FAST_REGISTER_CE_CURVATURE(m, ::unlearn_fast::ce_curvature::CpuRows);
}
