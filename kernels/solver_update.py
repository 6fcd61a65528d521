"""Triton kernels of the fused solver vector updates (the twins of csrc/common/solver_update.h).

One program per block of the flat vectors; each program of a reducing kernel writes its partial
dot products (float64) to a slot of its own, and the launcher sums the slots with one torch
reduction of fixed shape, so a result is reproducible for a given length. The scalar
coefficient comes in a one-element float64 tensor: a Python float argument would be passed to
the kernel as float32 and round the coefficient of a float64 update.

Launch: one fixed configuration (``LAUNCH``), not autotuned: the partial sums' order depends on the block and the
warps, and a timing race must not change the bits of a solve. These one-pass kernels are memory-bound: what
matters is 8 values per thread (two to four 128-bit loads, no spills, docs/KERNELS.md).
"""

import torch
import triton
import triton.language as tl

from . import launch

LAUNCH = launch(gpu=dict(BLOCK=1024, num_warps=4), interpreter=dict(BLOCK=4096))
BLOCK = LAUNCH["BLOCK"]  # elements per program


@triton.jit
def _cg_update_kernel(x_ptr, r_ptr, p_ptr, q_ptr, coef_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    alpha = tl.load(coef_ptr).to(x.dtype)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    x = x + alpha * p
    r = r - alpha * q
    tl.store(x_ptr + offs, x, mask=mask)
    tl.store(r_ptr + offs, r, mask=mask)
    r64 = r.to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(r64 * r64, axis=0))


@triton.jit
def _damped_dots_kernel(
    q_ptr,
    p_ptr,
    r_ptr,
    coef_ptr,
    partial_ptr,
    numel,
    n_programs,
    DAMP: tl.constexpr,
    HAS_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if DAMP:
        q = q + tl.load(coef_ptr).to(q.dtype) * p
        tl.store(q_ptr + offs, q, mask=mask)
    p64 = p.to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(p64 * q.to(tl.float64), axis=0))
    if HAS_R:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(partial_ptr + n_programs + pid, tl.sum(p64 * r, axis=0))


@triton.jit
def _xpay_kernel(p_ptr, r_ptr, coef_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    tl.store(p_ptr + offs, r + tl.load(coef_ptr).to(p.dtype) * p, mask=mask)


def _coef(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64).to(like.device, non_blocking=True)


def _programs(numel: int) -> int:
    return max(1, triton.cdiv(numel, BLOCK))


def cg_update(x, r, p, q, alpha: float) -> torch.Tensor:
    """x += alpha p; r -= alpha q; returns r.r as a float64 scalar (inputs checked by the caller)."""
    n = _programs(x.numel())
    partials = torch.empty(n, dtype=torch.float64, device=x.device)
    _cg_update_kernel[(n,)](x, r, p, q, _coef(alpha, x), partials, x.numel(), **LAUNCH)
    return partials.sum()


def damped_dots(q, p, r, damping: float) -> torch.Tensor:
    """q += damping p; returns [p.q, p.r] in float64 (p.r = 0 if r is None)."""
    n = _programs(q.numel())
    partials = torch.zeros(2, n, dtype=torch.float64, device=q.device)
    _damped_dots_kernel[(n,)](
        q,
        p,
        p if r is None else r,
        _coef(damping, q),
        partials,
        q.numel(),
        n,
        DAMP=damping != 0.0,
        HAS_R=r is not None,
        **LAUNCH,
    )
    return partials.sum(1)


def xpay(p, r, beta: float) -> None:
    """p = r + beta p."""
    if p.numel():
        _xpay_kernel[(_programs(p.numel()),)](p, r, _coef(beta, p), p.numel(), **LAUNCH)
