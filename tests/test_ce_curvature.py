"""The fused curvature product op against its float64 reference and autograd, on every backend here."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

from unlearn_fast.backend import select_backend
from unlearn_fast.ops import ce_curvature, reference_ce_curvature

BACKENDS = cpu_backends()
# (tokens, vocab): 1, 7 and 97 tokens; vocabularies of 1, 50 and a little over 1024.
SHAPES = [(1, 1), (7, 50), (97, 1), (97, 50), (1, 1031), (7, 1031), (97, 1031)]
# Which tangents are given: hidden states, head weight, head bias.
TANGENTS = [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]


def make_inputs(tokens, vocab, probes=3, hidden=12, dtype=torch.float64, bias=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x, w = rand(tokens, hidden), rand(vocab, hidden, scale=0.5)
    b = rand(vocab, scale=0.1) if bias else None
    tangents = (rand(probes, tokens, hidden), rand(probes, vocab, hidden, scale=0.5), rand(probes, vocab))
    token_weights = torch.rand(tokens, generator=g, dtype=torch.float64)
    token_weights[torch.rand(tokens, generator=g) < 0.2] = 0  # ignored tokens
    return x, w, b, token_weights, tangents


def pick(tangents, which):
    return [t if use else None for t, use in zip(tangents, which)]


def reference64(x, w, b, token_weights, tangents):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference_ce_curvature(x.double(), w.double(), d(b), token_weights, *map(d, tangents))


def test_auto_backend_on_cpu_is_the_extension():
    assert "cpp" in BACKENDS, "the C++ extension did not build: run `bash scripts/build_ext.sh`"
    assert select_backend("ce_curvature", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,vocab", SHAPES)
@pytest.mark.parametrize("which", TANGENTS)
def test_matches_reference_float64(backend, tokens, vocab, which, force_backend):
    force_backend(backend)
    x, w, b, token_weights, tangents = make_inputs(tokens, vocab)
    th, tw, tb = pick(tangents, which)
    if th is not None:  # ignored tokens contribute exact zeros, whatever their tangents
        th[:, token_weights == 0] = float("nan")
    ref = reference64(x, w, b, token_weights, (th, tw, tb))
    # Chunks that do not divide the tokens: later chunks reuse buffers full of stale values.
    out = ce_curvature(
        x,
        w,
        b,
        tangent_hidden=th,
        tangent_weight=tw,
        tangent_bias=tb,
        token_weights=token_weights,
        need_weight=True,
        need_bias=True,
        chunk_rows=max(1, tokens // 3),
    )
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.all(out.hidden[:, token_weights == 0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_the_cross_entropy_hessian(backend, force_backend):
    """For each input alone the logits are linear in it, so the product is the exact CE Hessian."""
    force_backend(backend)
    x, w, b, token_weights, (th, tw, tb) = make_inputs(13, 40, probes=2, seed=4)
    labels = torch.randint(0, 40, (13,))

    def loss(x, w, b):
        return (F.cross_entropy(F.linear(x, w, b), labels, reduction="none") * token_weights).sum()

    def hessian_products(index, directions):
        primals = [x, w, b]

        def grad_of(p):
            args = primals[:index] + [p] + primals[index + 1 :]
            return torch.func.grad(lambda q: loss(*(args[:index] + [q] + args[index + 1 :])))(p)

        return torch.stack([torch.func.jvp(grad_of, (primals[index],), (d,))[1] for d in directions])

    out = ce_curvature(x, w, b, tangent_hidden=th, token_weights=token_weights, chunk_rows=5)
    torch.testing.assert_close(out.hidden, hessian_products(0, th), rtol=1e-10, atol=1e-12)
    out = ce_curvature(x, w, b, tangent_weight=tw, token_weights=token_weights, need_hidden=False, need_weight=True)
    assert out.hidden is None and out.bias is None
    torch.testing.assert_close(out.weight, hessian_products(1, tw), rtol=1e-10, atol=1e-12)
    out = ce_curvature(x, w, b, tangent_bias=tb, token_weights=token_weights, need_hidden=False, need_bias=True)
    torch.testing.assert_close(out.bias, hessian_products(2, tb), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_gauss_newton_hessian_against_autograd(backend, force_backend):
    """r = H u with H = torch.func.hessian of the weighted CE with respect to the logits."""
    force_backend(backend)
    x, w, b, token_weights, (th, tw, tb) = make_inputs(6, 30, probes=2, seed=8)
    labels = torch.randint(0, 30, (6,))
    logits = F.linear(x, w, b)
    hess = torch.func.hessian(lambda l: (F.cross_entropy(l, labels, reduction="none") * token_weights).sum())(
        logits
    )  # [T, V, T, V]
    u = th @ w.t() + x @ tw.transpose(1, 2) + tb[:, None]  # [K, T, V]
    r = torch.einsum("tvsw,ksw->ktv", hess, u)
    out = ce_curvature(
        x,
        w,
        b,
        tangent_hidden=th,
        tangent_weight=tw,
        tangent_bias=tb,
        token_weights=token_weights,
        need_weight=True,
        need_bias=True,
        chunk_rows=4,
    )
    torch.testing.assert_close(out.hidden, r @ w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.weight, r.transpose(1, 2) @ x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.bias, r.sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_twice_plain_torch_error(backend, dtype, force_backend):
    """Error against float64 at most ~2x that of the unfused computation in plain torch in `dtype`."""
    force_backend(backend)
    x, w, b, token_weights, (th, tw, tb) = make_inputs(97, 1000, probes=2, hidden=64, dtype=dtype, seed=11)
    ref = reference64(x, w, b, token_weights, (th, tw, tb))
    tw_ = token_weights.to(dtype)
    p = torch.softmax(F.linear(x, w, b), -1)
    u = th @ w.t() + x @ tw.transpose(1, 2) + tb[:, None]
    r = tw_[:, None] * (p * u - p * (p * u).sum(-1, keepdim=True))
    plain = (r @ w, r.transpose(1, 2) @ x, r.sum(1))
    out = ce_curvature(
        x,
        w,
        b,
        tangent_hidden=th,
        tangent_weight=tw,
        tangent_bias=tb,
        token_weights=token_weights,
        need_weight=True,
        need_bias=True,
        chunk_rows=40,
    )
    for got, base, want in zip(out, plain, ref):
        assert got.dtype == dtype
        plain_err = (base.double() - want).abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2 * plain_err + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_token_weights_batched_shapes_and_no_bias(backend, force_backend):
    force_backend(backend)
    x, w, _, _, (th, tw, _) = make_inputs(12, 30, bias=False, seed=3)
    labels = torch.randint(0, 30, (12,))
    labels[[1, 5]] = -100
    mean = (labels != -100).double() / 10
    out = ce_curvature(
        x.view(3, 4, -1),
        w,
        tangent_hidden=th.view(3, 3, 4, -1),
        tangent_weight=tw,
        labels=labels.view(3, 4),
        need_weight=True,
    )
    ref = reference64(x, w, None, mean, (th, tw, None))
    assert out.hidden.shape == (3, 3, 4, 12) and out.bias is None
    torch.testing.assert_close(out.hidden.reshape(3, 12, 12), ref.hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.weight, ref.weight, rtol=1e-10, atol=1e-12)
    out = ce_curvature(x, w, tangent_hidden=th)  # no labels: a mean over all tokens
    ref = reference64(x, w, None, torch.full((12,), 1 / 12, dtype=torch.float64), (th, None, None))
    torch.testing.assert_close(out.hidden, ref.hidden, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified_and_large_vocab(backend, force_backend):
    """SmolLM2's vocabulary, several chunks; the op must not write into its inputs."""
    force_backend(backend)
    x, w, b, token_weights, tangents = make_inputs(5, 49152, probes=2, hidden=8, dtype=torch.float32, seed=1)
    copies = [t.clone() for t in (x, w, b, *tangents)]
    out = ce_curvature(
        x,
        w,
        b,
        tangent_hidden=tangents[0],
        tangent_weight=tangents[1],
        token_weights=token_weights,
        need_weight=True,
        chunk_rows=2,
    )
    for t, c in zip((x, w, b, *tangents), copies):
        assert torch.equal(t, c)
    ref = reference64(x, w, b, token_weights, (tangents[0], tangents[1], None))
    torch.testing.assert_close(out.hidden.double(), ref.hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.weight.double(), ref.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_row_kernel():
    """In place w p (u - p^T u) per row and probe; exact zeros for ignored tokens, even over NaN."""
    from unlearn_fast.kernels import ce_curvature as k

    x, w, b, token_weights, (th, _, _) = make_inputs(9, 300, probes=2, dtype=torch.float32, seed=5)
    token_weights[[2, 6]] = 0
    logits = F.linear(x, w, b)
    u = (th @ w.t()).contiguous()
    p, u64 = torch.softmax(logits.double(), -1), u.double()
    want = token_weights[:, None] * (p * u64 - p * (p * u64).sum(-1, keepdim=True))
    u[:, 2] = float("nan")
    k.row_curvature(logits, u, token_weights.float())
    torch.testing.assert_close(u.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.all(u[:, [2, 6]] == 0)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_opcheck_compiled_op():
    x, w, b, token_weights, (th, tw, tb) = make_inputs(9, 20, seed=2)
    op = torch.ops.unlearn_fast.ce_curvature.default
    torch.library.opcheck(op, (x, w, b, token_weights, th, tw, tb, True, True, True, 4))
    torch.library.opcheck(op, (x, w, None, token_weights, th, None, None, True, False, False, 9))
    torch.library.opcheck(op, (x, w, b, token_weights, None, tw, None, False, True, False, 2))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_op_rejects_bad_inputs():
    x, w, b, token_weights, (th, tw, tb) = make_inputs(5, 10, seed=1)
    op = torch.ops.unlearn_fast.ce_curvature
    with pytest.raises(RuntimeError, match="at least one"):
        op(x, w, b, token_weights, None, None, None, True, False, False, 0)
    with pytest.raises(RuntimeError, match="disagree on the number of probes"):
        op(x, w, b, token_weights, th, tw[:2], None, True, False, False, 0)
    with pytest.raises(RuntimeError, match="tangent_hidden must be"):
        op(x, w, b, token_weights, th[:, :4], None, None, True, False, False, 0)
    with pytest.raises(RuntimeError, match="must have dtype"):
        op(x, w, b, token_weights, th.float(), None, None, True, False, False, 0)
    with pytest.raises(RuntimeError, match="hidden size mismatch"):
        op(x[:, :3], w, b, token_weights, th, None, None, True, False, False, 0)
    with pytest.raises(RuntimeError, match="token_weights must be"):
        op(x, w, b, token_weights[:4], th, None, None, True, False, False, 0)
    with pytest.raises(RuntimeError, match="chunk_rows must be positive"):
        op(x, w, b, token_weights, th, None, None, True, False, False, 0)


def test_public_function_rejects_bad_inputs():
    x, w, b, token_weights, (th, tw, _) = make_inputs(5, 10, seed=1)
    with pytest.raises(ValueError, match="at least one"):
        ce_curvature(x, w, b)
    with pytest.raises(ValueError, match=r"tangent_weight must be \[probes, 10, 12\]"):
        ce_curvature(x, w, b, tangent_weight=tw[:, :3])
    with pytest.raises(ValueError, match="disagree"):
        ce_curvature(x, w, b, tangent_hidden=th, tangent_weight=tw[:1])
    with pytest.raises(TypeError, match="share a float dtype"):
        ce_curvature(x.float(), w, tangent_hidden=th)
    with pytest.raises(ValueError, match="token_weights"):
        ce_curvature(x, w, tangent_hidden=th, token_weights=token_weights[:2])
