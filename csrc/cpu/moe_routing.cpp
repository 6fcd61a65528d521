// C++ CPU kernels of the fused expert-routing ops: one lane per row (SerialLanes), rows split
// over threads with at::parallel_for, each thread with its own row buffers. The per-row algorithm
// is that of csrc/common/moe_routing.h, shared with the CUDA twin.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/moe_routing.h"

namespace unlearn_fast {
namespace moe_routing {
namespace {

constexpr int64_t kRowGrain = 64;  // rows per parallel task of the per-row ops

// A thread's row buffers.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> score, select, group;
  std::vector<int> chosen;
  explicit RowScratch(const Routing<acc_t>& r)
      : score(r.num_experts), select(r.num_experts), group(r.n_group), chosen(r.top_k) {}
  RowBuffers<acc_t> buffers() { return {score.data(), select.data(), group.data(), chosen.data()}; }
};

template <typename acc_t>
const acc_t* bias_ptr(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->const_data_ptr<acc_t>() : nullptr;
}

at::Tensor expert_attribution_cpu(const at::Tensor& logits, const at::Tensor& token_weights,
                                  const std::optional<at::Tensor>& bias, int64_t top_k, int64_t score,
                                  bool renormalize, double renorm_eps, double scaling, int64_t n_group,
                                  int64_t topk_group, int64_t group_score) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_vector(token_weights, logits, T, "token_weights");
  check_bias(bias, logits);
  at::Tensor out = at::zeros({E}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return out;
  const int64_t n_chunks = (T + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor partials = at::zeros({n_chunks, E}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_expert_attribution_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Routing<acc_t> r =
        make_routing<acc_t>(E, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* w = token_weights.const_data_ptr<acc_t>();
    const acc_t* b = bias_ptr<acc_t>(bias);
    double* part = partials.mutable_data_ptr<double>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(r);
      const SerialLanes lanes;
      for (int64_t c = begin; c < end; ++c) {
        double* chunk_sum = part + c * E;
        const auto add = [chunk_sum](int e, acc_t v) { chunk_sum[e] += static_cast<double>(v); };
        for (int64_t t = c * kRowsPerChunk; t < std::min(T, (c + 1) * kRowsPerChunk); ++t) {
          const bool valid = route_row(lanes, x + t * E, b, r, scratch.buffers());
          accumulate_row(lanes, r, scratch.buffers(), valid, w[t], add);
        }
      }
    });
    // The chunks' partial sums in chunk order: the same bits for any thread count.
    acc_t* o = out.mutable_data_ptr<acc_t>();
    for (int64_t e = 0; e < E; ++e) {
      double total = 0;
      for (int64_t c = 0; c < n_chunks; ++c) total += part[c * E + e];
      o[e] = static_cast<acc_t>(total);
    }
  });
  return out;
}

at::Tensor anchor_residual_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t target,
                               int64_t top_k, int64_t score, bool renormalize, double renorm_eps, double scaling,
                               int64_t n_group, int64_t topk_group, int64_t group_score) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_bias(bias, logits);
  check_target(target, E);
  at::Tensor out = at::empty({T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_anchor_residual_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Routing<acc_t> r =
        make_routing<acc_t>(E, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* b = bias_ptr<acc_t>(bias);
    acc_t* o = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(r);
      const SerialLanes lanes;
      for (int64_t t = begin; t < end; ++t) {
        const bool valid = route_row(lanes, x + t * E, b, r, scratch.buffers());
        o[t] = anchor_residual(r, scratch.buffers(), valid, static_cast<int>(target));
      }
    });
  });
  return out;
}

at::Tensor anchor_residual_backward_cpu(const at::Tensor& grad_residual, const at::Tensor& logits,
                                        const std::optional<at::Tensor>& bias, int64_t target, int64_t top_k,
                                        int64_t score, bool renormalize, double renorm_eps, double scaling,
                                        int64_t n_group, int64_t topk_group, int64_t group_score) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_vector(grad_residual, logits, T, "grad_residual");
  check_bias(bias, logits);
  check_target(target, E);
  at::Tensor dlogits = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_anchor_residual_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Routing<acc_t> r =
        make_routing<acc_t>(E, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* gr = grad_residual.const_data_ptr<acc_t>();
    const acc_t* b = bias_ptr<acc_t>(bias);
    scalar_t* dx = dlogits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(r);
      const SerialLanes lanes;
      for (int64_t t = begin; t < end; ++t) {
        const bool valid = route_row(lanes, x + t * E, b, r, scratch.buffers());
        anchor_backward_row(lanes, r, scratch.buffers(), valid, static_cast<int>(target), gr[t], dx + t * E);
      }
    });
  });
  return dlogits;
}

}  // namespace
}  // namespace moe_routing
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("moe_expert_attribution", &::unlearn_fast::moe_routing::expert_attribution_cpu);
  m.impl("moe_anchor_residual", &::unlearn_fast::moe_routing::anchor_residual_cpu);
  m.impl("moe_anchor_residual_backward", &::unlearn_fast::moe_routing::anchor_residual_backward_cpu);
}
