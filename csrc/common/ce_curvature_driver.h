// The chunked driver of the curvature product op, shared by the CPU and CUDA backends.
//
// For K probes at once it forms, per token chunk, the logits X_c W^T + b [n,V] and the logit
// tangents U_k = dX_k,c W^T + X_c dW_k^T + db_k [K,n,V]; the backend's row kernels
// (`Rows::apply`, math of common/ce_curvature.h) overwrite U with r = w (p*u - p (p^T u)); then
// out_X[k, c] = r_k W, out_W[k] += r_k^T X_c and out_b[k] += sum_t r_k. Tokens go through in chunks
// of `rows` tokens (sized by the caller from the device), so no [T,V] tensor exists, for any probe.
//
// Full vocabulary rows per chunk (as in the token log-prob driver): the softmax of a row is final
// before r is formed, so nothing is rescaled. The matmuls go to the backend's BLAS through ATen;
// the K probes share one matmul with W for the hidden-state tangents and the back-projection
// (W is read three times per chunk, not 2K+1).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/chunking.h"

#include <algorithm>
#include <tuple>

namespace unlearn_fast {
namespace ce_curvature {

using at::Tensor;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "ce_curvature: ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "ce_curvature: ", name, " must be on ", like.device(), ", got ",
              t.device());
}

// Checks every input; returns the number of probes K (the leading dim of the tangents).
inline int64_t check_inputs(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                            const Tensor& token_weights, const c10::optional<Tensor>& tangent_hidden,
                            const c10::optional<Tensor>& tangent_weight, const c10::optional<Tensor>& tangent_bias) {
  TORCH_CHECK(hidden.dim() == 2, "ce_curvature: hidden must be [tokens, hidden_size], got shape ", hidden.sizes(),
              "; flatten the batch dimensions first");
  TORCH_CHECK(weight.dim() == 2, "ce_curvature: weight must be [vocab, hidden_size], got shape ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "ce_curvature: hidden size mismatch: hidden is ", hidden.sizes(),
              " but weight is ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "ce_curvature: expected a floating dtype, got ",
              hidden.scalar_type());
  check_same(weight, hidden, "weight");
  TORCH_CHECK(weight.size(0) > 0, "ce_curvature: the vocabulary is empty");
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  if (bias.has_value()) {
    check_same(*bias, hidden, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "ce_curvature: bias must be [vocab] = [", V, "], got shape ",
                bias->sizes());
  }
  TORCH_CHECK(token_weights.dim() == 1 && token_weights.size(0) == T, "ce_curvature: token_weights must be [tokens] = [",
              T, "], got shape ", token_weights.sizes());
  TORCH_CHECK(at::isFloatingType(token_weights.scalar_type()) && token_weights.device() == hidden.device(),
              "ce_curvature: token_weights must be a floating tensor on ", hidden.device());
  TORCH_CHECK(tangent_hidden.has_value() || tangent_weight.has_value() || tangent_bias.has_value(),
              "ce_curvature: give at least one of tangent_hidden, tangent_weight, tangent_bias");
  int64_t K = -1;
  auto probes = [&](const Tensor& t, const char* name, at::IntArrayRef tail) {
    check_same(t, hidden, name);
    TORCH_CHECK(t.dim() == int64_t(tail.size()) + 1 && t.sizes().slice(1) == tail, "ce_curvature: ", name,
                " must be [probes, ", tail, "], got shape ", t.sizes());
    TORCH_CHECK(K < 0 || t.size(0) == K, "ce_curvature: the tangents disagree on the number of probes (", K, " vs ",
                t.size(0), ")");
    K = t.size(0);
  };
  if (tangent_hidden.has_value()) probes(*tangent_hidden, "tangent_hidden", {T, H});
  if (tangent_weight.has_value()) probes(*tangent_weight, "tangent_weight", {V, H});
  if (tangent_bias.has_value()) probes(*tangent_bias, "tangent_bias", {V});
  return K;
}

template <class Rows>
std::tuple<Tensor, Tensor, Tensor> curvature_product(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& token_weights,
    const c10::optional<Tensor>& tangent_hidden, const c10::optional<Tensor>& tangent_weight,
    const c10::optional<Tensor>& tangent_bias, bool need_hidden, bool need_weight, bool need_bias,
    int64_t chunk_rows) {
  const int64_t K = check_inputs(hidden, weight, bias, token_weights, tangent_hidden, tangent_weight, tangent_bias);
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto acc = acc_dtype(hidden.scalar_type());
  const auto opts = hidden.options();
  const Tensor w_tok = token_weights.to(acc).contiguous();

  // Half-precision weight products accumulate across chunks in float32, then round once.
  const bool exact_accumulate = hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble;
  Tensor out_hidden = need_hidden ? at::empty({K, T, H}, opts) : at::empty({0}, opts);
  Tensor out_weight = need_weight ? at::zeros({K, V, H}, opts.dtype(exact_accumulate ? hidden.scalar_type() : acc))
                                  : at::empty({0}, opts);
  Tensor out_bias = need_bias ? at::zeros({K, V}, opts.dtype(acc)) : at::empty({0}, opts);

  const int64_t rows = checked_chunk_rows(chunk_rows, T, "ce_curvature");
  const int64_t max_rows = std::min(rows, T);
  Tensor logits_buffer = at::empty({max_rows, V}, opts);
  // Flat buffers, viewed per chunk as contiguous [K, n, ...]: the K probes then share one matmul.
  Tensor tangent_buffer = at::empty({K * max_rows * V}, opts);
  Tensor dx_buffer = tangent_hidden.has_value() ? at::empty({K * max_rows * H}, opts) : Tensor();
  Tensor back_buffer = need_hidden ? at::empty({K * max_rows * H}, opts) : Tensor();
  for (int64_t start = 0; K > 0 && start < T; start += rows) {
    const int64_t n = std::min(rows, T - start);
    const Tensor x_chunk = hidden.narrow(0, start, n);
    Tensor logits = logits_buffer.narrow(0, 0, n);
    chunk_logits(logits, x_chunk, weight, bias);

    Tensor u_flat = tangent_buffer.narrow(0, 0, K * n * V).view({K * n, V});
    Tensor u = u_flat.view({K, n, V});
    if (tangent_hidden.has_value()) {
      Tensor dx = dx_buffer.narrow(0, 0, K * n * H).view({K, n, H});
      dx.copy_(tangent_hidden->narrow(1, start, n));
      at::mm_out(u_flat, dx.view({K * n, H}), weight.t());
    } else {
      u.zero_();
    }
    if (tangent_weight.has_value()) {
      for (int64_t k = 0; k < K; ++k) u.select(0, k).addmm_(x_chunk, tangent_weight->select(0, k).t());
    }
    if (tangent_bias.has_value()) u.add_(tangent_bias->unsqueeze(1));

    Rows::apply(logits, u, w_tok.narrow(0, start, n));

    if (need_hidden) {
      Tensor back = back_buffer.narrow(0, 0, K * n * H).view({K * n, H});
      at::mm_out(back, u_flat, weight);
      out_hidden.narrow(1, start, n).copy_(back.view({K, n, H}));
    }
    if (need_weight) {
      for (int64_t k = 0; k < K; ++k) {
        Tensor out_k = out_weight.select(0, k);
        if (exact_accumulate) {
          out_k.addmm_(u.select(0, k).t(), x_chunk);
        } else {
          out_k.add_(at::mm(u.select(0, k).t(), x_chunk));
        }
      }
    }
    if (need_bias) out_bias.add_(u.sum(1, /*keepdim=*/false, acc));
  }
  if (need_weight) out_weight = out_weight.to(hidden.scalar_type());
  if (need_bias) out_bias = out_bias.to(hidden.scalar_type());
  return {out_hidden, out_weight, out_bias};
}

}  // namespace ce_curvature
}  // namespace unlearn_fast

#define UNLEARN_FAST_REGISTER_CE_CURVATURE(m, Rows) \
  m.impl("ce_curvature", &::unlearn_fast::ce_curvature::curvature_product<Rows>)
