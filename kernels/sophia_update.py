"""Triton kernel of the fused Sophia update (the twin of csrc/common/sophia_update.h).

One launch for a whole tensor list, driven by one int64 buffer (one small host-to-device copy per
step): the step constants (float64 bit patterns, cast to the accumulation type in the kernel as the
C++ kernels do: plain float arguments would be float32) and a tensor table (rows ``[param, grad,
exp_avg, hessian, numel]``, the addresses cast back to typed pointers inside the kernel); and a
chunk table (rows ``[tensor, start]``, one program per chunk), built once per list of tensor sizes
and kept on the device. Values are converted to the accumulation type before any arithmetic (the
interpreter computes bfloat16 arithmetic wrongly).

Launch: one fixed configuration (``LAUNCH``), not autotuned: the kernel updates memory reached through the
pointer table, which autotuning's timed runs could not restore. 1024 elements per program over 4 warps keeps
its six live vectors in registers on sm_90 (4096 spilled 936 bytes per thread).
"""

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET, launch

LAUNCH = launch(gpu=dict(BLOCK=1024, num_warps=4), interpreter=dict(BLOCK=4096))
CHUNK = LAUNCH["BLOCK"]  # elements per program

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _sophia_kernel(
    buffer,
    chunk_table,
    HESSIAN_FROM_GRAD: tl.constexpr,
    SOUL_REFERENCE: tl.constexpr,
    P_DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    N_CONSTS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    consts = buffer.to(tl.pointer_type(tl.float64), bitcast=True)
    tensor_table = buffer + N_CONSTS
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_table + 2 * c)
    start = tl.multiple_of(tl.load(chunk_table + 2 * c + 1), BLOCK)
    row = tensor_table + 5 * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(ACC))
    h_ptr = tl.load(row + 3).to(tl.pointer_type(ACC))
    numel = tl.load(row + 4)
    if ALIGNED:  # every address 16-byte aligned and every numel a multiple of 16 (checked by the launcher)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        h_ptr = tl.multiple_of(h_ptr, 16)
        numel = tl.multiple_of(numel, 16)
    # consts: lr, beta1, 1 - beta1, beta2, 1 - beta2, rho * bs, 1 - lr * wd, eps, grad sign
    lr = tl.load(consts).to(ACC)
    beta1 = tl.load(consts + 1).to(ACC)
    one_minus_beta1 = tl.load(consts + 2).to(ACC)
    beta2 = tl.load(consts + 3).to(ACC)
    one_minus_beta2 = tl.load(consts + 4).to(ACC)
    rho_bs = tl.load(consts + 5).to(ACC)
    decay = tl.load(consts + 6).to(ACC)
    eps = tl.load(consts + 7).to(ACC)
    grad_sign = tl.load(consts + 8).to(ACC)

    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * grad_sign
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    if HESSIAN_FROM_GRAD:
        h = beta2 * h + one_minus_beta2 * (g * g)
        tl.store(h_ptr + offs, h, mask=mask)
    m = beta1 * m + one_minus_beta1 * g
    p = p * decay
    curvature = rho_bs * h
    if SOUL_REFERENCE:
        m = beta1 * m + one_minus_beta1 * g
        denom = curvature + eps
    else:
        denom = tl.where(curvature < eps, eps, curvature)  # NaN passes through, as in sophia_update.h
    ratio = tl.abs(m) / denom
    ratio = tl.where(ratio > 1.0, 1.0, ratio)
    sign = (m > 0).to(ACC) - (m < 0).to(ACC)
    p = p - lr * sign * ratio
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def sophia_update(
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
    """One Sophia step over the lists in one launch (inputs checked by the caller)."""
    numels = tuple(p.numel() for p in params)
    if not sum(numels):
        return
    device = params[0].device
    if device.type != "cpu" and INTERPRET:
        # The interpreter copies tensor arguments to the host, but not the memory the table points to.
        raise RuntimeError("sophia_update: the Triton interpreter runs on CPU tensors only (unset TRITON_INTERPRET)")
    acc = exp_avgs[0].dtype
    consts = torch.tensor(
        [lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, rho * bs, 1.0 - lr * weight_decay, eps, -1.0 if maximize else 1.0],
        dtype=torch.float64,
    ).view(torch.int64)
    tensor_table = torch.tensor(
        [
            [p.data_ptr(), g.data_ptr(), m.data_ptr(), h.data_ptr(), p.numel()]
            for p, g, m, h in zip(params, grads, exp_avgs, hessians)
        ],
        dtype=torch.int64,
    )
    # The table's addresses are unknown to the compiler: it can vectorise the loads only when told they align.
    aligned = bool((tensor_table[:, :4] % 16 == 0).all() and (tensor_table[:, 4] % 16 == 0).all())
    buffer = torch.cat([consts, tensor_table.view(-1)])
    if device.type != "cpu":
        buffer = buffer.pin_memory().to(device, non_blocking=True)
    chunks = chunk_table(numels, CHUNK, device)
    _sophia_kernel[(chunks.shape[0],)](
        buffer,
        chunks,
        HESSIAN_FROM_GRAD=hessian_from_grad,
        SOUL_REFERENCE=soul_reference,
        P_DTYPE=_TL_DTYPES[params[0].dtype],
        ACC=_TL_DTYPES[acc],
        N_CONSTS=consts.numel(),
        ALIGNED=aligned,
        **LAUNCH,
    )


@functools.lru_cache(maxsize=16)
def chunk_table(numels: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """Rows ``[tensor, start]``, one per ``block`` elements of each tensor, on ``device``. Cached: an optimizer
    steps the same tensor sizes every step, and a model's table has one row per 1024 parameters."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    start = (torch.arange(tensor.numel()) - first) * block
    return torch.stack([tensor, start], dim=1).contiguous().to(device)
