"""Fused token log-probabilities: log p(label) and log-sum-exp from hidden states and the LM head.

Every objective and metric of the library scores tokens through this op. From hidden states
X [T,H], the LM-head weight W [V,H] (and optional bias b [V]) and labels [T], it returns per
token ``logp = log softmax(X W^T + b)[label]`` and ``lse = logsumexp(X W^T + b)``, with
gradients to X, W and b, without holding the [T,V] logits: tokens go through in chunks sized
for the device (unlearn_fast/ops/chunking.py). Gradients are formed only for the inputs that
require them: a frozen head (LoRA) costs no [V,H] weight gradient.

Four implementations, one contract (see unlearn_fast/backend.py for the dispatch rule):
``reference_token_logprobs`` (plain PyTorch, the spec), the C++ CPU and CUDA kernels of
csrc/ (``torch.ops.unlearn_fast.*``), and Triton row kernels (kernels/token_logprobs.py)
around cuBLAS matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from unlearn_fast.backend import has_kernel, select_backend
from unlearn_fast.data import IGNORE_INDEX
from unlearn_fast.ops.chunking import rows_per_chunk

_OP = "token_logprobs"


class TokenLogProbs(NamedTuple):
    logp: torch.Tensor  # log p(label) per token; 0 where the label is ignore_index
    lse: torch.Tensor  # log-sum-exp of the logits per token


class TokenLogProbSum(NamedTuple):
    total: torch.Tensor  # sum_t weight_t * logp_t, differentiable
    logp: torch.Tensor  # per-token log p(label), detached
    lse: torch.Tensor  # per-token log-sum-exp, detached


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_token_logprobs(hidden, weight, labels, bias=None, ignore_index: int = IGNORE_INDEX) -> TokenLogProbs:
    """The specification: materialises the logits. Inputs as for the flattened op."""
    logits = F.linear(hidden, weight, bias).to(_acc_dtype(hidden.dtype))
    lse = torch.logsumexp(logits, dim=-1)
    ignored = labels == ignore_index
    target = logits.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return TokenLogProbs(torch.where(ignored, torch.zeros_like(lse), target - lse), lse)


# ---------------------------------------------------------------------------------------------
# Backends. Each offers forward / backward / fused_grad with the signatures of the C++ schemas:
# chunk_rows > 0 tokens per chunk; output_mask says which of (grad_hidden, grad_weight, grad_bias)
# to compute, the others come back empty.


class _Compiled:
    """The C++ (CPU) and CUDA kernels: one set of ops, the dispatcher picks by device."""

    @staticmethod
    def forward(hidden, weight, bias, labels, ignore_index, chunk_rows):
        return torch.ops.unlearn_fast.token_logprobs(hidden, weight, bias, labels, ignore_index, chunk_rows)

    @staticmethod
    def backward(grad_logp, grad_lse, hidden, weight, bias, labels, lse, ignore_index, chunk_rows, output_mask):
        return torch.ops.unlearn_fast.token_logprobs_backward(
            grad_logp, grad_lse, hidden, weight, bias, labels, lse, ignore_index, chunk_rows, output_mask
        )

    @staticmethod
    def fused_grad(hidden, weight, bias, labels, grad_logp, ignore_index, chunk_rows, output_mask):
        return torch.ops.unlearn_fast.token_logprobs_fused_grad(
            hidden, weight, bias, labels, grad_logp, ignore_index, chunk_rows, output_mask
        )


class _Triton:
    """Triton row kernels inside the same chunked loop as the C++ driver."""

    @staticmethod
    def _chunks(hidden, weight, rows):
        tokens = hidden.shape[0]
        buffer = hidden.new_empty(min(rows, tokens), weight.shape[0])
        for start in range(0, tokens, rows):
            n = min(rows, tokens - start)
            yield slice(start, start + n), buffer[:n]

    @staticmethod
    def _logits(out, x, weight, bias):
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)

    @classmethod
    def forward(cls, hidden, weight, bias, labels, ignore_index, chunk_rows):
        from unlearn_fast.kernels import token_logprobs as k

        acc = _acc_dtype(hidden.dtype)
        logp = hidden.new_empty(hidden.shape[0], dtype=acc)
        lse = torch.empty_like(logp)
        for rows, logits in cls._chunks(hidden, weight, chunk_rows):
            cls._logits(logits, hidden[rows], weight, bias)
            k.row_forward(logits, labels[rows], ignore_index, logp[rows], lse[rows])
        return logp, lse

    @classmethod
    def _gradients(cls, hidden, weight, bias, labels, ignore_index, chunk_rows, grad_logp, grad_lse, lse, output_mask):
        from unlearn_fast.kernels import token_logprobs as k

        acc = _acc_dtype(hidden.dtype)
        compute_lse = lse is None
        logp = hidden.new_empty(hidden.shape[0], dtype=acc) if compute_lse else hidden.new_empty(0, dtype=acc)
        lse = torch.empty_like(logp) if compute_lse else lse.to(acc).contiguous()
        grad_logp = grad_logp.to(acc).contiguous()
        grad_lse = None if grad_lse is None else grad_lse.to(acc).contiguous()
        exact = hidden.dtype in (torch.float32, torch.float64)  # else accumulate dW in float32
        need_hidden, need_weight, need_bias = output_mask[0], output_mask[1], output_mask[2] and bias is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
        grad_weight = (
            torch.zeros_like(weight, dtype=weight.dtype if exact else acc) if need_weight else hidden.new_empty(0)
        )
        grad_bias = hidden.new_zeros(weight.shape[0], dtype=acc) if need_bias else hidden.new_empty(0)
        for rows, dlogits in cls._chunks(hidden, weight, chunk_rows):
            x = hidden[rows]
            cls._logits(dlogits, x, weight, bias)
            k.row_grad(
                dlogits,
                labels[rows],
                ignore_index,
                grad_logp[rows],
                None if grad_lse is None else grad_lse[rows],
                lse[rows],
                logp[rows] if compute_lse else None,
                compute_lse,
            )
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[rows])
            if need_weight and exact:
                grad_weight.addmm_(dlogits.t(), x)
            elif need_weight:
                grad_weight += dlogits.t() @ x
            if need_bias:
                grad_bias += dlogits.sum(0, dtype=acc)
        grad_bias = grad_bias.to(bias.dtype) if need_bias else grad_bias
        return logp, lse, grad_hidden, grad_weight.to(weight.dtype), grad_bias

    @classmethod
    def backward(cls, grad_logp, grad_lse, hidden, weight, bias, labels, lse, ignore_index, chunk_rows, output_mask):
        args = (hidden, weight, bias, labels, ignore_index, chunk_rows, grad_logp, grad_lse, lse, output_mask)
        return cls._gradients(*args)[2:]

    @classmethod
    def fused_grad(cls, hidden, weight, bias, labels, grad_logp, ignore_index, chunk_rows, output_mask):
        args = (hidden, weight, bias, labels, ignore_index, chunk_rows, grad_logp, None, None, output_mask)
        return cls._gradients(*args)


_IMPLS = {"cpp": _Compiled, "cuda": _Compiled, "triton": _Triton}


# ---------------------------------------------------------------------------------------------
# Autograd.


class _TokenLogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, impl, ignore_index, chunk_rows):
        logp, lse = impl.forward(hidden, weight, bias, labels, ignore_index, chunk_rows)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.impl, ctx.ignore_index, ctx.chunk_rows = impl, ignore_index, chunk_rows
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.contiguous()
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
        mask = list(ctx.needs_input_grad[:3])  # a frozen head: no weight gradient is computed at all
        grads = ctx.impl.backward(
            grad_logp, grad_lse, hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.chunk_rows, mask
        )
        return *(g if need else None for g, need in zip(grads, mask)), None, None, None, None


class _TokenLogProbSumFunction(torch.autograd.Function):
    """sum_t w_t logp_t with its gradient formed in the forward pass (one matmul fewer)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, impl, ignore_index, chunk_rows):
        mask = list(ctx.needs_input_grad[:3])  # a frozen head: no weight gradient is computed at all
        logp, lse, *grads = impl.fused_grad(hidden, weight, bias, labels, token_weights, ignore_index, chunk_rows, mask)
        ctx.save_for_backward(*(g if need else None for g, need in zip(grads, mask)), logp)
        ctx.mark_non_differentiable(logp, lse)
        return (token_weights * logp).sum(), logp, lse

    @staticmethod
    def backward(ctx, grad_total, _grad_logp, _grad_lse):
        *grads, logp = ctx.saved_tensors
        if not bool(grad_total == 1):  # a loss's own backward passes 1: no [V,H] copy then
            grads = [None if g is None else g * grad_total.to(g.dtype) for g in grads]
        return *grads, None, logp * grad_total, None, None, None


# ---------------------------------------------------------------------------------------------
# Public functions.


def _flatten(hidden, weight, labels, bias, ignore_index):
    """Check user inputs and flatten [..., H] / [...] to the op's [T, H] / [T].

    The one place for the checks of every backend: the Triton kernels index by label without a
    bounds check (an out-of-range label would read past the logits row).
    """
    if not (torch.is_tensor(hidden) and torch.is_tensor(weight) and torch.is_tensor(labels)):
        raise TypeError("token_logprobs: hidden, weight and labels must be tensors")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"token_logprobs: hidden ({hidden.device}), weight ({weight.device}), labels ({labels.device})"
            f"{'' if bias is None else f' and bias ({bias.device})'} must be on one device"
        )
    if weight.dim() != 2:
        raise ValueError(f"token_logprobs: weight must be [vocab, hidden_size], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("token_logprobs: the vocabulary is empty (weight has 0 rows)")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs: hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logprobs: labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"token_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a float dtype")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token_logprobs: labels must be an integer tensor, got {labels.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"token_logprobs: bias must be [{weight.shape[0]}] of dtype {weight.dtype}")
    vocab = weight.shape[0]
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):
        raise ValueError(
            f"token_logprobs: labels must lie in [0, {vocab}) (weight's vocabulary) or equal "
            f"ignore_index={ignore_index}; got {labels[outside][:5].tolist()}. Does the tokenizer "
            "match the model?"
        )
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), labels.reshape(-1).long().contiguous()


def _chunk_rows(hidden, weight, requested):
    """Tokens per chunk: a chunk holds [rows, V] logits in the input dtype."""
    return rows_per_chunk(hidden.device, hidden.shape[0], weight.shape[0] * hidden.element_size(), requested)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = 0,
) -> TokenLogProbs:
    """Per-token log p(label) and log-sum-exp of ``hidden @ weight.T + bias``, shaped like labels.

    ``hidden`` is [..., H], ``labels`` [...] (``ignore_index`` marks tokens to skip: their logp is
    0 and gets no gradient). Labels are *not* shifted: pass the hidden state that predicts each
    label. ``chunk_rows`` overrides the number of tokens per chunk (0: sized for the device, see
    :func:`unlearn_fast.ops.chunking.rows_per_chunk`).
    Outputs are float32 (float64 for float64 inputs); gradients flow to hidden, weight and bias.
    """
    flat_hidden, flat_labels = _flatten(hidden, weight, labels, bias, ignore_index)
    backend = select_backend(_OP, hidden.device)
    if backend == "reference":
        logp, lse = reference_token_logprobs(flat_hidden, weight, flat_labels, bias, ignore_index)
    else:
        rows = _chunk_rows(flat_hidden, weight, chunk_rows)
        logp, lse = _TokenLogProbsFunction.apply(
            flat_hidden, weight.contiguous(), bias, flat_labels, _IMPLS[backend], ignore_index, rows
        )
    return TokenLogProbs(logp.view(labels.shape), lse.view(labels.shape))


def token_logprob_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = 0,
) -> TokenLogProbSum:
    """``sum_t token_weights_t * logp_t``, the form of every likelihood loss (mean cross-entropy is
    ``token_weights = -1/n_tokens``), with the gradient computed during the forward pass.

    Knowing the upstream gradient of each logp up front saves recomputing the logits in the
    backward pass (three matmuls instead of four). Use :func:`token_logprobs` when the loss is
    not linear in the log-probs.
    """
    flat_hidden, flat_labels = _flatten(hidden, weight, labels, bias, ignore_index)
    if token_weights.shape != labels.shape:
        raise ValueError(
            f"token_logprob_sum: token_weights {tuple(token_weights.shape)} must match labels {tuple(labels.shape)}"
        )
    flat_weights = token_weights.reshape(-1).to(_acc_dtype(hidden.dtype)).contiguous()
    backend = select_backend(_OP, hidden.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias, token_weights)
    )
    if backend == "reference":
        logp, lse = reference_token_logprobs(flat_hidden, weight, flat_labels, bias, ignore_index)
        total = (flat_weights * logp).sum()
    elif needs_grad:
        rows = _chunk_rows(flat_hidden, weight, chunk_rows)
        total, logp, lse = _TokenLogProbSumFunction.apply(
            flat_hidden, weight.contiguous(), bias, flat_labels, flat_weights, _IMPLS[backend], ignore_index, rows
        )
    else:
        rows = _chunk_rows(flat_hidden, weight, chunk_rows)
        logp, lse = _IMPLS[backend].forward(flat_hidden, weight.contiguous(), bias, flat_labels, ignore_index, rows)
        total = (flat_weights * logp).sum()
    return TokenLogProbSum(total, logp.detach().view(labels.shape), lse.detach().view(labels.shape))


_SAMPLE_CHUNK_BYTES = 32 << 20  # the float64 [rows, V] probabilities of one chunk of sample_labels


@torch.no_grad()
def sample_labels(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    uniforms: torch.Tensor,
    *,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Labels drawn from softmax(hidden @ weight.T + bias) by inverse CDF, one uniform per token.

    ``hidden`` [T, H], ``uniforms`` [T] in [0, 1) (float64 for an exact draw); returns int64 [T].
    Token t gets the first v with cdf_t[v] > u_t, the cdf summed in float64 (clamped to V - 1 where
    rounding leaves cdf_t[V-1] <= u_t): exactly ``torch.searchsorted(softmax(logits.double()).cumsum(-1),
    u, right=True).clamp(max=V-1)``, but tokens go through in chunks whose float64 [rows, V]
    probabilities fit 32 MiB (``chunk_rows`` overrides), instead of all [T, V] at once (12 GB at
    4096 tokens and a 128k vocabulary). Not differentiable: the labels are a sample.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"sample_labels: hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if uniforms.shape != hidden.shape[:1]:
        raise ValueError(
            f"sample_labels: uniforms must be [{hidden.shape[0]}] (one per token), got {tuple(uniforms.shape)}"
        )
    tokens, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows if chunk_rows > 0 else max(1, _SAMPLE_CHUNK_BYTES // (8 * vocab))
    uniforms = uniforms.to(device=hidden.device, dtype=torch.float64)
    labels = torch.empty(tokens, dtype=torch.long, device=hidden.device)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        cdf = torch.softmax(F.linear(hidden[start:stop], weight, bias).double(), -1).cumsum_(-1)
        torch.searchsorted(cdf, uniforms[start:stop, None], right=True, out=labels[start:stop, None])
    return labels.clamp_(max=vocab - 1)  # a uniform above a rounded-down cdf[-1]


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels of the compiled ops, for torch.compile and torch.library.opcheck.

if has_kernel(_OP, "CPU") or has_kernel(_OP, "CUDA"):

    @torch.library.register_fake("unlearn_fast::token_logprobs")
    def _fake_forward(hidden, weight, bias, labels, ignore_index, chunk_rows):
        acc = _acc_dtype(hidden.dtype)
        return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)

    @torch.library.register_fake("unlearn_fast::token_logprobs_backward")
    def _fake_backward(grad_logp, grad_lse, hidden, weight, bias, labels, lse, ignore_index, chunk_rows, output_mask):
        return _fake_grads(hidden, weight, bias, output_mask)

    @torch.library.register_fake("unlearn_fast::token_logprobs_fused_grad")
    def _fake_fused_grad(hidden, weight, bias, labels, grad_logp, ignore_index, chunk_rows, output_mask):
        logp = hidden.new_empty(hidden.shape[0], dtype=_acc_dtype(hidden.dtype))
        return logp, torch.empty_like(logp), *_fake_grads(hidden, weight, bias, output_mask)

    def _fake_grads(hidden, weight, bias, output_mask):
        return (
            torch.empty_like(hidden) if output_mask[0] else hidden.new_empty(0),
            torch.empty_like(weight) if output_mask[1] else hidden.new_empty(0),
            torch.empty_like(bias) if output_mask[2] and bias is not None else hidden.new_empty(0),
        )
