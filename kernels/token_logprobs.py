"""Triton row kernels of the token log-prob op (the twins of csrc/common/token_logprobs.h).

One program per logit row. The matmuls around them stay with cuBLAS (see the chunked driver in
unlearn_fast/ops/token_logprobs.py); these kernels do the softmax math of one row:
lse = log sum exp(l), logp = l[y] - lse, and in place dl = (g_lse - g_logp) * p + g_logp * [v == y].
Values are loaded, then converted to the accumulation type before any arithmetic (the Triton
interpreter computes bfloat16 arithmetic wrongly).

Launch: autotuned on the vocabulary size (``ROW_CONFIGS``; a row's loads are contiguous, so they vectorise when
the row stride is a multiple of 16, as Triton's argument specialisation tells the compiler). The gradient kernel
overwrites its logits: autotuning restores them between timed runs (one extra copy of a chunk, once per size).
"""

import torch
import triton
import triton.language as tl

from . import autotune_configs

# GPU: 8-16 fp32 values per thread per load, no spills (docs/KERNELS.md); interpreter: one wide block per row.
ROW_CONFIGS = autotune_configs(
    gpu=[dict(BLOCK_V=1024, num_warps=4), dict(BLOCK_V=2048, num_warps=8), dict(BLOCK_V=4096, num_warps=8)],
    interpreter=dict(BLOCK_V=4096),
)


@triton.jit
def _row_lse(row_ptr, vocab, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    row_max = tl.full((), float("-inf"), ACC)
    row_sum = tl.zeros((), ACC)
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(row_ptr + start + offs, mask=start + offs < vocab, other=float("-inf")).to(ACC)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        # While every logit so far is -inf (masked entries), shift by 0: exp(-inf - -inf) is NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        row_max = new_max
    return row_max + tl.log(row_sum)


@triton.autotune(configs=ROW_CONFIGS, key=["vocab"])
@triton.jit
def _forward_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    vocab,
    stride,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + r * stride
    lse = _row_lse(row_ptr, vocab, BLOCK_V, ACC)
    label = tl.load(labels_ptr + r)
    ignored = label == ignore_index
    target = tl.load(row_ptr + tl.where(ignored, 0, label)).to(ACC)
    tl.store(lse_ptr + r, lse)
    tl.store(logp_ptr + r, tl.where(ignored, 0.0, target - lse))


@triton.autotune(configs=ROW_CONFIGS, key=["vocab"], restore_value=["logits_ptr"])
@triton.jit
def _grad_kernel(
    logits_ptr,
    labels_ptr,
    grad_logp_ptr,
    grad_lse_ptr,
    lse_ptr,
    logp_ptr,
    vocab,
    stride,
    ignore_index,
    HAS_GRAD_LSE: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + r * stride
    label = tl.load(labels_ptr + r)
    ignored = label == ignore_index
    if COMPUTE_LSE:
        lse = _row_lse(row_ptr, vocab, BLOCK_V, ACC)
        target = tl.load(row_ptr + tl.where(ignored, 0, label)).to(ACC)
        tl.store(lse_ptr + r, lse)
        tl.store(logp_ptr + r, tl.where(ignored, 0.0, target - lse))
    else:
        lse = tl.load(lse_ptr + r).to(ACC)
    g_logp = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + r).to(ACC))
    g_lse = tl.zeros((), ACC)
    if HAS_GRAD_LSE:
        g_lse = tl.load(grad_lse_ptr + r).to(ACC)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        mask = idx < vocab
        x = tl.load(row_ptr + idx, mask=mask, other=0.0).to(ACC)
        dlogit = (g_lse - g_logp) * tl.exp(x - lse) + tl.where(idx == label, g_logp, 0.0)
        tl.store(row_ptr + idx, dlogit.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_args(logits: torch.Tensor):
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    return (logits.shape[0],), logits.shape[1], acc


def row_forward(logits, labels, ignore_index, logp, lse):
    """Fill logp and lse of each logit row."""
    grid, vocab, acc = _launch_args(logits)
    _forward_kernel[grid](logits, labels, logp, lse, vocab, logits.stride(0), ignore_index, ACC=acc)


def row_grad(logits, labels, ignore_index, grad_logp, grad_lse, lse, logp, compute_lse):
    """Overwrite the logit rows with d(loss)/d(logits); compute lse and logp first if asked to."""
    grid, vocab, acc = _launch_args(logits)
    has_grad_lse = grad_lse is not None
    _grad_kernel[grid](
        logits,
        labels,
        grad_logp,
        grad_lse if has_grad_lse else grad_logp,
        lse,
        logp if compute_lse else lse,
        vocab,
        logits.stride(0),
        ignore_index,
        HAS_GRAD_LSE=has_grad_lse,
        COMPUTE_LSE=compute_lse,
        ACC=acc,
    )
