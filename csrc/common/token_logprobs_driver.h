// The chunked driver of the token log-prob op, shared by the CPU and CUDA backends.
//
// X [T,H] and W [V,H] never meet as a full [T,V] logits matrix: tokens are processed in chunks
// of `rows` tokens (sized by the caller from the device) whose logits [rows,V] are computed into
// one reused buffer. The matmuls go to the
// backend's BLAS (MKL/OpenBLAS, cuBLAS) through ATen; the backend supplies only the row kernels
// (`Rows::forward`, `Rows::grad`), which hold the softmax math of common/token_logprobs.h.
//
// A full vocabulary row per token (rather than vocabulary chunks) keeps the gradient pass at two
// matmuls per chunk: the softmax of a row is final before its gradient is formed, so nothing
// has to be recomputed or rescaled.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/chunking.h"

#include <array>
#include <tuple>

namespace unlearn_fast {
namespace token_logprobs {

using at::Tensor;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_inputs(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                         const Tensor& labels) {
  TORCH_CHECK(hidden.dim() == 2, "token_logprobs: hidden must be [tokens, hidden_size], got shape ",
              hidden.sizes(), "; flatten the batch dimensions first");
  TORCH_CHECK(weight.dim() == 2, "token_logprobs: weight must be [vocab, hidden_size], got shape ",
              weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "token_logprobs: hidden size mismatch: hidden is ",
              hidden.sizes(), " but weight is ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "token_logprobs: hidden (",
              hidden.scalar_type(), ") and weight (", weight.scalar_type(),
              ") must have the same dtype; cast one of them");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "token_logprobs: expected a floating dtype, got ",
              hidden.scalar_type());
  TORCH_CHECK(hidden.device() == weight.device() && labels.device() == hidden.device(),
              "token_logprobs: hidden, weight and labels must be on one device, got ", hidden.device(),
              ", ", weight.device(), ", ", labels.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0),
              "token_logprobs: labels must be [tokens] = [", hidden.size(0), "], got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "token_logprobs: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && labels.is_contiguous(),
              "token_logprobs: hidden, weight and labels must be contiguous; call .contiguous()");
  TORCH_CHECK(weight.size(0) > 0, "token_logprobs: the vocabulary is empty");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "token_logprobs: bias must be [vocab] = [",
                weight.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->device() == hidden.device(),
                "token_logprobs: bias must match hidden's dtype and device");
  }
}

inline void check_labels_in_range(const Tensor& labels, int64_t vocab, int64_t ignore_index) {
  // A device sync on GPUs, so only on the CPU; the CUDA row kernels assert instead.
  if (!labels.is_cpu() || labels.numel() == 0) return;
  const Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
  TORCH_CHECK(!bad.any().item<bool>(), "token_logprobs: labels must lie in [0, ", vocab,
              ") or equal ignore_index=", ignore_index, "; found ", labels.masked_select(bad).slice(0, 0, 5));
}

template <class Rows>
std::tuple<Tensor, Tensor> forward(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                                   const Tensor& labels, int64_t ignore_index, int64_t chunk_rows) {
  check_inputs(hidden, weight, bias, labels);
  const int64_t T = hidden.size(0), V = weight.size(0);
  check_labels_in_range(labels, V, ignore_index);
  auto acc_opts = hidden.options().dtype(acc_dtype(hidden.scalar_type()));
  Tensor logp = at::empty({T}, acc_opts), lse = at::empty({T}, acc_opts);
  const int64_t rows = checked_chunk_rows(chunk_rows, T, "token_logprobs");
  Tensor buffer = at::empty({std::min(rows, T), V}, hidden.options());
  for (int64_t start = 0; start < T; start += rows) {
    const int64_t n = std::min(rows, T - start);
    Tensor logits = buffer.narrow(0, 0, n);
    chunk_logits(logits, hidden.narrow(0, start, n), weight, bias);
    Tensor logp_c = logp.narrow(0, start, n), lse_c = lse.narrow(0, start, n);
    Rows::forward(logits, labels.narrow(0, start, n), ignore_index, logp_c, lse_c);
  }
  return {logp, lse};
}

// Gradients for given upstream gradients of logp (and of lse, if defined). If `lse` is
// undefined it is computed on the way (the fused forward-with-gradient path) and returned
// together with logp; otherwise the saved lse is used (the backward path).
//
// output_mask says which of (grad_hidden, grad_weight, grad_bias) to form; the others come back
// as empty tensors and cost nothing. A frozen head (LoRA) thus skips the [V,H] accumulator and the
// dlogits^T X matmul of every chunk, the largest part of the gradient pass at big vocabularies.
template <class Rows>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gradients(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& labels,
    int64_t ignore_index, int64_t chunk_rows, const Tensor& grad_logp, const Tensor& grad_lse, Tensor lse,
    std::array<bool, 3> output_mask) {
  check_inputs(hidden, weight, bias, labels);
  const int64_t T = hidden.size(0), V = weight.size(0);
  check_labels_in_range(labels, V, ignore_index);
  const auto acc = acc_dtype(hidden.scalar_type());
  auto acc_opts = hidden.options().dtype(acc);
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == T, "token_logprobs: grad_logp must be [", T, "]");
  const Tensor g_logp = grad_logp.to(acc).contiguous();
  const Tensor g_lse = grad_lse.defined() ? grad_lse.to(acc).contiguous() : Tensor();
  if (g_lse.defined()) TORCH_CHECK(g_lse.dim() == 1 && g_lse.size(0) == T, "token_logprobs: grad_lse must be [", T, "]");

  const bool compute_lse = !lse.defined();
  Tensor logp;
  if (compute_lse) {
    lse = at::empty({T}, acc_opts);
    logp = at::empty({T}, acc_opts);
  } else {
    TORCH_CHECK(lse.dim() == 1 && lse.size(0) == T, "token_logprobs: lse must be [", T, "]");
    lse = lse.to(acc).contiguous();
  }
  // Half-precision weight gradients accumulate across chunks in float32, then round once.
  const bool exact_accumulate = hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble;
  const bool need_hidden = output_mask[0], need_weight = output_mask[1];
  const bool need_bias = output_mask[2] && bias.has_value();
  auto none = [&] { return at::empty({0}, hidden.options()); };  // a fresh one per output: no aliasing
  Tensor grad_hidden = need_hidden ? at::empty_like(hidden) : none();
  Tensor grad_weight_acc =
      need_weight ? at::zeros(weight.sizes(), weight.options().dtype(exact_accumulate ? weight.scalar_type() : acc))
                  : none();
  Tensor grad_bias_acc = need_bias ? at::zeros({V}, acc_opts) : none();

  const int64_t rows = checked_chunk_rows(chunk_rows, T, "token_logprobs");
  Tensor buffer = at::empty({std::min(rows, T), V}, hidden.options());
  for (int64_t start = 0; start < T; start += rows) {
    const int64_t n = std::min(rows, T - start);
    const Tensor x_chunk = hidden.narrow(0, start, n);
    Tensor dlogits = buffer.narrow(0, 0, n);
    chunk_logits(dlogits, x_chunk, weight, bias);
    Tensor lse_c = lse.narrow(0, start, n);
    Tensor logp_c = compute_lse ? logp.narrow(0, start, n) : Tensor();
    Rows::grad(dlogits, labels.narrow(0, start, n), ignore_index, g_logp.narrow(0, start, n),
               g_lse.defined() ? g_lse.narrow(0, start, n) : Tensor(), lse_c, logp_c, compute_lse);
    if (need_hidden) {
      Tensor grad_hidden_c = grad_hidden.narrow(0, start, n);
      at::mm_out(grad_hidden_c, dlogits, weight);
    }
    if (need_weight && exact_accumulate) {
      grad_weight_acc.addmm_(dlogits.t(), x_chunk);
    } else if (need_weight) {
      grad_weight_acc.add_(at::mm(dlogits.t(), x_chunk));
    }
    if (need_bias) grad_bias_acc.add_(dlogits.sum(0, /*keepdim=*/false, acc));
  }
  Tensor grad_weight = need_weight ? grad_weight_acc.to(weight.scalar_type()) : grad_weight_acc;
  Tensor grad_bias = need_bias ? grad_bias_acc.to(bias->scalar_type()) : grad_bias_acc;
  if (!compute_lse) logp = at::empty({0}, acc_opts);
  return {logp, lse, grad_hidden, grad_weight, grad_bias};
}

// The three ops of the family, as registered in csrc/ops.cpp, for one backend's row kernels.
template <class Rows>
struct Ops {
  static std::tuple<Tensor, Tensor> token_logprobs(const Tensor& hidden, const Tensor& weight,
                                                   const c10::optional<Tensor>& bias, const Tensor& labels,
                                                   int64_t ignore_index, int64_t chunk_rows) {
    return forward<Rows>(hidden, weight, bias, labels, ignore_index, chunk_rows);
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_logp, const Tensor& grad_lse,
                                                     const Tensor& hidden, const Tensor& weight,
                                                     const c10::optional<Tensor>& bias, const Tensor& labels,
                                                     const Tensor& lse, int64_t ignore_index, int64_t chunk_rows,
                                                     std::array<bool, 3> output_mask) {
    TORCH_CHECK(lse.defined(), "token_logprobs_backward: the saved lse is required");
    auto out = gradients<Rows>(hidden, weight, bias, labels, ignore_index, chunk_rows, grad_logp, grad_lse, lse,
                               output_mask);
    return {std::get<2>(out), std::get<3>(out), std::get<4>(out)};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fused_grad(
      const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& labels,
      const Tensor& grad_logp, int64_t ignore_index, int64_t chunk_rows, std::array<bool, 3> output_mask) {
    return gradients<Rows>(hidden, weight, bias, labels, ignore_index, chunk_rows, grad_logp, Tensor(), Tensor(),
                           output_mask);
  }
};

}  // namespace token_logprobs
}  // namespace unlearn_fast

#define UNLEARN_FAST_REGISTER_TOKEN_LOGPROBS(m, Rows)                                             \
  m.impl("token_logprobs", &::unlearn_fast::token_logprobs::Ops<Rows>::token_logprobs);           \
  m.impl("token_logprobs_backward", &::unlearn_fast::token_logprobs::Ops<Rows>::backward);        \
  m.impl("token_logprobs_fused_grad", &::unlearn_fast::token_logprobs::Ops<Rows>::fused_grad)
