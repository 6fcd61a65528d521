// C++ CPU row kernels of the token log-prob op: one thread per block of logit rows.
// The CUDA twin (csrc/cuda/token_logprobs.cu) runs the same math with one thread block per row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/token_logprobs.h"
#include "common/token_logprobs_driver.h"
#include "cpu/row_lse.h"

namespace unlearn_fast {
namespace token_logprobs {
namespace {

struct CpuRows {
  static void forward(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, at::Tensor& logp,
                      at::Tensor& lse) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t vocab = logits.size(1);
      const scalar_t* L = logits.const_data_ptr<scalar_t>();
      const int64_t* y = labels.const_data_ptr<int64_t>();
      acc_t* logp_p = logp.mutable_data_ptr<acc_t>();
      acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
      at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = L + r * vocab;
          const acc_t row_lse = lse_value(row_lse_state<scalar_t, acc_t>(row, vocab));
          lse_p[r] = row_lse;
          logp_p[r] = y[r] == ignore_index ? acc_t(0) : static_cast<acc_t>(row[y[r]]) - row_lse;
        }
      });
    });
  }

  // Overwrites the logits with d(loss)/d(logits); computes lse (and logp) first if asked to.
  static void grad(at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& grad_logp,
                   const at::Tensor& grad_lse, at::Tensor& lse, at::Tensor& logp, bool compute_lse) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_grad_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t vocab = logits.size(1);
      scalar_t* L = logits.mutable_data_ptr<scalar_t>();
      const int64_t* y = labels.const_data_ptr<int64_t>();
      const acc_t* g_logp = grad_logp.const_data_ptr<acc_t>();
      const acc_t* g_lse = grad_lse.defined() ? grad_lse.const_data_ptr<acc_t>() : nullptr;
      acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
      acc_t* logp_p = compute_lse ? logp.mutable_data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* row = L + r * vocab;
          const bool ignored = y[r] == ignore_index;
          const acc_t gl = effective_grad_logp(g_logp[r], ignored);
          const acc_t gs = g_lse ? g_lse[r] : acc_t(0);
          if (compute_lse) {
            lse_p[r] = lse_value(row_lse_state<scalar_t, acc_t>(row, vocab));
            logp_p[r] = ignored ? acc_t(0) : static_cast<acc_t>(row[y[r]]) - lse_p[r];
          }
          const acc_t row_lse = lse_p[r];
          for (int64_t v = 0; v < vocab; ++v) {
            row[v] = static_cast<scalar_t>(logit_grad(static_cast<acc_t>(row[v]), row_lse, gl, gs, v == y[r]));
          }
        }
      });
    });
  }
};

}  // namespace
}  // namespace token_logprobs
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  UNLEARN_FAST_REGISTER_TOKEN_LOGPROBS(m, ::unlearn_fast::token_logprobs::CpuRows);
}
