"""Triton row kernels of the curvature product op (the twins of csrc/common/ce_curvature.h).

The matmuls around them stay with cuBLAS (see the chunked driver in
unlearn_fast/ops/ce_curvature.py); these kernels do the softmax math of one token's rows:
lse of its logits (one program per token), then for each probe s = p^T u and in place
u <- w * p * (u - s) (one program per token and probe, so that a chunk of few tokens still fills
the GPU). Values are loaded, then converted to the accumulation type before any arithmetic (the
Triton interpreter computes bfloat16 arithmetic wrongly).
"""

import torch
import triton
import triton.language as tl

from .token_logprobs import ROW_CONFIGS, _row_lse


@triton.autotune(configs=ROW_CONFIGS, key=["vocab"])
@triton.jit
def _lse_kernel(logits_ptr, lse_ptr, vocab, stride, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    tl.store(lse_ptr + r, _row_lse(logits_ptr + r * stride, vocab, BLOCK_V, ACC))


# Autotuned like the token log-prob rows; it overwrites its tangents, which autotuning restores between timed runs.
@triton.autotune(configs=ROW_CONFIGS, key=["vocab"], restore_value=["tangents_ptr"])
@triton.jit
def _curvature_kernel(
    logits_ptr,
    lse_ptr,
    weights_ptr,
    tangents_ptr,
    rows,
    vocab,
    stride,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    row_ptr = logits_ptr + r * stride
    u_ptr = tangents_ptr + (k * rows + r) * vocab
    lse = tl.load(lse_ptr + r).to(ACC)
    w = tl.load(weights_ptr + r).to(ACC)
    offs = tl.arange(0, BLOCK_V)
    partial = tl.zeros((BLOCK_V,), ACC)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        mask = idx < vocab
        p = tl.exp(tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(ACC) - lse)
        partial += p * tl.load(u_ptr + idx, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(partial, axis=0)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        mask = idx < vocab
        p = tl.exp(tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(ACC) - lse)
        u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(ACC)
        # An ignored token (weight 0) gets exact zeros, whatever its tangents (even NaN).
        out = tl.where(w == 0, 0.0, w * p * (u - mean))
        tl.store(u_ptr + idx, out.to(tangents_ptr.dtype.element_ty), mask=mask)


def row_curvature(logits: torch.Tensor, tangents: torch.Tensor, weights: torch.Tensor) -> None:
    """Overwrite the contiguous tangents [K, n, V] with w p (u - p^T u), p the softmax of logits [n, V]."""
    probes, rows, vocab = tangents.shape
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    lse = weights.new_empty(rows)
    _lse_kernel[(rows,)](logits, lse, vocab, logits.stride(0), ACC=acc)
    _curvature_kernel[(rows, probes)](
        logits,
        lse,
        weights,
        tangents,
        rows,
        vocab,
        logits.stride(0),
        ACC=acc,
    )
