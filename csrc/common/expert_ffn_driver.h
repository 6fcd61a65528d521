// Device-agnostic driver of expert_ffn, shared by the CPU and CUDA kernels: input checks, the ATen
// matmuls, and the order of the steps. Each backend supplies the three memory-bound kernels:
//
//   struct Kernels {
//     // x[n] = hidden[token_index[n]]                                   ([N,H] rows)
//     static void gather(const Tensor& hidden, const Tensor& token_index, Tensor& x);
//     // h = act(a[:, :I]) * a[:, I:]                                    (one pass over a)
//     static void glu_forward(const Tensor& a, Tensor& h, int64_t activation);
//     // h and da = [dg | du] from a and dh                              (one pass over a, dh)
//     static void glu_backward(const Tensor& a, const Tensor& dh, Tensor& h, Tensor& da, int64_t activation);
//   };
//
// The math (and the names a, h, dh, da) is that of csrc/common/expert_ffn.h. The matmuls run on
// ATen (MKL / cuBLAS): a fused gather-GEMM of our own would lose more to the vendor GEMM than the
// [N,H] gathered copy costs (N*H elements against the N*H*2I multiply-adds it feeds). The Triton
// backend fuses the gather into its GEMMs instead.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/expert_ffn.h"

namespace unlearn_fast {
namespace expert_ffn {

using at::Tensor;

inline void check_inputs(const Tensor& hidden, const Tensor& token_index, const Tensor& gate_up, const Tensor& down,
                         int64_t activation) {
  TORCH_CHECK(activation == static_cast<int64_t>(Activation::kSilu) ||
                  activation == static_cast<int64_t>(Activation::kGeluTanh),
              "expert_ffn: unknown activation code ", activation, " (0: silu, 1: gelu_tanh)");
  TORCH_CHECK(hidden.dim() == 2, "expert_ffn: hidden must be [tokens, hidden_size], got shape ", hidden.sizes());
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(0) % 2 == 0 && gate_up.size(0) > 0,
              "expert_ffn: gate_up must be [2 * intermediate, hidden_size] with intermediate > 0, got shape ",
              gate_up.sizes());
  const int64_t H = hidden.size(1), I = gate_up.size(0) / 2;
  TORCH_CHECK(gate_up.size(1) == H, "expert_ffn: gate_up ", gate_up.sizes(), " does not match hidden_size ", H);
  TORCH_CHECK(down.dim() == 2 && down.size(0) == H && down.size(1) == I, "expert_ffn: down must be [", H, ", ", I,
              "] (hidden_size, intermediate), got shape ", down.sizes());
  TORCH_CHECK(token_index.dim() == 1 && token_index.scalar_type() == at::kLong,
              "expert_ffn: token_index must be a 1-D int64 tensor, got ", token_index.scalar_type(), " of shape ",
              token_index.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "expert_ffn: hidden must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(gate_up.scalar_type() == dtype && down.scalar_type() == dtype, "expert_ffn: hidden (", dtype,
              "), gate_up (", gate_up.scalar_type(), ") and down (", down.scalar_type(),
              ") must share one dtype; cast them");
  TORCH_CHECK(token_index.device() == hidden.device() && gate_up.device() == hidden.device() &&
                  down.device() == hidden.device(),
              "expert_ffn: all inputs must be on one device");
  TORCH_CHECK(hidden.is_contiguous() && token_index.is_contiguous() && gate_up.is_contiguous() && down.is_contiguous(),
              "expert_ffn: hidden, token_index, gate_up and down must be contiguous; call .contiguous()");
  // On the CPU the range check costs one pass over the index; on the GPU it would be a device
  // sync, so the CUDA gather kernel asserts instead.
  if (token_index.is_cpu() && token_index.numel() > 0) {
    const auto [lo, hi] = at::aminmax(token_index);
    const int64_t first = lo.item<int64_t>(), last = hi.item<int64_t>();
    TORCH_CHECK(first >= 0 && last < hidden.size(0), "expert_ffn: token_index must lie in [0, ", hidden.size(0),
                "), found values in [", first, ", ", last, "]");
  }
}

template <class Kernels>
struct Ops {
  // Returns y [N,H] and the pre-activations a = [g | u] [N,2I], which the backward pass needs.
  static std::tuple<Tensor, Tensor> forward(const Tensor& hidden, const Tensor& token_index, const Tensor& gate_up,
                                            const Tensor& down, int64_t activation) {
    check_inputs(hidden, token_index, gate_up, down, activation);
    const int64_t N = token_index.size(0), H = hidden.size(1), I = down.size(1);
    Tensor x = at::empty({N, H}, hidden.options());
    Kernels::gather(hidden, token_index, x);
    Tensor a = at::mm(x, gate_up.t());
    Tensor h = at::empty({N, I}, hidden.options());
    Kernels::glu_forward(a, h, activation);
    return {at::mm(h, down.t()), a};
  }

  // Gradients of hidden ([T,H], zero off token_index; an empty tensor unless need_hidden_grad),
  // gate_up and down, from dy and the saved pre-activations.
  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_y, const Tensor& hidden,
                                                     const Tensor& token_index, const Tensor& gate_up,
                                                     const Tensor& down, const Tensor& gate_up_out, int64_t activation,
                                                     bool need_hidden_grad) {
    check_inputs(hidden, token_index, gate_up, down, activation);
    const int64_t N = token_index.size(0), H = hidden.size(1), I = down.size(1);
    TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({N, H}) && grad_y.scalar_type() == hidden.scalar_type() &&
                    grad_y.is_contiguous(),
                "expert_ffn_backward: grad_y must be a contiguous [", N, ", ", H, "] tensor of dtype ",
                hidden.scalar_type());
    TORCH_CHECK(gate_up_out.sizes() == at::IntArrayRef({N, 2 * I}) &&
                    gate_up_out.scalar_type() == hidden.scalar_type() && gate_up_out.is_contiguous(),
                "expert_ffn_backward: gate_up_out must be the forward's contiguous [", N, ", ", 2 * I,
                "] pre-activations");
    Tensor dh = at::mm(grad_y, down);
    Tensor h = at::empty({N, I}, hidden.options());
    Tensor da = at::empty({N, 2 * I}, hidden.options());
    Kernels::glu_backward(gate_up_out, dh, h, da, activation);
    Tensor grad_down = at::mm(grad_y.t(), h);
    Tensor x = at::empty({N, H}, hidden.options());
    Kernels::gather(hidden, token_index, x);
    Tensor grad_gate_up = at::mm(da.t(), x);
    Tensor grad_hidden = at::empty({0}, hidden.options());
    if (need_hidden_grad) {
      // index_add_ sums repeated indices (deterministically on the CPU, with atomics on the GPU).
      grad_hidden = at::zeros_like(hidden);
      grad_hidden.index_add_(0, token_index, at::mm(da, gate_up));
    }
    return {grad_hidden, grad_gate_up, grad_down};
  }
};

}  // namespace expert_ffn
}  // namespace unlearn_fast

#define UNLEARN_FAST_REGISTER_EXPERT_FFN(m, Kernels)                                    \
  m.impl("expert_ffn", &::unlearn_fast::expert_ffn::Ops<Kernels>::forward);             \
  m.impl("expert_ffn_backward", &::unlearn_fast::expert_ffn::Ops<Kernels>::backward)
