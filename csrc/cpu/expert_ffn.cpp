// C++ CPU kernels of expert_ffn: the token gather and the two GLU passes, each an
// at::parallel_for over token rows. The matmuls and the order of the steps are in
// csrc/common/expert_ffn_driver.h; the per-element math in csrc/common/expert_ffn.h, shared with the
// CUDA twin (csrc/cuda/expert_ffn.cu).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/expert_ffn.h"
#include "common/expert_ffn_driver.h"

namespace unlearn_fast {
namespace expert_ffn {
namespace {

// Rows per task so that one task touches at least ~32k values: fewer, larger tasks for small widths.
inline int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(width, 1));
}

struct CpuKernels {
  static void gather(const at::Tensor& hidden, const at::Tensor& token_index, at::Tensor& x) {
    const int64_t N = x.size(0), H = x.size(1);
    if (N == 0 || H == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "expert_ffn_gather_cpu", [&] {
      const scalar_t* src = hidden.const_data_ptr<scalar_t>();
      const int64_t* idx = token_index.const_data_ptr<int64_t>();
      scalar_t* dst = x.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, N, grain_rows(H), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) std::copy_n(src + idx[n] * H, H, dst + n * H);
      });
    });
  }

  static void glu_forward(const at::Tensor& a, at::Tensor& h, int64_t activation) {
    const int64_t N = h.size(0), I = h.size(1);
    if (N == 0 || I == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "expert_ffn_glu_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* A = a.const_data_ptr<scalar_t>();
      scalar_t* out = h.mutable_data_ptr<scalar_t>();
      with_activation(activation, [&](auto act_tag) {
        constexpr Activation kAct = decltype(act_tag)::value;
        at::parallel_for(0, N, grain_rows(2 * I), [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            const scalar_t* g = A + n * 2 * I;  // a row: I gate values, then I up values
            const scalar_t* u = g + I;
            scalar_t* hr = out + n * I;
            for (int64_t i = 0; i < I; ++i) {
              hr[i] = static_cast<scalar_t>(glu<kAct, acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(u[i])));
            }
          }
        });
      });
    });
  }

  static void glu_backward(const at::Tensor& a, const at::Tensor& dh, at::Tensor& h, at::Tensor& da,
                           int64_t activation) {
    const int64_t N = h.size(0), I = h.size(1);
    if (N == 0 || I == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "expert_ffn_glu_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* A = a.const_data_ptr<scalar_t>();
      const scalar_t* DH = dh.const_data_ptr<scalar_t>();
      scalar_t* H_out = h.mutable_data_ptr<scalar_t>();
      scalar_t* DA = da.mutable_data_ptr<scalar_t>();
      with_activation(activation, [&](auto act_tag) {
        constexpr Activation kAct = decltype(act_tag)::value;
        at::parallel_for(0, N, grain_rows(4 * I), [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            const scalar_t* g = A + n * 2 * I;
            const scalar_t* u = g + I;
            const scalar_t* dhr = DH + n * I;
            scalar_t* hr = H_out + n * I;
            scalar_t* dg = DA + n * 2 * I;
            scalar_t* du = dg + I;
            for (int64_t i = 0; i < I; ++i) {
              acc_t hv, dgv, duv;
              glu_grad<kAct, acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(u[i]), static_cast<acc_t>(dhr[i]),
                                        hv, dgv, duv);
              hr[i] = static_cast<scalar_t>(hv);
              dg[i] = static_cast<scalar_t>(dgv);
              du[i] = static_cast<scalar_t>(duv);
            }
          }
        });
      });
    });
  }
};

}  // namespace
}  // namespace expert_ffn
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  UNLEARN_FAST_REGISTER_EXPERT_FFN(m, ::unlearn_fast::expert_ffn::CpuKernels);
}
