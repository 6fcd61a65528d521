"""Batched Hessian-vector products of a scalar loss with respect to a chosen parameter subset.

Everything here is functional: a loss is a function of the selected parameters only (a dict
name -> tensor, or a list), the rest of the model frozen inside it (:func:`make_loss_fn` builds one
for a transformers causal LM with ``torch.func.functional_call``). Directions come stacked, K per
parameter (``[K, *param.shape]``), and are pushed through in one batched pass, so the work that
does not depend on the direction (the forward pass, the gradient) is done once for all K.

Two curvatures (``curvature=``):

* ``"hessian"``: the exact Hessian H of the loss (indefinite in general). Differentiates the
  plain-torch loss, so the head holds [T,V] logit tangents per probe (``chunk_size`` bounds K).
* ``"gauss_newton"``: J^T H_l J, with J the Jacobian of the logits with respect to the parameters
  and H_l = w_t (diag(p_t) - p_t p_t^T) the Hessian of the cross-entropy at the logits; always
  PSD. Needs a :class:`SoftmaxCrossEntropy` loss. Computed as a JVP of the features (forward
  mode, or the double-VJP trick J v = d/dc <J^T c, v> under ``"double_backward"``), the fused
  curvature op at the LM head (:func:`unlearn_fast.ops.ce_curvature`, no [T,V] tensor per probe),
  then a VJP back to the parameters.

Two ways to differentiate twice (``method=``):

* ``"forward_over_reverse"``: ``vmap`` over K of ``jvp(grad(loss))``; stores no graph of the
  backward pass. Needs forward-mode AD of every op in the loss.
* ``"double_backward"``: ``autograd.grad`` with ``create_graph``, then one batched backward of
  the gradient (``is_grads_batched``) for the K directions. Needs double backward of every op.
* ``"auto"`` (the default) tries forward-over-reverse and falls back to double backward (with a
  warning) when an op has no forward-mode AD (e.g. ``torch._grouped_mm`` experts). On CPU, with
  functorch's per-op overhead, double backward can be the faster of the two for small models
  (bench/test_hvp.py): pass it explicitly then.

transformers models need eager attention for either: run inside
:func:`unlearn_fast.models.hvp_safe`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from unlearn_fast.data import IGNORE_INDEX
from unlearn_fast.models.causal_lm import logit_scale
from unlearn_fast.models.checks import check_token_ids
from unlearn_fast.ops.ce_curvature import ce_curvature

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]

HVP_METHODS = ("auto", "forward_over_reverse", "double_backward")
CURVATURES = ("hessian", "gauss_newton")
DISTRIBUTIONS = ("rademacher", "gaussian")

# Messages of the errors that mean "this op has no forward-mode AD" (the "auto" fallback).
_NO_FORWARD_AD = re.compile(r"forward AD|forward-mode|forward mode|jvp|setup_context|vmap support", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Losses.


@dataclass
class SoftmaxCrossEntropy:
    """``sum_t w_t CE(s (f_t W^T + b), y_t)`` as a function of the selected parameters.

    ``features(params)`` gives f [T,H] (the hidden states of the scored tokens). The head's
    ``weight`` [V,H] and ``bias`` [V] are each either the name of a selected parameter (then they
    are trained too, and may also be used inside ``features``, e.g. tied embeddings) or a frozen
    tensor. ``token_weights`` [T] are 1/n for a mean CE; ``logit_scale`` s is the constant some
    families multiply their logits by. Calling the object gives the loss, computed in plain torch
    (twice differentiable); the Gauss-Newton product uses its parts instead.
    """

    features: Callable[[Params], Tensor]
    weight: str | Tensor
    bias: str | Tensor | None
    labels: Tensor
    token_weights: Tensor
    logit_scale: float = 1.0

    def head(self, params: Params) -> tuple[Tensor, Tensor | None]:
        weight = params[self.weight] if isinstance(self.weight, str) else self.weight
        bias = params[self.bias] if isinstance(self.bias, str) else self.bias
        return weight, bias

    def __call__(self, params: Params) -> Tensor:
        weight, bias = self.head(params)
        logits = F.linear(self.features(params), weight, bias) * self.logit_scale
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ce = F.cross_entropy(logits.to(acc), self.labels, reduction="none", ignore_index=IGNORE_INDEX)
        return (ce * self.token_weights.to(acc)).sum()


def selected_params(model: nn.Module, names: Sequence[str] | None = None) -> Params:
    """Detached current values of the named parameters (default: those with ``requires_grad``)."""
    named = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"{type(model).__name__} has no parameters {missing}")
    if not names:
        raise ValueError("no parameters selected (none requires grad); pass param_names")
    return {n: named[n].detach() for n in names}


def make_loss_fn(
    model: nn.Module, batch: Mapping[str, Tensor], param_names: Sequence[str] | None = None
) -> tuple[SoftmaxCrossEntropy, Params]:
    """The mean cross-entropy of a causal LM's labelled tokens as a function of a parameter subset.

    ``batch`` holds ``input_ids``, ``labels`` (aligned with the inputs, -100 where not scored;
    position t predicts label t+1, as in :func:`unlearn_fast.models.causal_lm.sequence_logprobs`) and
    optionally ``attention_mask``. ``param_names`` are names of ``model.named_parameters()``
    (default: those with ``requires_grad``, i.e. the adapters of a PEFT model); the others stay
    frozen. Returns the loss and the selected parameters' current values. Only the decoder runs
    inside ``functional_call``: the LM head is applied to the scored positions only.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is model or not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__} needs a separate decoder and an nn.Linear LM head "
            f"(get_decoder() / get_output_embeddings()); got head {type(head).__name__}"
        )
    params = selected_params(model, param_names)
    prefix = next((name + "." for name, m in model.named_modules() if m is decoder and name), None)
    if prefix is None:
        raise TypeError(f"cannot locate the decoder inside {type(model).__name__}")

    def head_name(tensor: Tensor | None) -> str | None:
        return next((n for n in params if tensor is not None and model.get_parameter(n) is tensor), None)

    weight_name, bias_name = head_name(head.weight), head_name(head.bias)
    # Tied embeddings: the head's weight is also a decoder parameter, so it goes to both.
    decoder_names = {n: n[len(prefix) :] for n in params if n.startswith(prefix)}
    stray = set(params) - set(decoder_names) - {weight_name, bias_name}
    if stray:
        raise ValueError(f"parameters {sorted(stray)} are neither in the decoder nor the LM head")

    check_token_ids(model, batch["input_ids"])
    device = model.get_input_embeddings().weight.device
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    targets = batch["labels"][:, 1:].to(device)
    scored = targets != IGNORE_INDEX
    count = int(scored.sum())
    if count == 0:
        raise ValueError("the batch has no labelled tokens (all labels are -100)")

    def features(ps: Params) -> Tensor:
        sub = {decoder_names[n]: p for n, p in ps.items() if n in decoder_names}
        out = functional_call(decoder, sub, (), {"input_ids": input_ids, "attention_mask": mask, "use_cache": False})
        return out.last_hidden_state[:, :-1][scored].to(head.weight.dtype)

    acc = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    loss = SoftmaxCrossEntropy(
        features=features,
        weight=weight_name or head.weight.detach(),
        bias=bias_name or (None if head.bias is None else head.bias.detach()),
        labels=targets[scored],
        token_weights=torch.full((count,), 1.0 / count, dtype=acc, device=device),
        logit_scale=logit_scale(model.config),
    )
    return loss, params


# ---------------------------------------------------------------------------------------------
# Hessian-vector products.


def _as_dict(tree: Mapping[str, Tensor] | Sequence[Tensor], what: str) -> tuple[Params, bool]:
    if isinstance(tree, Mapping):
        return dict(tree), True
    if isinstance(tree, Sequence) and all(torch.is_tensor(t) for t in tree):
        return {str(i): t for i, t in enumerate(tree)}, False
    raise TypeError(f"{what} must be a dict name -> tensor or a list of tensors, got {type(tree).__name__}")


def _batched_vectors(params: Params, vectors: Params) -> tuple[Params, bool]:
    """Vectors as [K, *shape] per parameter; also whether they came unbatched (K = 1 implied)."""
    if vectors.keys() != params.keys():
        raise ValueError(f"vectors must cover exactly the parameters: got {sorted(vectors)}, expected {sorted(params)}")
    for n, v in vectors.items():
        if v.dtype != params[n].dtype or v.device != params[n].device:
            raise TypeError(
                f"vector {n!r} is {v.dtype} on {v.device}, its parameter {params[n].dtype} on {params[n].device}"
            )
    if all(vectors[n].shape == params[n].shape for n in params):
        return {n: v.unsqueeze(0) for n, v in vectors.items()}, True
    probes = {v.shape[0] if v.dim() else None for v in vectors.values()}
    if len(probes) != 1 or any(vectors[n].shape[1:] != params[n].shape for n in params):
        shapes = {n: (tuple(vectors[n].shape), tuple(params[n].shape)) for n in params}
        raise ValueError(
            f"vectors must be [K, *param.shape] with one K for all parameters; (vector, param) shapes: {shapes}"
        )
    return vectors, False


def _hessian_forward(loss_fn: LossFn, params: Params, vectors: Params, chunk_size: int | None) -> Params:
    grad_fn = grad(loss_fn)

    def one(v: Params) -> Params:
        return jvp(grad_fn, (params,), (v,))[1]

    # randomness="same": a mini-batch Hessian is that of one function, so dropout masks (if the
    # model is in training mode) are shared by the K probes.
    return vmap(one, chunk_size=chunk_size, randomness="same")(vectors)


def _leaves(params: Params) -> Params:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _batched_backward(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], chunk_size: int | None
) -> list[Tensor]:
    """sum_i J_i^T c_i for K stacked cotangents per output, in chunks of probes (graph kept)."""
    parts = []
    probes = cotangents[0].shape[0]
    step = chunk_size or probes
    for i in range(0, probes, step):
        parts.append(
            torch.autograd.grad(
                outputs,
                inputs,
                [c[i : i + step] for c in cotangents],
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
        )
    # An input the outputs do not depend on gets None (materialize_grads would drop the K dim).
    return [
        x.new_zeros(probes, *x.shape) if chunks[0] is None else torch.cat(chunks, 0)
        for x, chunks in zip(inputs, zip(*parts))
    ]


def _hessian_double_backward(loss_fn: LossFn, params: Params, vectors: Params, chunk_size: int | None) -> Params:
    leaves = _leaves(params)
    names = list(leaves)
    with torch.enable_grad():
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(
            loss, [leaves[n] for n in names], create_graph=True, allow_unused=True, materialize_grads=True
        )
    # A gradient without history (the loss is linear in that parameter) has no Hessian rows.
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return {n: torch.zeros_like(v) for n, v in vectors.items()}
    out = _batched_backward(
        [grads[i] for i in live], [leaves[n] for n in names], [vectors[names[i]] for i in live], chunk_size
    )
    return dict(zip(names, out))


def _gauss_newton(
    loss_fn: SoftmaxCrossEntropy, params: Params, vectors: Params, method: str, chunk_size: int | None, chunk_rows: int
) -> Params:
    if method == "forward_over_reverse":
        features, pullback = vjp(loss_fn.features, params)
        tangent = vmap(lambda v: jvp(loss_fn.features, (params,), (v,))[1], chunk_size=chunk_size, randomness="same")(
            vectors
        )
    else:  # JVP by double backward: J v = d/dc <J^T c, v>, J^T c linear in c
        leaves = _leaves(params)
        names = list(leaves)
        with torch.enable_grad():
            features = loss_fn.features(leaves)
            pulled = []
            if features.requires_grad:  # else only the head's own parameters are selected
                dummy = torch.zeros_like(features, requires_grad=True)
                pulled = torch.autograd.grad(
                    features,
                    [leaves[n] for n in names],
                    dummy,
                    create_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
        live = [i for i, g in enumerate(pulled) if g.requires_grad]
        if live:
            (tangent,) = _batched_backward(
                [pulled[i] for i in live], [dummy], [vectors[names[i]] for i in live], chunk_size
            )
        else:
            tangent = features.new_zeros(next(iter(vectors.values())).shape[0], *features.shape)

    weight, bias = loss_fn.head(params)
    scale = loss_fn.logit_scale
    weight_name = loss_fn.weight if isinstance(loss_fn.weight, str) else None
    bias_name = loss_fn.bias if isinstance(loss_fn.bias, str) else None
    # logits = s (f W^T + b) = (s f) W^T + (s b): the op sees the scaled features and bias.
    out = ce_curvature(
        features.detach() * scale,
        weight,
        None if bias is None else bias * scale,
        tangent_hidden=tangent.detach() * scale,
        tangent_weight=vectors[weight_name] if weight_name else None,
        tangent_bias=vectors[bias_name] * scale if bias_name else None,
        token_weights=torch.where(loss_fn.labels == IGNORE_INDEX, 0.0, loss_fn.token_weights),
        need_weight=weight_name is not None,
        need_bias=bias_name is not None,
        chunk_rows=chunk_rows,
    )
    cotangent = out.hidden * scale
    if method == "forward_over_reverse":
        (result,) = vmap(pullback, chunk_size=chunk_size)(cotangent)
    elif features.requires_grad:
        result = dict(zip(names, _batched_backward([features], [leaves[n] for n in names], [cotangent], chunk_size)))
    else:
        result = {n: torch.zeros_like(v) for n, v in vectors.items()}
    result = dict(result)
    if weight_name:
        result[weight_name] = result[weight_name] + out.weight
    if bias_name:
        result[bias_name] = result[bias_name] + out.bias * scale
    return result


def _run(fn: Callable[[str], Params], method: str) -> Params:
    if method != "auto":
        return fn(method)
    try:
        return fn("forward_over_reverse")
    except (RuntimeError, NotImplementedError) as exc:
        if not _NO_FORWARD_AD.search(str(exc)):
            raise
        warnings.warn(
            f"hvp: forward-mode AD unavailable ({str(exc).splitlines()[0]}); using double backward", stacklevel=3
        )
        return fn("double_backward")


def hvp(
    loss_fn: LossFn | SoftmaxCrossEntropy,
    params: Mapping[str, Tensor] | Sequence[Tensor],
    vectors: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    curvature: str = "hessian",
    method: str = "auto",
    chunk_size: int | None = None,
    chunk_rows: int = 0,
) -> dict[str, Tensor] | list[Tensor]:
    """Curvature-vector products ``C v_k`` for K directions at once.

    ``params``: the point, a dict name -> tensor or a list of tensors; ``loss_fn`` takes the same
    structure and returns a scalar. ``vectors``: the same structure, each ``[K, *param.shape]``
    (or ``param.shape`` for one direction, returned unbatched). Returns that structure.
    ``curvature``: ``"hessian"`` or ``"gauss_newton"`` (a :class:`SoftmaxCrossEntropy` loss).
    ``method``: ``"auto"`` | ``"forward_over_reverse"`` | ``"double_backward"`` (module docstring).
    ``chunk_size``: probes per batched pass (memory bound; default all K). ``chunk_rows``: tokens
    per chunk of the fused curvature op (0: sized for the device, ``unlearn_fast.ops.chunking``).
    """
    if method not in HVP_METHODS:
        raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if curvature == "gauss_newton" and not isinstance(loss_fn, SoftmaxCrossEntropy):
        raise TypeError("curvature='gauss_newton' needs a SoftmaxCrossEntropy loss (see make_loss_fn)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    params_d, is_dict = _as_dict(params, "params")
    if curvature == "gauss_newton" and not is_dict:
        raise TypeError("curvature='gauss_newton' needs params as a dict name -> tensor")
    vectors_d, _ = _as_dict(vectors, "vectors")
    vectors_d, single = _batched_vectors(params_d, vectors_d)
    params_d = {n: p.detach() for n, p in params_d.items()}
    fn = loss_fn if is_dict else (lambda ps: loss_fn([ps[str(i)] for i in range(len(ps))]))

    def compute(m: str) -> Params:
        if curvature == "gauss_newton":
            return _gauss_newton(loss_fn, params_d, vectors_d, m, chunk_size, chunk_rows)
        if m == "forward_over_reverse":
            return _hessian_forward(fn, params_d, vectors_d, chunk_size)
        return _hessian_double_backward(fn, params_d, vectors_d, chunk_size)

    out = {n: (v[0] if single else v).detach() for n, v in _run(compute, method).items()}
    return out if is_dict else [out[str(i)] for i in range(len(out))]


def sample_probes(
    params: Mapping[str, Tensor] | Sequence[Tensor],
    num_probes: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor] | list[Tensor]:
    """K random directions per parameter, ``[K, *shape]``: Rademacher (+-1) or standard normal.

    Drawn on the generator's device (CPU by default) and moved to each parameter's, so a seeded
    CPU generator gives the same probes on any device.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    params_d, is_dict = _as_dict(params, "params")
    device = generator.device if generator is not None else torch.device("cpu")
    out = {}
    for name, p in params_d.items():
        shape = (num_probes, *p.shape)
        if distribution == "rademacher":
            u = torch.randint(0, 2, shape, generator=generator, device=device).mul_(2).sub_(1)
        else:
            u = torch.randn(shape, generator=generator, device=device)
        out[name] = u.to(device=p.device, dtype=p.dtype)
    return out if is_dict else list(out.values())


def hutchinson_diagonal(
    loss_fn: LossFn | SoftmaxCrossEntropy,
    params: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    num_probes: int = 8,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    curvature: str = "hessian",
    method: str = "auto",
    chunk_size: int | None = None,
    chunk_rows: int = 0,
) -> dict[str, Tensor] | list[Tensor]:
    """Hutchinson's estimate of diag(C): the mean over K probes u of u * (C u), all K batched.

    The diagonal estimate of Sophia-H (SOUL). Entries can be negative: with the exact Hessian
    because it is indefinite, with the Gauss-Newton curvature by sampling noise only (its
    expectation diag(G) is nonnegative). Arguments as for :func:`hvp` and :func:`sample_probes`.
    """
    probes = sample_probes(params, num_probes, distribution, generator)
    products = hvp(
        loss_fn, params, probes, curvature=curvature, method=method, chunk_size=chunk_size, chunk_rows=chunk_rows
    )
    if isinstance(products, dict):
        return {n: (probes[n] * products[n]).mean(0) for n in products}
    return [(u * hu).mean(0) for u, hu in zip(probes, products)]
