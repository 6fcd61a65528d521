// Per-element and per-row math of the token log-prob op, shared by the C++ CPU kernel
// (csrc/cpu/token_logprobs.cpp) and the CUDA kernel (csrc/cuda/token_logprobs.cu) so that the
// CPU tests exercise the arithmetic the GPU runs.
//
// For one token with logits l (a row of X W^T + b) and label y:
//   lse    = log sum_v exp(l_v)
//   logp   = l_y - lse                        (0 for an ignored token)
//   dl_v   = g_lse * p_v + g_logp * ([v == y] - p_v),   p_v = exp(l_v - lse)
// where g_logp and g_lse are the upstream gradients of logp and lse.
#pragma once
#include "common/math.h"

namespace unlearn_fast {
namespace token_logprobs {

// Threads of the CUDA row kernels' blocks (csrc/cuda/block_reduce.cuh); the C++ CPU twin replays
// their reduction order with as many lanes (csrc/cpu/row_lse.h).
constexpr int kRowThreads = 256;

// Running softmax normaliser: the row maximum and sum_v exp(l_v - max).
template <typename acc_t>
struct LseState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
UF_HOST_DEVICE LseState<acc_t> lse_init() {
  return {uf_neg_inf<acc_t>(), acc_t(0)};
}

// exp(logit - max), the share of one logit in a row's sum given the row's (running) maximum.
// A -inf logit adds exactly 0, also when the maximum is still -inf: exp(-inf - -inf) would be
// NaN, and a row may well begin with -inf (masked vocabulary entries) or hold only -inf.
template <typename acc_t>
UF_HOST_DEVICE acc_t lse_term(acc_t logit, acc_t max) {
  return logit == uf_neg_inf<acc_t>() ? acc_t(0) : uf_exp(logit - max);
}

// Fold one more logit into the state (online softmax): the one algorithm of the CUDA row
// reductions (per thread, then lse_merge across threads) and of the C++ CPU twin (per lane).
template <typename acc_t>
UF_HOST_DEVICE void lse_add(LseState<acc_t>& s, acc_t logit) {
  if (logit > s.max) {
    s.sum = s.sum * lse_term(s.max, logit) + acc_t(1);
    s.max = logit;
  } else {
    s.sum += lse_term(logit, s.max);
  }
}

// Merge two partial states (threads, warps, or vocabulary chunks).
template <typename acc_t>
UF_HOST_DEVICE LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (b.max == uf_neg_inf<acc_t>()) return a;
  if (a.max == uf_neg_inf<acc_t>()) return b;
  if (a.max >= b.max) return {a.max, a.sum + b.sum * uf_exp(b.max - a.max)};
  return {b.max, b.sum + a.sum * uf_exp(a.max - b.max)};
}

template <typename acc_t>
UF_HOST_DEVICE acc_t lse_value(LseState<acc_t> s) {
  return s.max + uf_log(s.sum);
}

// Upstream gradient of logp that actually reaches the logits: none for ignored tokens.
template <typename acc_t>
UF_HOST_DEVICE acc_t effective_grad_logp(acc_t g_logp, bool ignored) {
  return ignored ? acc_t(0) : g_logp;
}

// d(loss)/d(logit_v) of one vocabulary entry, from its probability p_v.
template <typename acc_t>
UF_HOST_DEVICE acc_t prob_grad(acc_t prob, acc_t g_logp, acc_t g_lse, bool is_label) {
  return (g_lse - g_logp) * prob + (is_label ? g_logp : acc_t(0));
}

// The same from the logit and the row's log-sum-exp.
template <typename acc_t>
UF_HOST_DEVICE acc_t logit_grad(acc_t logit, acc_t lse, acc_t g_logp, acc_t g_lse, bool is_label) {
  return prob_grad(uf_exp(logit - lse), g_logp, g_lse, is_label);
}

}  // namespace token_logprobs
}  // namespace unlearn_fast
