"""Fused multi-tensor Sophia update: one pass over every parameter of a list per step.

Per coordinate, with g the gradient (negated if ``maximize``), m the gradient EMA and h the
diagonal Hessian EMA (the math lives in csrc/common/sophia_update.h, shared by the C++ and CUDA kernels):

* ``hessian_from_grad``: h <- beta2 h + (1 - beta2) g*g first (the ``empirical`` estimator);
* m <- beta1 m + (1 - beta1) g;
* p <- p (1 - lr weight_decay);
* ``soul_reference``: m <- beta1 m + (1 - beta1) g a second time (the SOUL reference code);
* p <- p - lr sign(m) min(|m| / D, 1), with D = max(rho bs h, eps) by default and
  D = rho bs h + eps under ``soul_reference``.

Why ``max``: the public Sophia code divides by ``rho * bs * h + 1e-15``; a negative h (a
Hutchinson estimate can be negative) then makes the ratio negative and the step goes against
sign(m). With ``max(rho bs h, eps)`` a non-positive h gives the full clipped step lr sign(m), as
the Sophia paper prescribes. Wherever rho bs h >= eps the two agree to a relative eps / (rho bs h)
(1e-15 / (rho bs h)): negligible for any real curvature; for 0 <= rho bs h < eps they differ by
at most 2x in the denominator, where both clip to the full step unless |m| < 2 eps.
``soul_reference`` keeps the additive form so that the SOUL preset reproduces the reference
code exactly (its h, an EMA of g*g, is never negative).

Dtypes: params and grads share one dtype per call (float32, float64, float16 or bfloat16); the
state (exp_avgs, hessians) is float32, or float64 for float64 params. Half-precision params are
read, updated in float32 and rounded once per step (round to nearest: updates far below the
param's ulp are lost, as with any bf16 optimizer without master weights).

Four implementations, one contract (the dispatch rule is unlearn_fast/backend.py):
``reference_sophia_update`` (plain PyTorch, the spec), the C++ CPU and CUDA kernels
(``torch.ops.unlearn_fast.sophia_update``), and a Triton kernel (kernels/sophia_update.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from unlearn_fast.backend import has_kernel, select_backend

_OP = "sophia_update"
_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Sophia state (m and h) for parameters of ``param_dtype``."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@torch.no_grad()
def reference_sophia_update(
    params,
    grads,
    exp_avgs,
    hessians,
    lr,
    beta1,
    beta2,
    rho,
    bs,
    weight_decay,
    eps,
    maximize,
    hessian_from_grad,
    soul_reference,
) -> None:
    """The specification, one tensor at a time in the state dtype (arguments as for the op)."""
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        g = g.to(m.dtype)
        if maximize:
            g = -g
        if hessian_from_grad:
            h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        q = p.to(m.dtype) * (1 - lr * weight_decay)
        if soul_reference:
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            denom = h * (rho * bs) + eps
        else:
            denom = (h * (rho * bs)).clamp(min=eps)
        ratio = (m.abs() / denom).clamp(max=1)
        q.addcmul_(m.sign(), ratio, value=-lr)
        p.copy_(q)


def _check_scalars(lr, beta1, beta2, rho, bs, weight_decay, eps) -> None:
    def finite(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (finite(lr) and lr >= 0):
        raise ValueError(f"sophia_update: lr must be a finite float >= 0, got {lr!r}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (finite(beta) and 0 <= beta < 1):
            raise ValueError(f"sophia_update: {name} must lie in [0, 1), got {beta!r}")
    if not (finite(rho) and rho >= 0):
        raise ValueError(f"sophia_update: rho must be finite and >= 0, got {rho!r}")
    if not (finite(bs) and bs > 0):
        raise ValueError(f"sophia_update: bs must be finite and > 0, got {bs!r}")
    if not (finite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"sophia_update: weight_decay must be finite and >= 0, got {weight_decay!r}")
    if not (finite(eps) and eps > 0):
        raise ValueError(f"sophia_update: eps must be finite and > 0, got {eps!r}")


def _check_tensors(params, grads, exp_avgs, hessians) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(hessians) == n):
        raise ValueError(
            "sophia_update: params, grads, exp_avgs and hessians must have the same length, got "
            f"{n}, {len(grads)}, {len(exp_avgs)}, {len(hessians)}"
        )
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"sophia_update: params must be float32, float64, float16 or bfloat16, got {dtype}")
    sdtype = state_dtype(dtype)
    for name, tensors, want in (
        ("params", params, dtype),
        ("grads", grads, dtype),
        ("exp_avgs", exp_avgs, sdtype),
        ("hessians", hessians, sdtype),
    ):
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"sophia_update: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.dtype != want:
                raise TypeError(
                    f"sophia_update: {name}[{i}] is {t.dtype} but must be {want} (params and grads share one "
                    "dtype; the state is float32, float64 for float64 params)"
                )
            if t.device != device:
                raise ValueError(f"sophia_update: {name}[{i}] is on {t.device} but params[0] is on {device}")
            if t.shape != params[i].shape:
                raise ValueError(
                    f"sophia_update: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(params[i].shape)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"sophia_update: {name}[{i}] must be contiguous")


def _triton(*args) -> None:
    from unlearn_fast.kernels import sophia_update as k

    k.sophia_update(*args)


def _compiled(*args) -> None:
    torch.ops.unlearn_fast.sophia_update(*args)


_IMPLS = {"reference": reference_sophia_update, "cpp": _compiled, "cuda": _compiled, "triton": _triton}


def sophia_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    rho: float,
    bs: float,
    weight_decay: float,
    eps: float = 1e-15,
    maximize: bool = False,
    hessian_from_grad: bool = False,
    soul_reference: bool = False,
) -> None:
    """One Sophia step, in place, over lists of tensors of one device and one param dtype.

    Updates ``params`` and ``exp_avgs`` (and ``hessians`` if ``hessian_from_grad``); see the
    module docstring for the rule. ``beta2`` is used only with ``hessian_from_grad``.
    """
    _check_scalars(lr, beta1, beta2, rho, bs, weight_decay, eps)
    params, grads, exp_avgs, hessians = list(params), list(grads), list(exp_avgs), list(hessians)
    _check_tensors(params, grads, exp_avgs, hessians)
    if not params:
        return
    backend = select_backend(_OP, params[0].device)
    _IMPLS[backend](
        params,
        grads,
        exp_avgs,
        hessians,
        float(lr),
        float(beta1),
        float(beta2),
        float(rho),
        float(bs),
        float(weight_decay),
        float(eps),
        bool(maximize),
        bool(hessian_from_grad),
        bool(soul_reference),
    )


# Fake (meta) kernel of the compiled op, for torch.compile and torch.library.opcheck: it only
# mutates its inputs.
if has_kernel(_OP, "CPU") or has_kernel(_OP, "CUDA"):

    @torch.library.register_fake("unlearn_fast::sophia_update")
    def _fake_sophia_update(
        params,
        grads,
        exp_avgs,
        hessians,
        lr,
        beta1,
        beta2,
        rho,
        bs,
        weight_decay,
        eps,
        maximize,
        hessian_from_grad,
        soul_reference,
    ) -> None:
        return None
