// C++ CPU kernel of the fused Sophia update: every tensor of the list is cut into chunks, and one
// at::parallel_for runs over the chunks of all tensors at once, so that small tensors (norms,
// biases) share threads with the big ones and the whole step is a single pass over memory.
// The per-element math is that of csrc/common/sophia_update.h, shared with the CUDA twin.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

// The update loop vectorises only if the compiler may evaluate both arms of the selects in the
// element math (max, min, sign) without regard to floating-point exceptions, which nothing here
// traps: -fno-trapping-math for this file's own code (ATen above keeps the global flags). It
// more than halves the time of a step.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "common/sophia_update.h"

namespace unlearn_fast {
namespace sophia {
namespace {

// 32k elements: 128 KiB of float32 per array, four arrays well inside a core's L2.
constexpr int64_t kCpuChunk = int64_t(1) << 15;
// Below this many values in all, one thread does the step: waking the others costs more.
constexpr int64_t kParallelMinValues = int64_t(1) << 16;

template <typename scalar_t, typename acc_t, bool kHessianFromGrad, bool kSoulReference>
void update_range(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, acc_t* __restrict__ m,
                  acc_t* __restrict__ h, int64_t n, const StepConstants<acc_t>& constants) {
  const StepConstants<acc_t> c = constants;  // a local copy: provably not aliased by the stores
  for (int64_t i = 0; i < n; ++i) {
    acc_t pi = static_cast<acc_t>(p[i]);
    acc_t mi = m[i];
    acc_t hi = h[i];
    update<acc_t, kHessianFromGrad, kSoulReference>(pi, static_cast<acc_t>(g[i]), mi, hi, c);
    p[i] = static_cast<scalar_t>(pi);
    m[i] = mi;
    if (kHessianFromGrad) h[i] = hi;
  }
}

void sophia_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList hessians, double lr, double beta1, double beta2, double rho, double bs,
                       double weight_decay, double eps, bool maximize, bool hessian_from_grad,
                       bool soul_reference) {
  check_scalars(lr, beta1, beta2, rho, bs, weight_decay, eps);
  check_tensors(params, grads, exp_avgs, hessians);
  if (params.empty()) return;
  const std::vector<Chunk> chunks = plan_chunks(params, kCpuChunk);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  int64_t total = 0;
  for (const at::Tensor& p : params) total += p.numel();
  const int64_t grain = total < kParallelMinValues ? std::max<int64_t>(n_chunks, 1) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sophia_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto c = step_constants<acc_t>(lr, beta1, beta2, rho, bs, weight_decay, eps, maximize);
    with_flags(hessian_from_grad, soul_reference, [&](auto hess_flag, auto soul_flag) {
      at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const Chunk& ch = chunks[k];
          update_range<scalar_t, acc_t, decltype(hess_flag)::value, decltype(soul_flag)::value>(
              params[ch.tensor].mutable_data_ptr<scalar_t>() + ch.start,
              grads[ch.tensor].const_data_ptr<scalar_t>() + ch.start,
              exp_avgs[ch.tensor].mutable_data_ptr<acc_t>() + ch.start,
              hessians[ch.tensor].mutable_data_ptr<acc_t>() + ch.start, ch.size, c);
        }
      });
    });
  });
}

}  // namespace
}  // namespace sophia
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("sophia_update", &::unlearn_fast::sophia::sophia_update_cpu);
}
