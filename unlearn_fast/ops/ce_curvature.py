"""Fused softmax cross-entropy curvature products at the LM head, for K probes at once.

The Gauss-Newton Hessian of a token-weighted cross-entropy ``sum_t w_t CE(X_t W^T + b, y_t)``
with respect to the logits is block-diagonal, ``w_t (diag(p_t) - p_t p_t^T)`` per token, and does
not depend on the labels. Given hidden states X [T,H], the head W [V,H] (bias b [V]) and K
directions on the head's inputs (dX [K,T,H], dW [K,V,H], db [K,V]), this op forms the logit
tangents ``u_k = dX_k W^T + X dW_k^T + db_k``, the curvature product
``r_k = w (p*u_k - p (p^T u_k))`` and its back-projections ``r_k W`` [K,T,H], ``r_k^T X`` [K,V,H]
and ``sum_t r_k`` [K,V]: the J^T H J half of a Gauss-Newton product, where J maps parameters to
logits (see :func:`unlearn_fast.hvp.hvp` with ``curvature="gauss_newton"``).

Tokens go through in chunks of K+1 logit-sized rows per token, sized for the device
(unlearn_fast/ops/chunking.py), so no [T,V] tensor exists for any probe. The op has no autograd (its outputs are products, not
losses): it runs on detached inputs.

Four implementations, one contract (see unlearn_fast/backend.py for the dispatch rule):
``reference_ce_curvature`` (plain PyTorch, the spec), the C++ CPU and CUDA kernels of csrc/
(``torch.ops.unlearn_fast.ce_curvature``), and Triton row kernels (kernels/ce_curvature.py)
around cuBLAS matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from unlearn_fast.backend import has_kernel, select_backend
from unlearn_fast.data import IGNORE_INDEX
from unlearn_fast.ops.chunking import rows_per_chunk

_OP = "ce_curvature"


class CurvatureProduct(NamedTuple):
    hidden: torch.Tensor | None  # r W, [K, ..., H] (None unless asked for)
    weight: torch.Tensor | None  # r^T X, [K, V, H]
    bias: torch.Tensor | None  # sum over tokens of r, [K, V]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_ce_curvature(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_weights: torch.Tensor,
    tangent_hidden: torch.Tensor | None = None,
    tangent_weight: torch.Tensor | None = None,
    tangent_bias: torch.Tensor | None = None,
) -> CurvatureProduct:
    """The specification on flattened inputs: materialises [K,T,V] in the accumulation dtype."""
    acc = _acc_dtype(hidden.dtype)
    x, w = hidden.to(acc), weight.to(acc)
    p = torch.softmax(F.linear(x, w, None if bias is None else bias.to(acc)), dim=-1)
    u = torch.zeros(1, dtype=acc, device=hidden.device)
    if tangent_hidden is not None:
        u = u + tangent_hidden.to(acc) @ w.t()
    if tangent_weight is not None:
        u = u + x @ tangent_weight.to(acc).transpose(1, 2)
    if tangent_bias is not None:
        u = u + tangent_bias.to(acc)[:, None, :]
    # A token of weight 0 (ignored) contributes exact zeros, whatever its tangents (even NaN).
    weights = token_weights.to(acc)[:, None]
    r = torch.where(weights == 0, 0.0, weights * (p * u - p * (p * u).sum(-1, keepdim=True)))
    dtype = hidden.dtype
    return CurvatureProduct((r @ w).to(dtype), (r.transpose(1, 2) @ x).to(dtype), r.sum(1).to(dtype))


# ---------------------------------------------------------------------------------------------
# Backends, with the signature of the C++ schema.


def _compiled(*args):
    return torch.ops.unlearn_fast.ce_curvature(*args)


def _triton(
    hidden,
    weight,
    bias,
    token_weights,
    tangent_hidden,
    tangent_weight,
    tangent_bias,
    need_hidden,
    need_weight,
    need_bias,
    chunk_rows,
):
    """Triton row kernels inside the chunked loop of csrc/common/ce_curvature_driver.h."""
    from unlearn_fast.kernels import ce_curvature as k

    probes = next(t.shape[0] for t in (tangent_hidden, tangent_weight, tangent_bias) if t is not None)
    (tokens, width), vocab = hidden.shape, weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    w_tok = token_weights.to(acc).contiguous()
    exact = hidden.dtype in (torch.float32, torch.float64)  # else accumulate r^T X in float32
    out_hidden = hidden.new_empty(probes, tokens, width) if need_hidden else hidden.new_empty(0)
    out_weight = hidden.new_zeros(probes, vocab, width, dtype=hidden.dtype if exact else acc) if need_weight else None
    out_bias = hidden.new_zeros(probes, vocab, dtype=acc) if need_bias else None

    rows = chunk_rows  # > 0, from rows_per_chunk
    max_rows = min(rows, tokens)
    logits_buffer = hidden.new_empty(max_rows, vocab)
    tangent_buffer = hidden.new_empty(probes * max_rows * vocab)
    for start in range(0, tokens if probes > 0 else 0, rows):
        n = min(rows, tokens - start)
        x = hidden[start : start + n]
        logits = logits_buffer[:n]
        if bias is None:
            torch.mm(x, weight.t(), out=logits)
        else:
            torch.addmm(bias, x, weight.t(), out=logits)
        u_flat = tangent_buffer[: probes * n * vocab].view(probes * n, vocab)
        u = u_flat.view(probes, n, vocab)
        if tangent_hidden is not None:
            torch.mm(tangent_hidden[:, start : start + n].reshape(probes * n, width), weight.t(), out=u_flat)
        else:
            u.zero_()
        if tangent_weight is not None:
            for i in range(probes):
                u[i].addmm_(x, tangent_weight[i].t())
        if tangent_bias is not None:
            u += tangent_bias[:, None, :]
        k.row_curvature(logits, u, w_tok[start : start + n])
        if need_hidden:
            out_hidden[:, start : start + n] = (u_flat @ weight).view(probes, n, width)
        if need_weight:
            for i in range(probes):
                if exact:
                    out_weight[i].addmm_(u[i].t(), x)
                else:
                    out_weight[i] += u[i].t() @ x
        if need_bias:
            out_bias += u.sum(1, dtype=acc)
    empty = hidden.new_empty(0)
    return (
        out_hidden,
        out_weight.to(hidden.dtype) if need_weight else empty,
        out_bias.to(hidden.dtype) if need_bias else empty,
    )


_IMPLS = {"cpp": _compiled, "cuda": _compiled, "triton": _triton}


# ---------------------------------------------------------------------------------------------
# Public function.


def _check_tangent(
    name: str, t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
        raise ValueError(f"ce_curvature: {name} must be [probes, {', '.join(map(str, shape))}], got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"ce_curvature: {name} must be {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    return t.detach()


def ce_curvature(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tangent_hidden: torch.Tensor | None = None,
    tangent_weight: torch.Tensor | None = None,
    tangent_bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    need_hidden: bool = True,
    need_weight: bool = False,
    need_bias: bool = False,
    chunk_rows: int = 0,
) -> CurvatureProduct:
    """Gauss-Newton curvature products of a token-weighted softmax cross-entropy for K probes.

    ``hidden`` is [..., H] and ``weight`` [V, H]; the tangents are ``tangent_hidden`` [K, ..., H],
    ``tangent_weight`` [K, V, H] and ``tangent_bias`` [K, V] (at least one; missing ones are 0).
    Token weights: ``token_weights`` [...] if given, else a mean over the tokens whose ``labels``
    [...] are not ``ignore_index`` (over all tokens without labels). Returns the products asked for
    with ``need_*`` (others None); ``chunk_rows`` overrides the tokens per chunk (0: sized for the
    device, see :func:`unlearn_fast.ops.chunking.rows_per_chunk`).
    """
    if weight.dim() != 2 or hidden.shape[-1:] != weight.shape[1:]:
        raise ValueError(
            f"ce_curvature: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [..., H] and [V, H]"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype or weight.device != hidden.device:
        raise TypeError(
            f"ce_curvature: hidden ({hidden.dtype} on {hidden.device}) and weight ({weight.dtype} on "
            f"{weight.device}) must share a float dtype and a device"
        )
    if weight.shape[0] == 0:
        raise ValueError("ce_curvature: the vocabulary is empty (weight has 0 rows)")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"ce_curvature: bias must be [{weight.shape[0]}] of dtype {weight.dtype}")
    lead = hidden.shape[:-1]
    tokens, width, vocab = lead.numel(), weight.shape[1], weight.shape[0]
    tangent_hidden = _check_tangent("tangent_hidden", tangent_hidden, (*lead, width), hidden)
    tangent_weight = _check_tangent("tangent_weight", tangent_weight, (vocab, width), hidden)
    tangent_bias = _check_tangent("tangent_bias", tangent_bias, (vocab,), hidden)
    given = [t for t in (tangent_hidden, tangent_weight, tangent_bias) if t is not None]
    if not given:
        raise ValueError("ce_curvature: give at least one of tangent_hidden, tangent_weight, tangent_bias")
    probes = given[0].shape[0]
    if any(t.shape[0] != probes for t in given):
        raise ValueError(f"ce_curvature: the tangents disagree on the number of probes: {[t.shape[0] for t in given]}")

    acc = _acc_dtype(hidden.dtype)
    if token_weights is None:
        if labels is not None and labels.shape != lead:
            raise ValueError(
                f"ce_curvature: labels {tuple(labels.shape)} must match hidden's leading dims {tuple(lead)}"
            )
        valid = torch.ones(lead, dtype=torch.bool, device=hidden.device) if labels is None else labels != ignore_index
        token_weights = valid.to(acc) / valid.sum().clamp(min=1).to(acc)
    elif token_weights.shape != lead:
        raise ValueError(
            f"ce_curvature: token_weights {tuple(token_weights.shape)} must match hidden's leading dims {tuple(lead)}"
        )

    x = hidden.detach().reshape(tokens, width)
    th = None if tangent_hidden is None else tangent_hidden.reshape(probes, tokens, width)
    w_tok = token_weights.detach().reshape(tokens).to(acc)
    b = None if bias is None else bias.detach()
    backend = select_backend(_OP, hidden.device)
    if backend == "reference":
        out = reference_ce_curvature(x, weight.detach(), b, w_tok, th, tangent_weight, tangent_bias)
    else:
        rows = rows_per_chunk(hidden.device, tokens, (probes + 1) * vocab * hidden.element_size(), chunk_rows)
        out = _IMPLS[backend](
            x.contiguous(),
            weight.detach().contiguous(),
            b,
            w_tok.contiguous(),
            th,
            tangent_weight,
            tangent_bias,
            need_hidden,
            need_weight,
            need_bias,
            rows,
        )
    return CurvatureProduct(
        out[0].view(probes, *lead, width) if need_hidden else None,
        out[1] if need_weight else None,
        out[2] if need_bias else None,
    )


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernel of the compiled op, for torch.compile and torch.library.opcheck.

if has_kernel(_OP, "CPU") or has_kernel(_OP, "CUDA"):

    @torch.library.register_fake("unlearn_fast::ce_curvature")
    def _fake(
        hidden,
        weight,
        bias,
        token_weights,
        tangent_hidden,
        tangent_weight,
        tangent_bias,
        need_hidden,
        need_weight,
        need_bias,
        chunk_rows,
    ):
        probes = next(t.shape[0] for t in (tangent_hidden, tangent_weight, tangent_bias) if t is not None)
        (tokens, width), vocab = hidden.shape, weight.shape[0]
        return (
            hidden.new_empty(probes, tokens, width) if need_hidden else hidden.new_empty(0),
            hidden.new_empty(probes, vocab, width) if need_weight else hidden.new_empty(0),
            hidden.new_empty(probes, vocab) if need_bias else hidden.new_empty(0),
        )
