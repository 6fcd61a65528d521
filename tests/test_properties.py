"""Property-based tests (hypothesis): every op against its reference, on every CPU backend, float64.

Hypothesis draws the shapes (empty and single-element ones included), the values (signed zeros,
ties, large magnitudes within a range where float64 stays exact enough), the hyperparameters
and the flags; each op must agree with its plain-PyTorch reference. Shapes stay small and the
example count modest (``UNLEARN_FAST_PROPERTY_EXAMPLES``, default 25): the Triton backend runs
under the (slow) interpreter here. On a machine with a GPU the same properties run on CUDA
tensors with the ``cuda`` and ``triton`` backends (scripts/gpu_check.sh), the reference on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import cpu_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unlearn_fast.backend import available_backends, use_backend
from unlearn_fast.ops import (
    ce_curvature,
    reference_ce_curvature,
    reference_token_logprobs,
    token_logprob_sum,
    token_logprobs,
)
from unlearn_fast.ops.solver_update import (
    cg_update,
    damped_dots,
    reference_cg_update,
    reference_damped_dots,
    reference_xpay,
    xpay,
)
from unlearn_fast.ops.sophia_update import reference_sophia_update, sophia_update

# (device, backend): every backend that runs here, on tensors of its device.
BACKENDS = [("cpu", b) for b in cpu_backends()] + [
    ("cuda", b) for b in ("cuda", "triton") if available_backends()["cuda"][b] is None
]
PROPERTY = settings(
    max_examples=int(os.environ.get("UNLEARN_FAST_PROPERTY_EXAMPLES", 25)),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IGNORE = -100


def tensors(shape, low=-3.0, high=3.0):
    """float64 tensors of ``shape`` with hypothesis-chosen values in [low, high]."""
    elements = st.floats(low, high, allow_nan=False, allow_infinity=False, width=64)
    return arrays(np.float64, shape, elements=elements).map(torch.from_numpy)


def close(got, want, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@st.composite
def token_problems(draw):
    tokens, width, vocab = draw(st.integers(0, 9)), draw(st.integers(1, 6)), draw(st.integers(1, 17))
    hidden = draw(tensors((tokens, width)))
    weight = draw(tensors((vocab, width)))
    bias = draw(st.none() | tensors((vocab,)))
    labels = torch.tensor(
        draw(st.lists(st.integers(0, vocab - 1) | st.just(IGNORE), min_size=tokens, max_size=tokens)), dtype=torch.long
    ).reshape(tokens)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("device,backend", BACKENDS)
@PROPERTY
@given(problem=token_problems(), upstream=st.integers(0, 2**31 - 1), chunk_rows=st.integers(0, 4))
def test_token_logprobs_matches_reference(device, backend, problem, upstream, chunk_rows):
    hidden, weight, bias, labels = problem
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    leaves = [t.detach().to(device).requires_grad_() for t in ref_leaves]
    g = torch.Generator().manual_seed(upstream)
    g_logp, g_lse = (
        torch.randn(len(labels), generator=g, dtype=torch.float64),
        torch.randn(len(labels), generator=g, dtype=torch.float64),
    )
    want = reference_token_logprobs(*ref_leaves[:2], labels, ref_leaves[2] if bias is not None else None)
    with use_backend(backend):
        got = token_logprobs(
            *leaves[:2], labels.to(device), leaves[2] if bias is not None else None, chunk_rows=chunk_rows
        )  # 0: one chunk; else chunks that may not divide the tokens
    close(got.logp, want.logp)
    close(got.lse, want.lse)
    assert torch.all(got.logp[labels == IGNORE] == 0)
    if len(labels):
        grads = torch.autograd.grad((got.logp.cpu() * g_logp).sum() + (got.lse.cpu() * g_lse).sum(), leaves)
        ref_grads = torch.autograd.grad((want.logp * g_logp).sum() + (want.lse * g_lse).sum(), ref_leaves)
        for a, b in zip(grads, ref_grads):
            close(a, b, rtol=1e-9)


@pytest.mark.parametrize("device,backend", BACKENDS)
@PROPERTY
@given(problem=token_problems(), weights_seed=st.integers(0, 2**31 - 1), chunk_rows=st.integers(0, 4))
def test_token_logprob_sum_matches_reference(device, backend, problem, weights_seed, chunk_rows):
    hidden, weight, bias, labels = problem
    token_weights = torch.randn(len(labels), generator=torch.Generator().manual_seed(weights_seed), dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    leaves = [t.detach().to(device).requires_grad_() for t in ref_leaves]
    want = (
        reference_token_logprobs(*ref_leaves[:2], labels, ref_leaves[2] if bias is not None else None).logp
        * token_weights
    ).sum()
    with use_backend(backend):
        got = token_logprob_sum(
            *leaves[:2],
            *on(device, labels, token_weights),
            leaves[2] if bias is not None else None,
            chunk_rows=chunk_rows,
        )
    close(got.total, want)
    if len(labels):
        for a, b in zip(torch.autograd.grad(got.total, leaves), torch.autograd.grad(want, ref_leaves)):
            close(a, b, rtol=1e-9)


@st.composite
def curvature_problems(draw):
    tokens, width, vocab, probes = (
        draw(st.integers(0, 7)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 13)),
        draw(st.integers(1, 3)),
    )
    hidden, weight = draw(tensors((tokens, width))), draw(tensors((vocab, width)))
    bias = draw(st.none() | tensors((vocab,)))
    kinds = draw(st.sets(st.sampled_from(["hidden", "weight", "bias"]), min_size=1))
    shapes = {"hidden": (probes, tokens, width), "weight": (probes, vocab, width), "bias": (probes, vocab)}
    tangents = {f"tangent_{k}": draw(tensors(shapes[k])) for k in kinds}
    # Zero weights are ignored tokens: they must contribute exact zeros.
    token_weights = draw(tensors((tokens,), -1.0, 1.0)) * torch.tensor(
        draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens)), dtype=torch.float64
    ).reshape(tokens)
    return hidden, weight, bias, tangents, token_weights


@pytest.mark.parametrize("device,backend", BACKENDS)
@PROPERTY
@given(problem=curvature_problems(), chunk_rows=st.integers(0, 4))
def test_ce_curvature_matches_reference(device, backend, problem, chunk_rows):
    hidden, weight, bias, tangents, token_weights = problem
    want = reference_ce_curvature(hidden, weight, bias, token_weights, **tangents)
    hidden, weight, bias, token_weights = on(device, hidden, weight, bias, token_weights)
    with use_backend(backend):
        got = ce_curvature(
            hidden,
            weight,
            bias,
            token_weights=token_weights,
            need_hidden=True,
            need_weight=True,
            need_bias=True,
            chunk_rows=chunk_rows,
            **{k: t.to(device) for k, t in tangents.items()},
        )
    for a, b in zip(got, want):
        close(a, b)


@st.composite
def sophia_problems(draw):
    shapes = draw(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3))
    params = [draw(tensors(s)) for s in shapes]
    grads = [draw(tensors(s)) for s in shapes]
    exp_avgs = [draw(tensors(s)) for s in shapes]
    hessians = [draw(tensors(s, -1.0, 3.0)) for s in shapes]  # negative: Hutchinson estimates can be
    scalars = dict(
        lr=draw(st.floats(0, 1)),
        beta1=draw(st.floats(0, 0.999)),
        beta2=draw(st.floats(0, 0.999)),
        rho=draw(st.floats(0, 10)),
        bs=draw(st.floats(1e-3, 1e4)),
        weight_decay=draw(st.floats(0, 1)),
        eps=draw(st.sampled_from([1e-15, 1e-8, 1e-3])),
    )
    flags = dict(
        maximize=draw(st.booleans()), hessian_from_grad=draw(st.booleans()), soul_reference=draw(st.booleans())
    )
    return (params, grads, exp_avgs, hessians), scalars, flags


@pytest.mark.parametrize("device,backend", BACKENDS)
@PROPERTY
@given(problem=sophia_problems())
def test_sophia_update_matches_reference(device, backend, problem):
    lists, scalars, flags = problem
    want = [[t.clone() for t in ts] for ts in lists]
    got = [[t.to(device, copy=True) for t in ts] for ts in lists]
    reference_sophia_update(*want, *scalars.values(), *flags.values())
    with use_backend(backend):
        sophia_update(*got, **scalars, **flags)
    for got_list, want_list in zip(got, want):
        for a, b in zip(got_list, want_list):
            close(a, b, rtol=1e-12, atol=1e-12)


vectors = st.integers(0, 40).flatmap(lambda n: st.tuples(*[tensors((n,), -1e3, 1e3)] * 4))
coefficients = st.floats(-1e3, 1e3, allow_nan=False)


@pytest.mark.parametrize("device,backend", BACKENDS)
@PROPERTY
@given(vs=vectors, alpha=coefficients, with_r=st.booleans())
def test_solver_updates_match_reference(device, backend, vs, alpha, with_r):
    x, r, p, q = vs
    n = max(len(x), 1)
    # Elementwise: a fused multiply-add may round once where torch rounds twice (an ulp of the
    # terms, even when they cancel); dot products: other summation orders.
    largest = max([1.0] + [float(t.abs().max()) for t in vs if t.numel()]) * (1 + abs(alpha))
    elementwise, dot = dict(rtol=0, atol=4e-16 * largest), dict(rtol=1e-12, atol=1e-14 * largest**2 * n)

    def run(op, reference, *args):
        got, want = [t.to(device, copy=True) for t in vs], [t.clone() for t in vs]
        with use_backend(backend):
            out = op(*(got[i] if isinstance(i, int) else i for i in args))
        ref = reference(*(want[i] if isinstance(i, int) else i for i in args))
        for a, b in zip(got, want):
            close(a, b, **elementwise)
        if ref is not None:
            close(out, ref, **dot)

    run(damped_dots, reference_damped_dots, 3, 2, 1 if with_r else None, alpha)  # q += alpha p; p.q, p.r
    run(cg_update, reference_cg_update, 0, 1, 2, 3, alpha)  # x += alpha p, r -= alpha q; r.r
    run(xpay, reference_xpay, 2, 1, alpha)  # p = r + alpha p
