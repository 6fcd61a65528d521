"""Fused vector updates of the inverse-HVP solvers: each a single memory-bound pass.

The vector work of one conjugate-gradient iteration (unlearn_fast/solvers.py), on flat vectors
of one dtype (float32 or float64) and one device:

* ``damped_dots(q, p, r, damping)``: q <- q + damping p (the damped product (H + damping I) p
  from the HVP q = H p), returning ``[p.q, p.r]`` (p.r = 0 when ``r`` is None);
* ``cg_update(x, r, p, q, alpha)``: x <- x + alpha p, r <- r - alpha q, returning the new r.r;
* ``xpay(p, r, beta)``: p <- r + beta p (the next search direction).

Three passes instead of the six or seven of the unfused torch sequence (``q.add_``, ``dot``,
``x.add_``, ``r.sub_``, ``dot``, ``p.mul_().add_()``). Elementwise arithmetic runs in the
vectors' dtype; dot products accumulate in float64 and come back as float64 tensors on the
vectors' device, summed in a fixed order for a given length (reproducible results, no atomics).
Vectors are updated in place; a written vector must not alias another argument.

Four implementations, one contract (the dispatch rule is unlearn_fast/backend.py): the
``reference_*`` functions (plain PyTorch, the spec), the C++ CPU and CUDA kernels
(``torch.ops.unlearn_fast.solver_*``, math in csrc/common/solver_update.h) and Triton kernels
(kernels/solver_update.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unlearn_fast.backend import has_kernel, select_backend

_OP = "solver_cg_update"  # the three ops are built together: one name decides the backend
_DTYPES = (torch.float32, torch.float64)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


@torch.no_grad()
def reference_cg_update(x: Tensor, r: Tensor, p: Tensor, q: Tensor, alpha: float) -> Tensor:
    """The specification of :func:`cg_update` (unfused torch)."""
    x.add_(p, alpha=alpha)
    r.sub_(q, alpha=alpha)
    return _dot(r, r)


@torch.no_grad()
def reference_damped_dots(q: Tensor, p: Tensor, r: Tensor | None, damping: float) -> Tensor:
    """The specification of :func:`damped_dots` (unfused torch)."""
    if damping != 0.0:
        q.add_(p, alpha=damping)
    pr = _dot(p, r) if r is not None else q.new_zeros((), dtype=torch.float64)
    return torch.stack([_dot(p, q), pr])


@torch.no_grad()
def reference_xpay(p: Tensor, r: Tensor, beta: float) -> None:
    """The specification of :func:`xpay` (unfused torch)."""
    p.mul_(beta).add_(r)


def _check(op: str, scalar: float, **vectors: Tensor) -> None:
    if not (isinstance(scalar, (int, float)) and not isinstance(scalar, bool) and math.isfinite(scalar)):
        raise ValueError(f"{op}: the coefficient must be a finite float, got {scalar!r}")
    (first_name, first), *_ = vectors.items()
    for name, t in vectors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(f"{op}: {name} is {t.dtype} on {t.device}, {first_name} {first.dtype} on {first.device}")
        if t.shape != first.shape:  # flat vectors: the compiled kernels would pair [2, 3] with [6]
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, {first_name} {tuple(first.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")


def _check_distinct(op: str, written: dict[str, Tensor], read: dict[str, Tensor]) -> None:
    names = list(written) + list(read)
    tensors = list(written.values()) + list(read.values())
    for i, (name, t) in enumerate(written.items()):
        for other_name, other in zip(names[i + 1 :], tensors[i + 1 :]):
            if t.numel() and t.data_ptr() == other.data_ptr():
                raise ValueError(f"{op}: {name} and {other_name} must be different tensors ({name} is written to)")


def _kernels():
    from unlearn_fast.kernels import solver_update

    return solver_update


def cg_update(x: Tensor, r: Tensor, p: Tensor, q: Tensor, alpha: float) -> Tensor:
    """x += alpha p; r -= alpha q (in place); returns the new r.r as a float64 scalar tensor."""
    _check("cg_update", alpha, x=x, r=r, p=p, q=q)
    _check_distinct("cg_update", {"x": x, "r": r}, {"p": p, "q": q})
    backend = select_backend(_OP, x.device)
    alpha = float(alpha)
    if backend == "reference":
        return reference_cg_update(x, r, p, q, alpha)
    if backend == "triton":
        return _kernels().cg_update(x, r, p, q, alpha)
    return torch.ops.unlearn_fast.solver_cg_update(x, r, p, q, alpha)


def damped_dots(q: Tensor, p: Tensor, r: Tensor | None = None, damping: float = 0.0) -> Tensor:
    """q += damping p (in place); returns float64 ``[p.q, p.r]`` (p.r = 0 when r is None)."""
    vectors = {"q": q, "p": p} if r is None else {"q": q, "p": p, "r": r}
    _check("damped_dots", damping, **vectors)
    _check_distinct("damped_dots", {"q": q}, {n: t for n, t in vectors.items() if n != "q"})
    backend = select_backend(_OP, q.device)
    damping = float(damping)
    if backend == "reference":
        return reference_damped_dots(q, p, r, damping)
    if backend == "triton":
        return _kernels().damped_dots(q, p, r, damping)
    return torch.ops.unlearn_fast.solver_damped_dots(q, p, r, damping)


def xpay(p: Tensor, r: Tensor, beta: float) -> None:
    """p = r + beta p, in place."""
    _check("xpay", beta, p=p, r=r)
    _check_distinct("xpay", {"p": p}, {"r": r})
    backend = select_backend(_OP, p.device)
    beta = float(beta)
    if backend == "reference":
        reference_xpay(p, r, beta)
    elif backend == "triton":
        _kernels().xpay(p, r, beta)
    else:
        torch.ops.unlearn_fast.solver_xpay(p, r, beta)


# Fake (meta) kernels of the compiled ops, for torch.compile and torch.library.opcheck.
if has_kernel(_OP, "CPU") or has_kernel(_OP, "CUDA"):

    @torch.library.register_fake("unlearn_fast::solver_cg_update")
    def _fake_cg_update(x, r, p, q, alpha):
        return x.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("unlearn_fast::solver_damped_dots")
    def _fake_damped_dots(q, p, r, damping):
        return q.new_empty(2, dtype=torch.float64)

    @torch.library.register_fake("unlearn_fast::solver_xpay")
    def _fake_xpay(p, r, beta):
        return None
