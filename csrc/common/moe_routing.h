// The fused expert-routing ops of UOE, shared by the C++ CPU kernel (csrc/cpu/moe_routing.cpp) and
// the CUDA kernel (csrc/cuda/moe_routing.cu): the whole per-row algorithm, then the host-side
// input checks both backends run.
//
// One row t of router logits x [E] (the spec is reference_routing_gates in
// unlearn_fast/ops/moe_routing.py):
//   s_e   = softmax(x)_e or sigmoid(x_e)                      (scores)
//   sel_e = s_e + bias_e                                       (selection scores; bias optional)
//   [n_group > 1] group score = max (or sum of the top 2) of sel over the group's E / n_group
//                 experts; the topk_group best groups are kept, the others' sel set to -inf
//   K     = the top_k experts by sel, picked one at a time by argmax: the larger value wins, equal
//           values go to the lower index (torch.topk's order among ties is unspecified)
//   g_e   = scaling * s_e / (sum_{j in K} s_j + renorm_eps)   for e in K  (if renormalize)
//           scaling * s_e                                      for e in K  (otherwise)
//           0                                                  for e not in K
// NaN policy: a row with a non-finite selection score (a NaN logit, +inf under softmax, a NaN or
// infinite bias) is invalid; its g is NaN at every expert, so NaN reaches every output it feeds.
//
// The row functions are written once against a `Lanes` executor: a set of threads that share a
// row. Lane `first()` handles experts first, first + step, ...; `max`, `sum`, `argmax` and `all`
// combine the lanes' partial results (every lane receives the result); `sync` makes one lane's
// writes to the row buffers visible to the others; `owns(e)` says whether this lane handles e.
// The CPU kernel runs one lane per row (SerialLanes below), the CUDA kernel one warp per row
// (32 lanes, shuffles). Every expert's buffer entries are written only by the lane that owns it,
// except where the code syncs first.
#pragma once
#include <ATen/ATen.h>

#include <climits>
#include <cstdint>

#include "common/math.h"

namespace unlearn_fast {
namespace moe_routing {

// Limits of the kernels: the CUDA kernel keeps a row in shared memory, the group mask is 64 bits.
constexpr int64_t kMaxExperts = 1024;
constexpr int64_t kMaxGroups = 64;
// Rows per partial sum of the attribution: the partials are added in chunk order, so the result
// depends on this plan only, never on the thread count. The sums are float64 whatever acc_t:
// sequential float32 sums of many rows lose more than torch's pairwise sum.
constexpr int64_t kRowsPerChunk = 128;

// The routing of one call, built on the host (doubles cast once to the accumulation type).
template <typename acc_t>
struct Routing {
  int num_experts;
  int top_k;
  int n_group;     // 1: no group-limited selection
  int topk_group;
  int group_size;  // num_experts / n_group
  bool sigmoid;    // else softmax
  bool renormalize;
  bool group_top2_sum;  // else the group score is the max
  acc_t renorm_eps;
  acc_t scaling;
};

// A row's scratch space: scores s [E], selection scores sel [E] (reused for dL/ds in the
// backward), group scores [n_group], the chosen experts [top_k] in selection order.
template <typename acc_t>
struct RowBuffers {
  acc_t* score;
  acc_t* select;
  acc_t* group;
  int* chosen;
};

// An argmax candidate.
template <typename acc_t>
struct Pick {
  acc_t value;
  int index;
};

template <typename acc_t>
UF_HOST_DEVICE Pick<acc_t> no_pick() {
  return {uf_neg_inf<acc_t>(), INT_MAX};
}

// Whether (value, index) beats `p`: larger value, or equal value and lower index.
template <typename acc_t>
UF_HOST_DEVICE bool beats(acc_t value, int index, const Pick<acc_t>& p) {
  return value > p.value || (value == p.value && index < p.index);
}

// x - x is 0 for finite x and NaN for NaN and +-inf (no isfinite overload juggling host/device).
template <typename acc_t>
UF_HOST_DEVICE bool is_finite(acc_t x) {
  return x - x == acc_t(0);
}

template <typename acc_t>
UF_HOST_DEVICE acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// Scores and selection scores of row x; returns whether the row is valid (every sel finite).
template <typename scalar_t, typename acc_t, class Lanes>
UF_HOST_DEVICE bool compute_scores(const Lanes& lanes, const scalar_t* x, const acc_t* bias, const Routing<acc_t>& r,
                                   RowBuffers<acc_t> buf) {
  const int E = r.num_experts;
  if (r.sigmoid) {
    for (int e = lanes.first(); e < E; e += lanes.step()) {
      buf.score[e] = acc_t(1) / (acc_t(1) + uf_exp(-static_cast<acc_t>(x[e])));
    }
  } else {
    acc_t row_max = uf_neg_inf<acc_t>();
    for (int e = lanes.first(); e < E; e += lanes.step()) {
      const acc_t v = static_cast<acc_t>(x[e]);
      row_max = v > row_max ? v : row_max;  // a NaN is skipped here but poisons its own score
    }
    row_max = lanes.max(row_max);
    // The normaliser in float64 whatever acc_t: a sequential float32 sum over E (one CPU lane)
    // would be several ulps off where torch's vectorised tree sum is about one.
    double total = 0;
    for (int e = lanes.first(); e < E; e += lanes.step()) {
      const acc_t v = uf_exp(static_cast<acc_t>(x[e]) - row_max);
      buf.score[e] = v;
      total += static_cast<double>(v);
    }
    const acc_t norm = static_cast<acc_t>(lanes.sum(total));
    for (int e = lanes.first(); e < E; e += lanes.step()) buf.score[e] = buf.score[e] / norm;
  }
  bool finite = true;
  for (int e = lanes.first(); e < E; e += lanes.step()) {
    const acc_t sel = bias != nullptr ? buf.score[e] + bias[e] : buf.score[e];
    buf.select[e] = sel;
    finite = finite && is_finite(sel);
  }
  return lanes.all(finite);
}

// The score of one group of `size` selection scores: the max, or the sum of the two largest.
template <typename acc_t>
UF_HOST_DEVICE acc_t group_score(const acc_t* sel, int size, bool top2_sum) {
  acc_t first = uf_neg_inf<acc_t>(), second = uf_neg_inf<acc_t>();
  for (int i = 0; i < size; ++i) {
    const acc_t v = sel[i];
    if (v > first) {
      second = first;
      first = v;
    } else if (v > second) {
      second = v;
    }
  }
  return top2_sum ? first + second : first;
}

// Group-limited selection: keeps the topk_group best groups, sets the others' sel to -inf.
// (A lane scans its entries in increasing index, so a strict > keeps the lower index on ties;
// `argmax` settles ties across lanes.)
template <typename acc_t, class Lanes>
UF_HOST_DEVICE void mask_groups(const Lanes& lanes, const Routing<acc_t>& r, RowBuffers<acc_t> buf) {
  if (r.n_group <= 1) return;
  lanes.sync();  // a lane scores whole groups: it reads the other lanes' sel
  for (int g = lanes.first(); g < r.n_group; g += lanes.step()) {
    buf.group[g] = group_score(buf.select + g * r.group_size, r.group_size, r.group_top2_sum);
  }
  uint64_t kept = 0;
  for (int pick = 0; pick < r.topk_group; ++pick) {
    Pick<acc_t> best = no_pick<acc_t>();
    for (int g = lanes.first(); g < r.n_group; g += lanes.step()) {
      if (!((kept >> g) & 1u) && buf.group[g] > best.value) best = {buf.group[g], g};
    }
    best = lanes.argmax(best);
    kept |= uint64_t(1) << best.index;
  }
  lanes.sync();  // every lane has read sel before any lane masks it
  for (int e = lanes.first(); e < r.num_experts; e += lanes.step()) {
    if (!((kept >> (e / r.group_size)) & 1u)) buf.select[e] = uf_neg_inf<acc_t>();
  }
}

// The top_k experts by sel, in selection order, into buf.chosen (sel of the chosen set to -inf).
// The checks guarantee top_k <= the unmasked experts, so a pick is never a masked one.
template <typename acc_t, class Lanes>
UF_HOST_DEVICE void select_top_k(const Lanes& lanes, const Routing<acc_t>& r, RowBuffers<acc_t> buf) {
  for (int j = 0; j < r.top_k; ++j) {
    Pick<acc_t> best = no_pick<acc_t>();
    for (int e = lanes.first(); e < r.num_experts; e += lanes.step()) {
      if (buf.select[e] > best.value) best = {buf.select[e], e};  // increasing e: ties keep the lower
    }
    best = lanes.argmax(best);
    if (lanes.owns(best.index)) buf.select[best.index] = uf_neg_inf<acc_t>();
    if (lanes.leader()) buf.chosen[j] = best.index;
  }
  lanes.sync();  // chosen and score are read by every lane from here on
}

// Routes one row: fills the buffers, returns whether the row is valid (uniform over the lanes).
template <typename scalar_t, typename acc_t, class Lanes>
UF_HOST_DEVICE bool route_row(const Lanes& lanes, const scalar_t* x, const acc_t* bias, const Routing<acc_t>& r,
                              RowBuffers<acc_t> buf) {
  const bool valid = compute_scores(lanes, x, bias, r, buf);
  if (valid) {
    mask_groups(lanes, r, buf);
    select_top_k(lanes, r, buf);
  }
  lanes.sync();
  return valid;
}

// The denominator of the gates: sum of the chosen scores + eps when renormalising, else 1.
template <typename acc_t>
UF_HOST_DEVICE acc_t gate_denominator(const Routing<acc_t>& r, RowBuffers<acc_t> buf) {
  if (!r.renormalize) return acc_t(1);
  acc_t total = 0;
  for (int j = 0; j < r.top_k; ++j) total += buf.score[buf.chosen[j]];  // in selection order
  return total + r.renorm_eps;
}

// The gate of a chosen expert of score s, in the order transformers computes it.
template <typename acc_t>
UF_HOST_DEVICE acc_t gate_of(acc_t s, acc_t denom, const Routing<acc_t>& r) {
  return r.renormalize ? s / denom * r.scaling : s * r.scaling;
}

// Attribution: partial[e] += weight * g_e for the lane's experts (add(e, v) does the +=).
template <typename acc_t, class Lanes, class Add>
UF_HOST_DEVICE void accumulate_row(const Lanes& lanes, const Routing<acc_t>& r, RowBuffers<acc_t> buf, bool valid,
                                   acc_t weight, Add&& add) {
  if (!valid) {
    for (int e = lanes.first(); e < r.num_experts; e += lanes.step()) add(e, weight * quiet_nan<acc_t>());
    return;
  }
  const acc_t denom = gate_denominator(r, buf);
  for (int j = 0; j < r.top_k; ++j) {
    const int e = buf.chosen[j];
    if (lanes.owns(e)) add(e, weight * gate_of(buf.score[e], denom, r));
  }
}

// Anchor residual ||g - onehot(target)||^2 of a routed row, as sum over K of (g - [e == target])^2
// plus 1 if target is not in K (no cancellation when g_target is close to 1). The squares are
// summed in float64: a sequential float32 sum of k terms would lose more than torch's tree sum.
template <typename acc_t>
UF_HOST_DEVICE acc_t anchor_residual(const Routing<acc_t>& r, RowBuffers<acc_t> buf, bool valid, int target) {
  if (!valid) return quiet_nan<acc_t>();
  const acc_t denom = gate_denominator(r, buf);
  double residual = 0;
  bool hit = false;
  for (int j = 0; j < r.top_k; ++j) {
    const int e = buf.chosen[j];
    const double d = static_cast<double>(gate_of(buf.score[e], denom, r) - (e == target ? acc_t(1) : acc_t(0)));
    hit = hit || e == target;
    residual += d * d;
  }
  return static_cast<acc_t>(hit ? residual : residual + 1.0);
}

// dL/dx of the row for L = grad * ||g - onehot(target)||^2 (top-k and group choice held fixed),
// written to dx (type out_t) for the lane's experts. With u_j = dL/dg_j = 2 grad (g_j - [j == target])
// over the chosen j: dL/ds_j = q_j = scaling / D (u_j - sum_i u_i s_i / D) when renormalising
// (D = sum_K s + eps), scaling u_j otherwise; then through the scores:
//   softmax: dx_e = s_e (q_e - sum_j q_j s_j),   sigmoid: dx_e = q_e s_e (1 - s_e).
// Buffer sel holds q (dense over the lane's experts; only owners touch an entry).
template <typename acc_t, typename out_t, class Lanes>
UF_HOST_DEVICE void anchor_backward_row(const Lanes& lanes, const Routing<acc_t>& r, RowBuffers<acc_t> buf,
                                        bool valid, int target, acc_t grad, out_t* dx) {
  const int E = r.num_experts;
  if (!valid) {
    for (int e = lanes.first(); e < E; e += lanes.step()) dx[e] = static_cast<out_t>(quiet_nan<acc_t>());
    return;
  }
  const acc_t denom = gate_denominator(r, buf);
  acc_t u_dot_s = 0;  // sum_i u_i s_i, for the renormalisation
  if (r.renormalize) {
    for (int j = 0; j < r.top_k; ++j) {
      const int e = buf.chosen[j];
      const acc_t u = acc_t(2) * grad * (gate_of(buf.score[e], denom, r) - (e == target ? acc_t(1) : acc_t(0)));
      u_dot_s += u * buf.score[e];
    }
  }
  for (int e = lanes.first(); e < E; e += lanes.step()) buf.select[e] = acc_t(0);
  acc_t q_dot_s = 0;  // sum_j q_j s_j, for the softmax
  for (int j = 0; j < r.top_k; ++j) {
    const int e = buf.chosen[j];
    const acc_t u = acc_t(2) * grad * (gate_of(buf.score[e], denom, r) - (e == target ? acc_t(1) : acc_t(0)));
    const acc_t q = r.renormalize ? r.scaling / denom * (u - u_dot_s / denom) : r.scaling * u;
    q_dot_s += q * buf.score[e];
    if (lanes.owns(e)) buf.select[e] = q;
  }
  for (int e = lanes.first(); e < E; e += lanes.step()) {
    const acc_t s = buf.score[e], q = buf.select[e];
    const acc_t d = r.sigmoid ? q * s * (acc_t(1) - s) : s * (q - q_dot_s);
    dx[e] = static_cast<out_t>(d);
  }
}

// One lane per row: the CPU executor.
struct SerialLanes {
  UF_HOST_DEVICE int first() const { return 0; }
  UF_HOST_DEVICE int step() const { return 1; }
  template <typename acc_t>
  UF_HOST_DEVICE acc_t max(acc_t x) const {
    return x;
  }
  template <typename acc_t>
  UF_HOST_DEVICE acc_t sum(acc_t x) const {
    return x;
  }
  template <typename acc_t>
  UF_HOST_DEVICE Pick<acc_t> argmax(Pick<acc_t> p) const {
    return p;
  }
  UF_HOST_DEVICE bool all(bool b) const { return b; }
  UF_HOST_DEVICE void sync() const {}
  UF_HOST_DEVICE bool leader() const { return true; }
  UF_HOST_DEVICE bool owns(int) const { return true; }
};

// ---------------------------------------------------------------------------------------------
// Host side: the routing constants and the input checks of every op (plain C++ and ATen).

inline at::ScalarType acc_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks the routing arguments against E and returns them as kernel constants.
template <typename acc_t>
Routing<acc_t> make_routing(int64_t num_experts, int64_t top_k, int64_t score, bool renormalize, double renorm_eps,
                            double scaling, int64_t n_group, int64_t topk_group, int64_t group_score) {
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "moe routing: the logits must have 1 to ", kMaxExperts,
              " experts (columns), got ", num_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "moe routing: top_k must lie in [1, E=", num_experts, "], got ",
              top_k);
  TORCH_CHECK(score == 0 || score == 1, "moe routing: score must be 0 (softmax) or 1 (sigmoid), got ", score);
  TORCH_CHECK(group_score == 0 || group_score == 1, "moe routing: group_score must be 0 (max) or 1 (top2_sum), got ",
              group_score);
  TORCH_CHECK(std::isfinite(renorm_eps) && renorm_eps >= 0, "moe routing: renorm_eps must be finite and >= 0, got ",
              renorm_eps);
  TORCH_CHECK(std::isfinite(scaling), "moe routing: scaling must be finite, got ", scaling);
  TORCH_CHECK(n_group >= 1 && n_group <= kMaxGroups && num_experts % n_group == 0, "moe routing: n_group must divide E=",
              num_experts, " and lie in [1, ", kMaxGroups, "], got ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe routing: topk_group must lie in [1, n_group=", n_group,
              "], got ", topk_group);
  const int64_t group_size = num_experts / n_group;
  if (n_group > 1) {
    TORCH_CHECK(top_k <= topk_group * group_size, "moe routing: top_k=", top_k, " exceeds the ", topk_group * group_size,
                " experts of the topk_group=", topk_group, " kept groups; raise topk_group or lower top_k");
    TORCH_CHECK(group_score == 0 || group_size >= 2, "moe routing: group_score top2_sum needs groups of >= 2 experts, got ",
                group_size);
  }
  Routing<acc_t> r;
  r.num_experts = static_cast<int>(num_experts);
  r.top_k = static_cast<int>(top_k);
  r.n_group = static_cast<int>(n_group);
  r.topk_group = static_cast<int>(topk_group);
  r.group_size = static_cast<int>(group_size);
  r.sigmoid = score == 1;
  r.renormalize = renormalize;
  r.group_top2_sum = group_score == 1;
  r.renorm_eps = static_cast<acc_t>(renorm_eps);
  r.scaling = static_cast<acc_t>(scaling);
  return r;
}

inline void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "moe routing: logits must be [T, E], got ", logits.dim(), " dims");
  const at::ScalarType t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "moe routing: logits must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(logits.is_contiguous(), "moe routing: logits must be contiguous (call .contiguous())");
}

// A per-expert or per-token vector in the accumulation dtype, on the logits' device.
inline void check_vector(const at::Tensor& v, const at::Tensor& logits, int64_t size, const char* name) {
  const at::ScalarType want = acc_dtype(logits.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == size, "moe routing: ", name, " must have shape [", size, "], got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == want, "moe routing: ", name, " must be ", want, " for ", logits.scalar_type(),
              " logits (float64 for float64, else float32), got ", v.scalar_type());
  TORCH_CHECK(v.device() == logits.device(), "moe routing: ", name, " is on ", v.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(v.is_contiguous(), "moe routing: ", name, " must be contiguous");
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& logits) {
  if (bias.has_value() && bias->defined()) check_vector(*bias, logits, logits.size(1), "bias");
}

inline void check_target(int64_t target, int64_t num_experts) {
  TORCH_CHECK(target >= 0 && target < num_experts, "moe routing: target must be an expert index in [0, ", num_experts,
              "), got ", target);
}

}  // namespace moe_routing
}  // namespace unlearn_fast
