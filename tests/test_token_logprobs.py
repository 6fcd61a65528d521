"""The fused token log-prob op against its float64 reference, on every backend that runs here."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

from unlearn_fast.backend import select_backend
from unlearn_fast.ops import reference_token_logprobs, token_logprob_sum, token_logprobs

BACKENDS = cpu_backends()
# (tokens, vocab): 1, 7, 97 and 1025 tokens; vocabularies of 1, 50 and SmolLM2's 49152.
SHAPES = [(1, 1), (7, 50), (97, 1), (97, 50), (1025, 50), (1, 49152), (7, 49152), (97, 49152)]


def make_inputs(tokens, vocab, hidden=24, dtype=torch.float64, bias=True, ignore_frac=0.2, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < ignore_frac] = -100
    return x, w, b, labels


def reference64(x, w, b, labels):
    return reference_token_logprobs(x.double(), w.double(), labels, None if b is None else b.double())


def test_auto_backend_on_cpu_is_the_extension():
    assert "cpp" in BACKENDS, "the C++ extension did not build: run `pip install --no-build-isolation -e .`"
    assert select_backend("token_logprobs", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,vocab", SHAPES)
def test_matches_reference_float64(backend, tokens, vocab, force_backend):
    force_backend(backend)
    x, w, b, labels = make_inputs(tokens, vocab)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    ref = reference64(x, w, b, labels)
    # Chunks that do not divide the tokens: later chunks reuse a buffer full of stale values.
    out = token_logprobs(x, w, labels, b, chunk_rows=max(1, tokens // 3))
    torch.testing.assert_close(out.logp, ref.logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.lse, ref.lse, rtol=1e-10, atol=1e-10)
    assert torch.all(out.logp[labels == -100] == 0)

    g_logp, g_lse = torch.randn(tokens, dtype=torch.float64), torch.randn(tokens, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref.logp * g_logp).sum() + (ref.lse * g_lse).sum(), (x, w, b))
    grads = torch.autograd.grad((out.logp * g_logp).sum() + (out.lse * g_lse).sum(), (x, w, b))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,vocab", [(1, 1), (7, 50), (97, 50), (1025, 50), (97, 49152)])
def test_fused_sum_matches_reference_float64(backend, tokens, vocab, force_backend):
    force_backend(backend)
    x, w, b, labels = make_inputs(tokens, vocab)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    weights = torch.randn(tokens, dtype=torch.float64)
    ref = reference64(x, w, b, labels)
    ref_total = (ref.logp * weights).sum()
    out = token_logprob_sum(x, w, labels, weights, b, chunk_rows=max(1, tokens // 2))
    torch.testing.assert_close(out.total, ref_total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.logp, ref.logp.detach(), rtol=1e-10, atol=1e-10)
    scale = 0.7  # the upstream gradient of the total reaches every input
    grads_ref = torch.autograd.grad(ref_total * scale, (x, w, b))
    grads = torch.autograd.grad(out.total * scale, (x, w, b))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, force_backend):
    force_backend(backend)
    x, w, b, labels = make_inputs(6, 9, hidden=5, seed=3)
    for t in (x, w, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: tuple(token_logprobs(x, w, labels, b, chunk_rows=4)), (x, w, b))
    weights = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, c: token_logprob_sum(x, w, labels, c, b, chunk_rows=4).total, (x, w, b, weights)
    )


def _loss(how, x, w, b, labels, g_logp, g_lse=None):
    """sum g_logp*logp (+ g_lse*lse) on the float64 reference ("reference"), the op ("op") or the
    fused weighted sum ("fused", no lse term); chunks of 16 rows."""
    if how == "fused":
        return token_logprob_sum(x, w, labels, g_logp, b, chunk_rows=16).total
    out = reference64(x, w, b, labels) if how == "reference" else token_logprobs(x, w, labels, b, chunk_rows=16)
    return (out.logp * g_logp).sum() + (0 if g_lse is None else (out.lse * g_lse).sum())


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("how", ["op", "fused"])
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("tokens,vocab", [(1, 1), (7, 50), (97, 211)])
def test_frozen_head_gradient_matches_reference(backend, how, frozen, tokens, vocab, force_backend):
    """The LoRA case: the head (weight and bias) is frozen, only hidden states get a gradient."""
    force_backend(backend)
    x, w, b, labels = make_inputs(tokens, vocab, hidden=13)
    g_logp = torch.randn(tokens, dtype=torch.float64)
    g_lse = None if how == "fused" else torch.randn(tokens, dtype=torch.float64)
    trained = (x,) if frozen else (x, w, b)
    for t in trained:
        t.requires_grad_()
    want = torch.autograd.grad(_loss("reference", x, w, b, labels, g_logp, g_lse), trained)
    got = torch.autograd.grad(_loss(how, x, w, b, labels, g_logp, g_lse), trained)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    _loss(how, x, w, b, labels, g_logp, g_lse).backward()
    assert (w.grad is None and b.grad is None) if frozen else (w.grad is not None and b.grad is not None)


def _weight_gradient_matmuls(run, vocab, width) -> int:
    """How many matmuls ``run`` performs whose product is [vocab, width] or its transpose: the head's
    weight gradient dlogits^T X. The profiler records every ATen op, also those called inside the
    C++ kernels of the extension."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        run()
    count = 0
    for event in prof.events():
        if "mm" not in event.name and "matmul" not in event.name:
            continue
        matrices = [s for s in event.input_shapes if len(s) == 2]
        products = {(a[0], b[1]) for a, b in zip(matrices, matrices[1:]) if a[1] == b[0]}
        count += bool(products & {(vocab, width), (width, vocab)})
    return count


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("how", ["op", "fused"])
def test_frozen_head_computes_no_weight_gradient(backend, how, force_backend):
    """Not computed and dropped: with a frozen head, no matmul forms the [V, H] weight gradient."""
    force_backend(backend)
    tokens, vocab, width = 97, 211, 13  # distinct sizes; chunks of 16 rows (and a last one of 1)
    x, w, b, labels = make_inputs(tokens, vocab, hidden=width, seed=4)
    g_logp = torch.randn(tokens, dtype=torch.float64)
    g_lse = None if how == "fused" else torch.randn(tokens, dtype=torch.float64)
    for frozen in (True, False):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_(not frozen)
        step = lambda xg=xg, wg=wg: _loss(how, xg, wg, b, labels, g_logp, g_lse).backward()  # noqa: E731
        matmuls = _weight_gradient_matmuls(step, vocab, width)
        assert (matmuls == 0) if frozen else (matmuls > 0), f"frozen={frozen}: {matmuls} weight-gradient matmuls"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch_error(backend, dtype, force_backend):
    """Flash-attention's rule: error against float64 at most ~2x that of plain torch in `dtype`."""
    force_backend(backend)
    x, w, b, labels = make_inputs(97, 1000, hidden=64, dtype=dtype, seed=11)
    ref = reference64(x, w, b, labels)
    plain_logits = F.linear(x, w, b)  # plain torch keeps the logits in the input dtype
    plain_lse = torch.logsumexp(plain_logits.float(), -1)
    out = token_logprobs(x, w, labels, b, chunk_rows=40)
    assert out.logp.dtype == torch.float32
    floor = 1e-6
    plain_err = (plain_lse.double() - ref.lse).abs().max().item()
    assert (out.lse.double() - ref.lse).abs().max().item() <= 2 * plain_err + floor

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = token_logprobs(xg, wg, labels, b, chunk_rows=40)
    out.logp.sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    reference64(x64, w64, b, labels).logp.sum().backward()
    xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
    plain = torch.log_softmax(F.linear(xp, wp, b), -1)
    plain.gather(1, labels.clamp(min=0)[:, None]).squeeze(1).masked_fill(labels == -100, 0).sum().backward()
    for got, plain_grad, want in ((xg.grad, xp.grad, x64.grad), (wg.grad, wp.grad, w64.grad)):
        plain_err = (plain_grad.double() - want).abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2 * plain_err + floor


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shapes_and_all_ignored(backend, force_backend):
    force_backend(backend)
    x, w, _, labels = make_inputs(12, 30, bias=False)
    out = token_logprobs(x.view(3, 4, -1), w, labels.view(3, 4))
    ref = reference64(x, w, None, labels)
    torch.testing.assert_close(out.logp, ref.logp.view(3, 4))
    all_ignored = torch.full_like(labels, -100)
    x.requires_grad_()
    out = token_logprobs(x, w, all_ignored)
    assert torch.all(out.logp == 0)
    (grad,) = torch.autograd.grad(out.logp.sum(), x)
    assert torch.all(grad == 0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_row_kernels_write_every_output():
    """Outputs poisoned with NaN must be fully overwritten."""
    from unlearn_fast.kernels import token_logprobs as k

    x, w, b, labels = make_inputs(37, 300, dtype=torch.float32, seed=5)
    logits = F.linear(x, w, b)
    logp, lse = torch.full((37,), float("nan")), torch.full((37,), float("nan"))
    k.row_forward(logits, labels, -100, logp, lse)
    ref = reference64(x, w, b, labels)
    torch.testing.assert_close(lse.double(), ref.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), ref.logp, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_opcheck_compiled_ops():
    x, w, b, labels = make_inputs(9, 20, seed=2)
    lse = torch.logsumexp(F.linear(x, w, b), -1)
    g = torch.randn(9, dtype=torch.float64)
    ops = torch.ops.unlearn_fast
    torch.library.opcheck(ops.token_logprobs.default, (x, w, b, labels, -100, 4))
    torch.library.opcheck(ops.token_logprobs.default, (x, w, None, labels, -100, 20))
    every, frozen_head = [True, True, True], [True, False, False]
    for mask in (every, frozen_head, [False, True, True]):
        torch.library.opcheck(ops.token_logprobs_backward.default, (g, g, x, w, b, labels, lse, -100, 4, mask))
        torch.library.opcheck(ops.token_logprobs_fused_grad.default, (x, w, b, labels, g, -100, 4, mask))
    torch.library.opcheck(ops.token_logprobs_fused_grad.default, (x, w, None, labels, g, -100, 3, every))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_op_rejects_bad_inputs():
    x, w, b, labels = make_inputs(5, 10, seed=1)
    ops = torch.ops.unlearn_fast
    with pytest.raises(RuntimeError, match="labels must lie in"):
        ops.token_logprobs(x, w, b, torch.tensor([0, 1, 2, 3, 10]), -100, 0)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.token_logprobs(x.float(), w, b, labels, -100, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.token_logprobs(x.t().contiguous().t(), w, b, labels, -100, 0)
    with pytest.raises(RuntimeError, match="hidden size mismatch"):
        ops.token_logprobs(x[:, :3].contiguous(), w, b, labels, -100, 0)
    with pytest.raises(RuntimeError, match="chunk_rows must be positive"):
        ops.token_logprobs(x, w, b, labels, -100, 0)


def test_public_function_rejects_bad_inputs():
    x, w, b, labels = make_inputs(5, 10, seed=1)
    with pytest.raises(ValueError, match="leading dims"):
        token_logprobs(x, w, labels[:4])
    with pytest.raises(TypeError, match="share a float dtype"):
        token_logprobs(x.float(), w, labels)
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(x, w, labels.double())
    with pytest.raises(ValueError, match="token_weights"):
        token_logprob_sum(x, w, labels, torch.ones(3))


def test_forced_backend_errors(force_backend):
    x, w, b, labels = make_inputs(3, 4, seed=0)
    force_backend("cuda")
    with pytest.raises(RuntimeError, match="cannot run token_logprobs on cpu"):
        token_logprobs(x, w, labels)
    force_backend("fastest")
    with pytest.raises(ValueError, match="is not a backend"):
        token_logprobs(x, w, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_with_minus_inf_logits(backend, dtype, force_backend):
    """Masked vocabulary entries (-inf logits): a row that begins with -inf -- for every lane of the
    CUDA block's strided reduction and for a whole first Triton block -- and a row of only -inf."""
    force_backend(backend)
    x, w, b, labels = make_inputs(7, 5000, dtype=dtype, ignore_frac=0.0, seed=4)
    b[:4200] = float("-inf")
    labels = labels.clamp(min=4200)
    ref = reference64(x, w, b, labels)
    out = token_logprobs(x, w, labels, b)
    torch.testing.assert_close(out.lse.double(), ref.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logp.double(), ref.logp, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(token_logprobs(xg, w, labels, b).logp.sum(), xg)
    assert torch.isfinite(grad).all()

    all_masked = torch.full_like(b[:50], float("-inf"))
    out = token_logprobs(x, w[:50].contiguous(), torch.full_like(labels, -100), all_masked)
    assert torch.all(out.lse == float("-inf")), out.lse


def _sample_labels_full(hidden, weight, bias, uniforms):
    """The sampler as SOUL had it: float64 [T, V] logits, softmax and cdf all at once."""
    logits = F.linear(hidden, weight, bias).double()
    cdf = torch.softmax(logits, -1).cumsum(-1)
    return torch.searchsorted(cdf, uniforms.unsqueeze(1), right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk_rows", [0, 1, 7, 40])
def test_sample_labels_equals_the_full_inverse_cdf(dtype, chunk_rows):
    from unlearn_fast.ops import sample_labels

    x, w, b, _ = make_inputs(97, 1031, hidden=16, dtype=dtype, seed=8)
    uniforms = torch.rand(97, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    uniforms[:3] = torch.tensor([0.0, 1.0 - 2**-53, 0.5])  # the ends of [0, 1): label 0 and the clamp
    got = sample_labels(x, w, b, uniforms, chunk_rows=chunk_rows)
    assert got.dtype == torch.long
    assert torch.equal(got, _sample_labels_full(x, w, b, uniforms))
    assert torch.equal(
        sample_labels(x, w, None, uniforms, chunk_rows=chunk_rows), _sample_labels_full(x, w, None, uniforms)
    )


_SAMPLER_MEMORY_SCRIPT = r"""
import resource, sys, torch
from unlearn_fast.ops import sample_labels
tokens, vocab, size = 2048, 32768, 64
x = torch.randn(tokens, size)
w = torch.randn(vocab, size) * 0.1
u = torch.rand(tokens, dtype=torch.float64)
sample_labels(x[:2], w, None, u[:2])  # warm-up: allocator and BLAS buffers out of the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "full":
    cdf = torch.softmax(torch.nn.functional.linear(x, w).double(), -1).cumsum(-1)
    torch.searchsorted(cdf, u[:, None], right=True)
else:
    sample_labels(x, w, None, u)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # MiB
"""


def test_sample_labels_peak_memory():
    """2048 tokens x 32k vocabulary: 512 MiB per float64 [T, V] copy when sampled at once; the chunked
    sampler's peak stays near its 32 MiB chunks."""
    import subprocess
    import sys

    def peak_mib(mode):
        run = subprocess.run(
            [sys.executable, "-c", _SAMPLER_MEMORY_SCRIPT, mode],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return float(run.stdout.strip().splitlines()[-1])

    chunked = peak_mib("chunked")
    assert chunked < 256, f"sample_labels grew the peak RSS by {chunked:.0f} MiB"
