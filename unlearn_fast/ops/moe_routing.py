"""Fused expert routing of UOE: router logits -> scores -> (group-limited) top-k -> gates, in one pass.

Per token row t of router logits ``[T, E]`` (the math is shared by the C++ and CUDA kernels in
csrc/common/moe_routing.h, and written as plain torch in :func:`reference_routing_gates`, the spec):

* scores ``s = softmax(x)`` or ``sigmoid(x)``; selection scores ``sel = s + bias`` (``bias [E]``
  optional: DeepSeek-V3's ``e_score_correction_bias``);
* with ``n_group > 1``: the E experts form ``n_group`` groups of consecutive indices, a group's
  score is the max (DeepSeek-V2) or the sum of the two largest (DeepSeek-V3) of its sel, the
  ``topk_group`` best groups are kept and the others' experts cannot be chosen;
* the ``top_k`` experts with the largest sel are chosen; their gates are their *unbiased* scores,
  divided by (their sum + ``renorm_eps``) if ``renormalize``, times ``scaling``
  (``routed_scaling_factor``); ``g_t [E]`` holds the gates at the chosen experts, 0 elsewhere.

Ties: among equal selection (or group) scores the lower index is chosen first, on every backend
(the reference sorts stably). ``torch.topk`` leaves the order of ties unspecified (on CPU it does
not prefer the lower index), so transformers may pick another of two exactly tied experts; with
real-valued logits exact ties are rare, except in bfloat16/float16 where tied logits are common.

NaN policy: a row whose selection scores are not all finite (a NaN logit, ``+inf`` under softmax,
a NaN or infinite bias) has ``g_t = NaN`` at every expert; the NaN reaches the attribution, the
anchor loss and its gradient (never a silently wrong finite value). No input scan, no host sync.

Dtypes: logits float32, float64, float16 or bfloat16; the math runs in float32 (float64 for
float64 logits), as transformers' routers compute in float32; outputs are in that accumulation
dtype, ``dlogits`` in the logits' dtype.

Four implementations, one contract (dispatch: unlearn_fast/backend.py): the reference here, the
C++ CPU and CUDA kernels (``torch.ops.unlearn_fast.moe_*``) and Triton (kernels/moe_routing.py).
The attribution partial sums are added in a fixed order (chunks of 128 rows on C++/CUDA, one
block of rows per program on Triton): repeated calls give the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unlearn_fast.backend import has_kernel, select_backend

_ATTRIBUTION_OP = "moe_expert_attribution"
_ANCHOR_OP = "moe_anchor_residual"
_LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_EXPERTS = 1024  # the kernels' limit (csrc/common/moe_routing.h kMaxExperts)
MAX_GROUPS = 64  # the group mask is 64 bits
_SCORES = ("softmax", "sigmoid")
_GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class Routing:
    """How a router turns logits into gates (see the module docstring for the rule).

    ``renorm_eps`` is added to the renormalisation denominator: 0 for Mixtral/Qwen/OLMoE, 1e-20
    for DeepSeek-V3 (``topk_weights.sum() + 1e-20`` in transformers). Build one per layer from a
    model with :func:`unlearn_fast.models.moe.routing_spec`.
    """

    top_k: int
    score: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" | "top2_sum"
    renorm_eps: float = 0.0

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"Routing: top_k must be an int >= 1, got {self.top_k!r}")
        if self.score not in _SCORES:
            raise ValueError(f"Routing: score must be one of {_SCORES}, got {self.score!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"Routing: renormalize must be a bool, got {self.renormalize!r}")
        if not is_real(self.scaling):
            raise ValueError(f"Routing: scaling must be a finite number, got {self.scaling!r}")
        if not (is_int(self.n_group) and 1 <= self.n_group <= MAX_GROUPS):
            raise ValueError(f"Routing: n_group must be an int in [1, {MAX_GROUPS}], got {self.n_group!r}")
        if not (is_int(self.topk_group) and 1 <= self.topk_group <= self.n_group):
            raise ValueError(
                f"Routing: topk_group must be an int in [1, n_group={self.n_group}], got {self.topk_group!r}"
            )
        if self.group_score not in _GROUP_SCORES:
            raise ValueError(f"Routing: group_score must be one of {_GROUP_SCORES}, got {self.group_score!r}")
        if not (is_real(self.renorm_eps) and self.renorm_eps >= 0):
            raise ValueError(f"Routing: renorm_eps must be a finite number >= 0, got {self.renorm_eps!r}")

    def check(self, num_experts: int) -> None:
        """Raise ValueError unless this routing can route over ``num_experts`` experts."""
        if not 1 <= num_experts <= MAX_EXPERTS:
            raise ValueError(
                f"moe routing: the logits must have 1 to {MAX_EXPERTS} experts (columns), got {num_experts}"
            )
        if self.top_k > num_experts:
            raise ValueError(f"moe routing: top_k={self.top_k} exceeds the E={num_experts} experts")
        if num_experts % self.n_group:
            raise ValueError(f"moe routing: n_group={self.n_group} must divide E={num_experts}")
        group_size = num_experts // self.n_group
        if self.n_group > 1:
            if self.top_k > self.topk_group * group_size:
                raise ValueError(
                    f"moe routing: top_k={self.top_k} exceeds the {self.topk_group * group_size} experts of the "
                    f"topk_group={self.topk_group} kept groups; raise topk_group or lower top_k"
                )
            if self.group_score == "top2_sum" and group_size < 2:
                raise ValueError(f"moe routing: group_score='top2_sum' needs groups of >= 2 experts, got {group_size}")

    def op_args(self) -> tuple:
        """The routing arguments of the compiled ops, in schema order."""
        return (
            self.top_k,
            _SCORES.index(self.score),
            self.renormalize,
            float(self.renorm_eps),
            float(self.scaling),
            self.n_group,
            self.topk_group,
            _GROUP_SCORES.index(self.group_score),
        )


def acc_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype the routing math runs in (and its outputs have) for logits of ``logits_dtype``."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The reference (the spec).


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, largest first, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def reference_routing_gates(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense gates ``g [T, E]`` in plain torch, differentiable w.r.t. the logits (choices held fixed).

    The same torch ops, in the same order, as the transformers routers.
    """
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc)
    scores = torch.softmax(x, dim=-1) if routing.score == "softmax" else torch.sigmoid(x)
    select = scores.detach()
    if bias is not None:
        select = select + bias.to(acc)
    valid = torch.isfinite(select).all(dim=-1, keepdim=True)
    num_tokens, num_experts = x.shape
    if routing.n_group > 1:
        grouped = select.view(num_tokens, routing.n_group, num_experts // routing.n_group)
        if routing.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(dim=-1)
        kept = torch.zeros_like(group_scores, dtype=torch.bool)
        kept.scatter_(1, _top_indices(group_scores, routing.topk_group), True)
        expert_kept = kept.repeat_interleave(num_experts // routing.n_group, dim=1)
        select = select.masked_fill(~expert_kept, float("-inf"))
    chosen = _top_indices(select, routing.top_k)
    weights = scores.gather(1, chosen)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + routing.renorm_eps)
    weights = weights * routing.scaling
    gates = torch.zeros_like(scores).scatter(1, chosen, weights)
    return torch.where(valid, gates, torch.full_like(gates, float("nan")))


def reference_expert_attribution(logits, token_weights, routing, bias=None) -> torch.Tensor:
    """``sum_t token_weights[t] * g_t`` [E] through the dense reference gates."""
    with torch.no_grad():
        gates = reference_routing_gates(logits, routing, bias)
        return (token_weights.to(gates.dtype)[:, None] * gates).sum(dim=0)


def reference_anchor_residual(logits, target, routing, bias=None) -> torch.Tensor:
    """``||g_t - onehot(target)||^2`` [T] through the dense reference gates (differentiable)."""
    gates = reference_routing_gates(logits, routing, bias)
    onehot = torch.zeros_like(gates)
    onehot[:, target] = 1.0
    return ((gates - onehot) ** 2).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Input checks (every backend), dispatch, autograd.


def _check(name: str, logits, routing, bias, token_weights=None, target=None) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"{name}: routing must be a Routing, got {type(routing).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{name}: logits must be a [T, E] tensor (flatten batch and sequence first)")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name}: logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    routing.check(num_experts)
    for vec_name, vec, size in (("bias", bias, num_experts), ("token_weights", token_weights, num_tokens)):
        if vec is None:
            continue
        if not isinstance(vec, torch.Tensor) or vec.shape != (size,):
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{name}: {vec_name} must have shape [{size}], got {shape}")
        if not vec.is_floating_point():
            raise TypeError(f"{name}: {vec_name} must be a floating-point tensor, got {vec.dtype}")
        if vec.device != logits.device:
            raise ValueError(f"{name}: {vec_name} is on {vec.device} but logits are on {logits.device}")
    if target is not None:
        if not (isinstance(target, int) and not isinstance(target, bool) and 0 <= target < num_experts):
            raise ValueError(f"{name}: target must be an expert index in [0, {num_experts}), got {target!r}")


def _as_acc(vec: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if vec is None else vec.detach().to(dtype).contiguous()


def _triton():
    from unlearn_fast.kernels import moe_routing as k

    return k


def _attribution_impl(backend: str, logits, token_weights, bias, routing: Routing) -> torch.Tensor:
    if backend == "reference":
        return reference_expert_attribution(logits, token_weights, routing, bias)
    if backend == "triton":
        return _triton().expert_attribution(logits, token_weights, bias, *routing.op_args())
    return torch.ops.unlearn_fast.moe_expert_attribution(logits, token_weights, bias, *routing.op_args())


def _residual_impl(backend: str, logits, bias, target: int, routing: Routing) -> torch.Tensor:
    if backend == "triton":
        return _triton().anchor_residual(logits, bias, target, *routing.op_args())
    return torch.ops.unlearn_fast.moe_anchor_residual(logits, bias, target, *routing.op_args())


def _residual_backward_impl(backend: str, grad, logits, bias, target: int, routing: Routing) -> torch.Tensor:
    if backend == "triton":
        return _triton().anchor_residual_backward(grad, logits, bias, target, *routing.op_args())
    return torch.ops.unlearn_fast.moe_anchor_residual_backward(grad, logits, bias, target, *routing.op_args())


def routing_gates(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense gates ``g [T, E]`` (float32, float64 for float64 logits); differentiable w.r.t. the logits.

    A helper for inspection and tests: it runs the plain-torch reference and materialises [T, E];
    the fused ops below never do.
    """
    _check("routing_gates", logits, routing, bias)
    return reference_routing_gates(logits, routing, bias)


def expert_attribution(
    logits: torch.Tensor, token_weights: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_t token_weights[t] * g_t`` [E] in one fused pass (no autograd; float32, float64 for float64 in).

    UOE's attribution score of each expert: with ``token_weights[t] = 1 / (L_j Z)`` for the tokens
    of sequence j it is the mean over sequences of the per-sequence mean gate.
    """
    _check("expert_attribution", logits, routing, bias, token_weights=token_weights)
    acc = acc_dtype(logits.dtype)
    logits = logits.detach().contiguous()
    backend = select_backend(_ATTRIBUTION_OP, logits.device)
    with torch.no_grad():
        return _attribution_impl(backend, logits, _as_acc(token_weights, acc), _as_acc(bias, acc), routing)


class _AnchorResidual(torch.autograd.Function):
    """``||g_t - onehot(target)||^2`` [T]; the backward recomputes the routing from the logits."""

    @staticmethod
    def forward(ctx, logits, bias, target, routing, backend):
        ctx.save_for_backward(logits)
        ctx.bias, ctx.target, ctx.routing, ctx.backend = bias, target, routing, backend
        return _residual_impl(backend, logits, bias, target, routing)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of being silently 0
    def backward(ctx, grad_residual):
        (logits,) = ctx.saved_tensors
        grad = grad_residual.to(acc_dtype(logits.dtype)).contiguous()
        dlogits = _residual_backward_impl(ctx.backend, grad, logits, ctx.bias, ctx.target, ctx.routing)
        return dlogits, None, None, None, None


def router_anchor_loss(
    logits: torch.Tensor,
    target: int,
    token_weights: torch.Tensor,
    routing: Routing,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """UOE's anchor loss ``sum_t token_weights[t] * ||g_t - onehot(target)||^2`` (a scalar).

    Differentiable w.r.t. ``logits`` (the expert and group choices held fixed, as autograd through
    torch.topk does) and ``token_weights``; ``bias`` gets no gradient (a buffer). The fused
    backends compute the per-token residual in one pass and its logits gradient in one pass that
    recomputes the routing; no [T, E] tensor but ``dlogits`` exists. For the mean over forget
    tokens pass ``token_weights = 1 / T``.
    """
    _check("router_anchor_loss", logits, routing, bias, token_weights=token_weights, target=target)
    acc = acc_dtype(logits.dtype)
    backend = select_backend(_ANCHOR_OP, logits.device)
    if backend == "reference":
        residual = reference_anchor_residual(logits, target, routing, bias)
    else:
        residual = _AnchorResidual.apply(logits.contiguous(), _as_acc(bias, acc), target, routing, backend)
    return (token_weights.to(acc) * residual).sum()


def router_score_anchor_loss(
    logits: torch.Tensor, targets: list[int] | tuple[int, ...], token_weights: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """UOE's router anchor on the pre-top-k scores: ``sum_t token_weights[t] * ||s_t - a||^2`` (a scalar).

    ``s_t`` are the router's scores before any selection: ``softmax(x_t)`` or ``sigmoid(x_t)`` as
    ``routing.score`` says. ``a`` puts the routing on the ``targets`` experts: ``1/M`` at each of the M
    targets under softmax (the scores sum to 1, so even mass on the targets is the point they can
    reach), 1 at each under sigmoid (independent scores); 0 elsewhere.

    Why not the gates of :func:`router_anchor_loss`: once a target leaves a token's top-k (or its
    group is dropped) its gate is 0 with zero gradient, so nothing pulls the token back; and DeepSeek's
    ``routed_scaling_factor`` s makes the gate ``s * p``, whose residual ``(s p - 1)^2`` is least at
    ``p = 1/s``, pushing the target's score down whenever ``p > 1/s``. The scores have neither
    problem and the gradient is that of one softmax or sigmoid. The selection bias (DeepSeek-V3)
    only ranks experts and is not part of the scores. Plain torch: the ``[T, E]`` scores of the forget
    tokens are small and softmax/sigmoid are single fused torch kernels.
    """
    _check("router_score_anchor_loss", logits, routing, None, token_weights=token_weights)
    num_experts = logits.shape[1]
    chosen = list(targets)
    if (
        not chosen
        or len(set(chosen)) != len(chosen)
        or not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < num_experts for e in chosen)
    ):
        raise ValueError(
            f"router_score_anchor_loss: targets must be distinct expert indices in [0, {num_experts}), got {targets!r}"
        )
    x = logits.to(acc_dtype(logits.dtype))
    scores = torch.softmax(x, dim=-1) if routing.score == "softmax" else torch.sigmoid(x)
    aim = torch.zeros(num_experts, dtype=x.dtype, device=x.device)
    aim[chosen] = 1.0 / len(chosen) if routing.score == "softmax" else 1.0
    return (token_weights.to(x.dtype) * ((scores - aim) ** 2).sum(dim=-1)).sum()


# Fake (meta) kernels of the compiled ops, for torch.compile and torch.library.opcheck.
if has_kernel(_ATTRIBUTION_OP, "CPU") or has_kernel(_ATTRIBUTION_OP, "CUDA"):

    @torch.library.register_fake("unlearn_fast::moe_expert_attribution")
    def _fake_attribution(
        logits, token_weights, bias, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score
    ):
        return logits.new_empty((logits.shape[1],), dtype=acc_dtype(logits.dtype))

    @torch.library.register_fake("unlearn_fast::moe_anchor_residual")
    def _fake_residual(
        logits, bias, target, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score
    ):
        return logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))

    @torch.library.register_fake("unlearn_fast::moe_anchor_residual_backward")
    def _fake_residual_backward(
        grad_residual,
        logits,
        bias,
        target,
        top_k,
        score,
        renormalize,
        renorm_eps,
        scaling,
        n_group,
        topk_group,
        group_score,
    ):
        return torch.empty_like(logits)
