// Schemas of every op of unlearn_fast, in one place. Kernels register per dispatch key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake (meta) kernels and autograd are
// registered from Python in unlearn_fast/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(unlearn_fast, m) {
  // Fused vector updates of the inverse-HVP solvers (math: csrc/common/solver_update.h), float64
  // dot products: x += alpha p, r -= alpha q -> r.r; q += damping p -> (p.q, p.r); p = r + beta p.
  m.def("solver_cg_update(Tensor(a!) x, Tensor(b!) r, Tensor p, Tensor q, float alpha) -> Tensor");
  m.def("solver_damped_dots(Tensor(a!) q, Tensor p, Tensor? r, float damping) -> Tensor");
  m.def("solver_xpay(Tensor(a!) p, Tensor r, float beta) -> ()");
  // Per-token log p(label) and log-sum-exp of the logits X W^T + b, chunked over tokens
  // (chunk_rows > 0 tokens per chunk, sized by unlearn_fast/ops/chunking.py). output_mask: which of
  // (grad_hidden, grad_weight, grad_bias) to compute; the others are empty tensors (a frozen head
  // costs no weight gradient).
  m.def("token_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
        "int chunk_rows) -> (Tensor logp, Tensor lse)");
  m.def("token_logprobs_backward(Tensor grad_logp, Tensor grad_lse, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor labels, Tensor lse, int ignore_index, int chunk_rows, bool[3] output_mask) -> "
        "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Forward and gradient in one pass for an upstream gradient of logp known in advance (a loss
  // that is a weighted sum of token log-probs): one logits matmul fewer than forward + backward.
  m.def("token_logprobs_fused_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
        "Tensor grad_logp, int ignore_index, int chunk_rows, bool[3] output_mask) -> "
        "(Tensor logp, Tensor lse, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // One Sophia step over whole lists of tensors in one pass (the math: csrc/common/sophia_update.h).
  // Updates params, exp_avgs and (if hessian_from_grad) hessians in place; soul_reference
  // selects the SOUL reference code's double momentum update and additive-eps clipping.
  m.def("sophia_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] hessians, "
        "float lr, float beta1, float beta2, float rho, float bs, float weight_decay, float eps, bool maximize, "
        "bool hessian_from_grad, bool soul_reference) -> ()");
  // One expert's gated FFN on the tokens routed to it (math: csrc/common/expert_ffn.h): with
  // x = hidden[token_index], [g | u] = x gate_up^T, y = (act(g) * u) down^T; also returns the
  // pre-activations [g | u] for the backward pass. activation: 0 silu, 1 gelu_tanh.
  m.def("expert_ffn(Tensor hidden, Tensor token_index, Tensor gate_up, Tensor down, int activation) -> "
        "(Tensor y, Tensor gate_up_out)");
  // Gradients of hidden (scatter-added at token_index; empty unless need_hidden_grad), gate_up, down.
  m.def("expert_ffn_backward(Tensor grad_y, Tensor hidden, Tensor token_index, Tensor gate_up, Tensor down, "
        "Tensor gate_up_out, int activation, bool need_hidden_grad) -> "
        "(Tensor grad_hidden, Tensor grad_gate_up, Tensor grad_down)");
  // Softmax cross-entropy curvature products for K probes (Gauss-Newton at the LM head): with
  // p = softmax(X W^T + b) and logit tangents u_k = dX_k W^T + X dW_k^T + db_k, r_k = w (p*u_k -
  // p (p^T u_k)) per token; returns r_k W [K,T,H], r_k^T X [K,V,H], sum_t r_k [K,V] (each an
  // empty tensor unless asked for), chunked over tokens so that no [T,V] tensor exists.
  m.def("ce_curvature(Tensor hidden, Tensor weight, Tensor? bias, Tensor token_weights, Tensor? tangent_hidden, "
        "Tensor? tangent_weight, Tensor? tangent_bias, bool need_hidden, bool need_weight, bool need_bias, "
        "int chunk_rows) -> (Tensor out_hidden, Tensor out_weight, Tensor out_bias)");
  // Fused expert routing of UOE (math: csrc/common/moe_routing.h) over router logits [T, E]:
  // score 0 softmax / 1 sigmoid, selection by score + bias, group-limited top-k over n_group groups
  // (group_score 0 max / 1 sum of top 2), gates renormalised (+ renorm_eps) and scaled. None of them
  // materialises the [T, E] gates. Attribution: sum_t token_weights[t] g_t -> [E], in a fixed
  // order. Anchor residual: ||g_t - onehot(target)||^2 -> [T], and its gradient w.r.t. the logits.
  m.def("moe_expert_attribution(Tensor logits, Tensor token_weights, Tensor? bias, int top_k, int score, "
        "bool renormalize, float renorm_eps, float scaling, int n_group, int topk_group, int group_score) -> Tensor");
  m.def("moe_anchor_residual(Tensor logits, Tensor? bias, int target, int top_k, int score, bool renormalize, "
        "float renorm_eps, float scaling, int n_group, int topk_group, int group_score) -> Tensor");
  m.def("moe_anchor_residual_backward(Tensor grad_residual, Tensor logits, Tensor? bias, int target, int top_k, "
        "int score, bool renormalize, float renorm_eps, float scaling, int n_group, int topk_group, "
        "int group_score) -> Tensor");
}

// `import unlearn_fast._C` loads this library and with it the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
