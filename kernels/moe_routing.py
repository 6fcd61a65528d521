"""Triton kernels of the fused expert-routing ops (the twin of csrc/common/moe_routing.h).

A program routes a block of rows ``[BLOCK_T, BLOCK_E]`` held in registers: scores, group mask and
top-k by iterative max with masking (ties to the lower index, as in the C++ and CUDA kernels).
The float constants (renorm_eps, scaling) travel as a float64 tensor and are cast to the
accumulation type in the kernel, as the C++ kernels cast their double arguments (a plain float
argument would be float32). Loads are converted to the accumulation type before any arithmetic
(the interpreter computes bfloat16 arithmetic wrongly). Inputs are checked by the caller
(unlearn_fast/ops/moe_routing.py).

Launch: fixed, not autotuned (the attribution's partial sums, one per program, must not change order with a
timing race): on a GPU about 2048 values (rows x padded experts) per program over 4 warps, which keeps the
DeepSeek-V3 routing (256 experts, unrolled group loops) out of local memory; 128 rows under the interpreter.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET, launch

LAUNCH = launch(gpu=dict(values=2048, num_warps=4), interpreter=dict(values=128 * 1024, num_warps=4))

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _route_block(
    x_ptr,
    bias_ptr,
    consts_ptr,
    row0,
    T,
    E,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Routes rows row0 .. row0 + BLOCK_T: (gates, scores, chosen mask, denominator, valid rows)."""
    rows = row0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=mask, other=0.0).to(ACC)
    neg_inf = float("-inf")
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        x = tl.where(col_ok[None, :], x, neg_inf)
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        s = ex / tl.sum(ex, axis=1)[:, None]
    s = tl.where(col_ok[None, :], s, 0.0)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    finite = (sel - sel) == 0.0
    valid = tl.sum(tl.where(col_ok[None, :] & ~finite, 1, 0), axis=1) == 0
    sel = tl.where(col_ok[None, :] & finite, sel, neg_inf)  # invalid rows end up NaN below

    if N_GROUP > 1:
        gid = cols // GROUP_SIZE  # padding columns get gid >= N_GROUP
        group_of_col = tl.full((BLOCK_T, BLOCK_E), neg_inf, ACC)
        for g in tl.static_range(N_GROUP):
            in_g = (gid == g)[None, :]
            v = tl.where(in_g, sel, neg_inf)
            top1 = tl.max(v, axis=1)
            if TOP2:
                first = tl.min(tl.where(in_g & (v == top1[:, None]), cols[None, :], BLOCK_E), axis=1)
                top2 = tl.max(tl.where(cols[None, :] == first[:, None], neg_inf, v), axis=1)
                score_g = top1 + top2
            else:
                score_g = top1
            group_of_col = tl.where(in_g, score_g[:, None], group_of_col)
        kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(kept | (gid >= N_GROUP)[None, :], neg_inf, group_of_col)
            best = tl.max(cand, axis=1)
            best_g = tl.min(tl.where(cand == best[:, None], gid[None, :], N_GROUP), axis=1)
            kept = kept | (gid[None, :] == best_g[:, None])
        sel = tl.where(kept, sel, neg_inf)

    chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    total = tl.zeros((BLOCK_T,), dtype=ACC)
    for _ in tl.static_range(TOP_K):
        best = tl.max(sel, axis=1)
        pick = tl.min(tl.where(sel == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick[:, None]
        total = total + tl.sum(tl.where(hit, s, 0.0), axis=1)  # in selection order, as in C++
        chosen = chosen | hit
        sel = tl.where(hit, neg_inf, sel)
    scaling = tl.load(consts_ptr + 1).to(ACC)
    if RENORM:
        denom = total + tl.load(consts_ptr).to(ACC)
        gates = tl.where(chosen, s / denom[:, None] * scaling, 0.0)
    else:
        denom = tl.full((BLOCK_T,), 1.0, ACC)
        gates = tl.where(chosen, s * scaling, 0.0)
    gates = tl.where(valid[:, None], gates, float("nan"))
    return gates, s, chosen, denom, valid


@triton.jit
def _attribution_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    consts_ptr,
    part_ptr,
    T,
    E,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = pid * BLOCK_T
    gates, s, chosen, denom, valid = _route_block(
        x_ptr,
        bias_ptr,
        consts_ptr,
        row0,
        T,
        E,
        TOP_K,
        SIGMOID,
        RENORM,
        N_GROUP,
        TOPK_GROUP,
        GROUP_SIZE,
        TOP2,
        HAS_BIAS,
        ACC,
        BLOCK_T,
        BLOCK_E,
    )
    rows = row0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    w = tl.load(w_ptr + rows, mask=rows < T, other=0.0).to(ACC)
    contrib = tl.where((rows < T)[:, None], w[:, None] * gates, 0.0)
    tl.store(part_ptr + pid.to(tl.int64) * E + cols, tl.sum(contrib, axis=0), mask=cols < E)


@triton.jit
def _residual_kernel(
    x_ptr,
    bias_ptr,
    consts_ptr,
    out_ptr,
    target,
    T,
    E,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_T
    gates, s, chosen, denom, valid = _route_block(
        x_ptr,
        bias_ptr,
        consts_ptr,
        row0,
        T,
        E,
        TOP_K,
        SIGMOID,
        RENORM,
        N_GROUP,
        TOPK_GROUP,
        GROUP_SIZE,
        TOP2,
        HAS_BIAS,
        ACC,
        BLOCK_T,
        BLOCK_E,
    )
    rows = row0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    d = gates - tl.where(cols == target, 1.0, 0.0)[None, :]
    residual = tl.sum(tl.where((cols < E)[None, :], d * d, 0.0), axis=1)
    tl.store(out_ptr + rows, residual, mask=rows < T)


@triton.jit
def _residual_backward_kernel(
    grad_ptr,
    x_ptr,
    bias_ptr,
    consts_ptr,
    dx_ptr,
    target,
    T,
    E,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_T
    gates, s, chosen, denom, valid = _route_block(
        x_ptr,
        bias_ptr,
        consts_ptr,
        row0,
        T,
        E,
        TOP_K,
        SIGMOID,
        RENORM,
        N_GROUP,
        TOPK_GROUP,
        GROUP_SIZE,
        TOP2,
        HAS_BIAS,
        ACC,
        BLOCK_T,
        BLOCK_E,
    )
    rows = row0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    grad = tl.load(grad_ptr + rows, mask=rows < T, other=0.0).to(ACC)
    # u = dL/dg on the chosen experts; q = dL/ds (see anchor_backward_row in moe_routing.h).
    u = tl.where(chosen, 2.0 * grad[:, None] * (gates - tl.where(cols == target, 1.0, 0.0)[None, :]), 0.0)
    scaling = tl.load(consts_ptr + 1).to(ACC)
    if RENORM:
        u_dot_s = tl.sum(u * s, axis=1)
        q = tl.where(chosen, scaling / denom[:, None] * (u - (u_dot_s / denom)[:, None]), 0.0)
    else:
        q = scaling * u
    if SIGMOID:
        dx = q * s * (1.0 - s)
    else:
        dx = s * (q - tl.sum(q * s, axis=1)[:, None])
    dx = tl.where(valid[:, None], dx, float("nan"))
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dx.to(OUT), mask=mask)


def block_shape(experts: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E): a program's rows and padded experts, about LAUNCH["values"] values, at most 128 rows."""
    block_e = triton.next_power_of_2(experts)
    return max(1, min(128, LAUNCH["values"] // block_e)), block_e


def _launch_args(logits, bias, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score):
    if logits.device.type != "cpu" and INTERPRET:
        raise RuntimeError("moe routing: the Triton interpreter runs on CPU tensors only (unset TRITON_INTERPRET)")
    T, E = logits.shape
    block_t, block_e = block_shape(E)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    consts = torch.tensor([renorm_eps, scaling], dtype=torch.float64, device=logits.device)
    meta = dict(
        TOP_K=top_k,
        SIGMOID=score == 1,
        RENORM=renormalize,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        GROUP_SIZE=E // n_group,
        TOP2=group_score == 1,
        HAS_BIAS=bias is not None,
        ACC=_TL_DTYPES[acc],
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=LAUNCH["num_warps"],
    )
    # A dummy pointer when there is no bias (never read: HAS_BIAS is a constexpr).
    bias_arg = bias if bias is not None else consts
    return T, E, acc, consts, bias_arg, triton.cdiv(max(T, 1), block_t), meta


def expert_attribution(logits, token_weights, bias, *routing) -> torch.Tensor:
    T, E, acc, consts, bias_arg, n_prog, meta = _launch_args(logits, bias, *routing)
    if T == 0:
        return torch.zeros(E, dtype=acc, device=logits.device)
    partials = torch.empty(n_prog, E, dtype=acc, device=logits.device)
    _attribution_kernel[(n_prog,)](logits, token_weights, bias_arg, consts, partials, T, E, **meta)
    return partials.sum(dim=0)  # one program's partial per block of rows, added in a fixed order


def anchor_residual(logits, bias, target, *routing) -> torch.Tensor:
    T, E, acc, consts, bias_arg, n_prog, meta = _launch_args(logits, bias, *routing)
    out = torch.empty(T, dtype=acc, device=logits.device)
    if T:
        _residual_kernel[(n_prog,)](logits, bias_arg, consts, out, target, T, E, **meta)
    return out


def anchor_residual_backward(grad_residual, logits, bias, target, *routing) -> torch.Tensor:
    T, E, acc, consts, bias_arg, n_prog, meta = _launch_args(logits, bias, *routing)
    dlogits = torch.empty_like(logits)
    if T:
        _residual_backward_kernel[(n_prog,)](
            grad_residual, logits, bias_arg, consts, dlogits, target, T, E, OUT=_TL_DTYPES[logits.dtype], **meta
        )
    return dlogits
