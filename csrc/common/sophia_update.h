// The fused multi-tensor Sophia update, shared by the C++ CPU kernel (csrc/cpu/sophia_update.cpp)
// and the CUDA kernel (csrc/cuda/sophia_update.cu): per-element math first, then the host-side
// input checks and the chunk plan both backends walk.
//
// Per coordinate, with g the gradient (negated when maximising), m = exp_avg, h = hessian:
//   [hessian_from_grad]  h <- beta2 h + (1 - beta2) g*g       (the `empirical` estimator)
//   m <- beta1 m + (1 - beta1) g
//   p <- p (1 - lr wd)                                          (decoupled weight decay)
//   [soul_reference]     m <- beta1 m + (1 - beta1) g           (the SOUL code's second update)
//   p <- p - lr sign(m) min(|m| / D, 1)
// with the denominator
//   D = max(rho bs h, eps)      by default: a negative Hutchinson h (or h = 0) gives D = eps,
//                               i.e. a full clipped step lr sign(m), never a flipped one;
//   D = rho bs h + eps          under soul_reference, the public Sophia code's form
//                               `(m.abs() / (rho * bs * h + 1e-15)).clamp(None, 1)`, reproduced
//                               exactly. The two agree to a relative eps / (rho bs h) wherever
//                               rho bs h >= eps, within a factor 2 for 0 <= rho bs h < eps (where
//                               both clip to 1 unless |m| < 2 eps), and differ for h < 0, where
//                               the additive form makes the ratio negative and steps *against*
//                               sign(m) (by up to |m| / |rho bs h + eps|, unclipped).
// Comparisons are written so that a NaN in h or m propagates to p, as torch.clamp does.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/math.h"

namespace unlearn_fast {
namespace sophia {

// Step constants: derived on the host in double, cast once to the accumulation type, so that
// e.g. the decay factor is the same rounded number as the reference's `1 - lr * wd`.
template <typename acc_t>
struct StepConstants {
  acc_t lr;
  acc_t beta1, one_minus_beta1;
  acc_t beta2, one_minus_beta2;
  acc_t rho_bs;     // rho * bs
  acc_t decay;      // 1 - lr * weight_decay
  acc_t eps;
  acc_t grad_sign;  // -1 when maximising (an exact negation), else 1
};

template <typename acc_t>
StepConstants<acc_t> step_constants(double lr, double beta1, double beta2, double rho, double bs,
                                    double weight_decay, double eps, bool maximize) {
  return {static_cast<acc_t>(lr),          static_cast<acc_t>(beta1),
          static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(beta2),
          static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(rho * bs),
          static_cast<acc_t>(1.0 - lr * weight_decay), static_cast<acc_t>(eps),
          static_cast<acc_t>(maximize ? -1.0 : 1.0)};
}

// sign(x) in {-1, 0, 1}, branch-free so that the CPU loop vectorises.
template <typename acc_t>
UF_HOST_DEVICE acc_t sign_of(acc_t x) {
  return static_cast<acc_t>(x > acc_t(0)) - static_cast<acc_t>(x < acc_t(0));
}

// fabs rather than a comparison: it compiles to a sign-bit mask, which the CPU loop vectorises.
UF_HOST_DEVICE float abs_of(float x) { return fabsf(x); }
UF_HOST_DEVICE double abs_of(double x) { return fabs(x); }

// One coordinate of the update (see the top of the file). The flags are template parameters:
// they are uniform over a launch, and a branch-free inner loop is what the CPU compiler
// vectorises (the selects below become min/max instructions).
template <typename acc_t, bool kHessianFromGrad, bool kSoulReference>
UF_HOST_DEVICE void update(acc_t& p, acc_t g, acc_t& m, acc_t& h, const StepConstants<acc_t>& c) {
  g = g * c.grad_sign;
  if (kHessianFromGrad) h = c.beta2 * h + c.one_minus_beta2 * (g * g);
  m = c.beta1 * m + c.one_minus_beta1 * g;
  p = p * c.decay;
  if (kSoulReference) m = c.beta1 * m + c.one_minus_beta1 * g;
  const acc_t curvature = c.rho_bs * h;
  const acc_t denom = kSoulReference ? curvature + c.eps : (curvature < c.eps ? c.eps : curvature);
  const acc_t ratio = abs_of(m) / denom;
  p = p - c.lr * sign_of(m) * (ratio > acc_t(1) ? acc_t(1) : ratio);
}

// ---------------------------------------------------------------------------------------------
// Host side: input checks and the chunk plan (plain C++ and ATen, no device code).

// Turns the two runtime flags into the template arguments of `update`: f(bool_constant, ...).
template <class F>
void with_flags(bool hessian_from_grad, bool soul_reference, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (hessian_from_grad) {
    soul_reference ? f(T{}, T{}) : f(T{}, N{});
  } else {
    soul_reference ? f(N{}, T{}) : f(N{}, N{});
  }
}

inline at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_scalars(double lr, double beta1, double beta2, double rho, double bs, double weight_decay,
                          double eps) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0, "sophia_update: lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "sophia_update: beta1 must lie in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "sophia_update: beta2 must lie in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(rho) && rho >= 0, "sophia_update: rho must be finite and >= 0, got ", rho);
  TORCH_CHECK(std::isfinite(bs) && bs > 0, "sophia_update: bs must be finite and > 0, got ", bs);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0,
              "sophia_update: weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "sophia_update: eps must be finite and > 0, got ", eps);
}

inline void check_tensors(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList hessians) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && hessians.size() == n,
              "sophia_update: params, grads, exp_avgs and hessians must have the same length, got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", hessians.size());
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "sophia_update: params must be float32, float64, float16 or bfloat16, got ", dtype);
  const at::ScalarType sdtype = state_dtype(dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* ts[4] = {&params[i], &grads[i], &exp_avgs[i], &hessians[i]};
    static const char* names[4] = {"params", "grads", "exp_avgs", "hessians"};
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& t = *ts[k];
      TORCH_CHECK(t.defined(), "sophia_update: ", names[k], "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device, "sophia_update: ", names[k], "[", i, "] is on ", t.device(),
                  " but params[0] is on ", device, "; one call takes tensors of one device");
      TORCH_CHECK(t.scalar_type() == (k < 2 ? dtype : sdtype), "sophia_update: ", names[k], "[", i, "] is ",
                  t.scalar_type(), " but must be ", (k < 2 ? dtype : sdtype),
                  " (params and grads share one dtype; the state is float32, float64 for float64 params)");
      TORCH_CHECK(t.numel() == params[i].numel(), "sophia_update: ", names[k], "[", i, "] has ", t.numel(),
                  " elements but params[", i, "] has ", params[i].numel());
      TORCH_CHECK(t.is_contiguous(), "sophia_update: ", names[k], "[", i, "] must be contiguous");
    }
  }
}

// A slice [start, start + size) of tensor `tensor`: the unit of parallel work.
struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t size;
};

inline std::vector<Chunk> plan_chunks(at::TensorList params, int64_t chunk_elems) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    for (int64_t start = 0; start < numel; start += chunk_elems) {
      chunks.push_back({static_cast<int64_t>(i), start, std::min(chunk_elems, numel - start)});
    }
  }
  return chunks;
}

}  // namespace sophia
}  // namespace unlearn_fast
