// Per-element math of the single-expert gated FFN (expert_ffn), shared by the C++ CPU kernel
// (csrc/cpu/expert_ffn.cpp) and the CUDA kernel (csrc/cuda/expert_ffn.cu), so that the CPU tests
// exercise the arithmetic the GPU runs.
//
// One expert, tokens x [N,H] gathered from hidden [T,H] at token_index:
//   a = x Wgu^T = [g | u]            (gate columns first, then up; Wgu = gate_up [2I,H])
//   h = act(g) * u                   (the GLU: SwiGLU for act = silu)
//   y = h Wd^T                       (Wd = down [H,I])
// Backward, from dy [N,H]:
//   dh = dy Wd,  dg = dh * u * act'(g),  du = dh * act(g)     (this file: one fused pass)
//   dWd = dy^T h,  dWgu = [dg | du]^T x,  dhidden[token_index] += [dg | du] Wgu
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/math.h"

namespace unlearn_fast {
namespace expert_ffn {

// Activation codes, the same numbers as ACTIVATIONS in unlearn_fast/ops/expert_ffn.py.
enum class Activation : int { kSilu = 0, kGeluTanh = 1 };

UF_HOST_DEVICE float uf_tanh(float x) { return tanhf(x); }
UF_HOST_DEVICE double uf_tanh(double x) { return tanh(x); }

// act(g) and act'(g) together: the backward pass needs both, and they share the expensive part
// (the sigmoid, or the tanh).
template <Activation kAct, typename acc_t>
UF_HOST_DEVICE void act_and_grad(acc_t g, acc_t& act, acc_t& dact) {
  if constexpr (kAct == Activation::kSilu) {
    // silu(g) = g s, s = sigmoid(g);  silu'(g) = s (1 + g (1 - s)).
    const acc_t s = acc_t(1) / (acc_t(1) + uf_exp(-g));
    act = g * s;
    dact = s * (acc_t(1) + g * (acc_t(1) - s));
  } else {
    // gelu_tanh(g) = g (1 + t) / 2, t = tanh(k (g + c g^3)), k = sqrt(2/pi), c = 0.044715;
    // its derivative (1 + t) / 2 + g (1 - t^2) k (1 + 3 c g^2) / 2.
    const acc_t k = acc_t(0.7978845608028654);
    const acc_t c = acc_t(0.044715);
    const acc_t t = uf_tanh(k * (g + c * g * g * g));
    act = acc_t(0.5) * g * (acc_t(1) + t);
    dact = acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * g * (acc_t(1) - t * t) * k * (acc_t(1) + acc_t(3) * c * g * g);
  }
}

template <Activation kAct, typename acc_t>
UF_HOST_DEVICE acc_t act(acc_t g) {
  if constexpr (kAct == Activation::kSilu) {
    return g / (acc_t(1) + uf_exp(-g));
  } else {
    acc_t a, d;
    act_and_grad<kAct>(g, a, d);
    return a;
  }
}

// Forward epilogue of one (token, column) pair: h = act(g) * u.
template <Activation kAct, typename acc_t>
UF_HOST_DEVICE acc_t glu(acc_t g, acc_t u) {
  return act<kAct>(g) * u;
}

// Backward of one (token, column) pair: from the saved g, u and the upstream dh, the GLU output h
// again (for dWd = dy^T h: recomputed rather than saved) and the pre-activation gradients dg, du.
template <Activation kAct, typename acc_t>
UF_HOST_DEVICE void glu_grad(acc_t g, acc_t u, acc_t dh, acc_t& h, acc_t& dg, acc_t& du) {
  acc_t a, da;
  act_and_grad<kAct>(g, a, da);
  h = a * u;
  dg = dh * u * da;
  du = dh * a;
}

// Turns the runtime activation code into the template argument: f(integral_constant).
template <class F>
void with_activation(int64_t code, F&& f) {
  switch (static_cast<Activation>(code)) {
    case Activation::kSilu:
      f(std::integral_constant<Activation, Activation::kSilu>{});
      return;
    case Activation::kGeluTanh:
      f(std::integral_constant<Activation, Activation::kGeluTanh>{});
      return;
  }
}

}  // namespace expert_ffn
}  // namespace unlearn_fast
