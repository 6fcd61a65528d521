"""expert_ffn against its float64 reference on every backend, and single-expert training on every MoE family."""

import copy
import itertools

import pytest
import torch
from conftest import cpu_backends

from unlearn_fast.backend import select_backend
from unlearn_fast.models import MOE_FAMILIES, moe_family, moe_layers, tiny_moe
from unlearn_fast.models.expert_training import SingleExpert, expert_activation, train_single_expert
from unlearn_fast.ops.expert_ffn import ACTIVATIONS, expert_ffn, reference_expert_ffn

BACKENDS = cpu_backends()
ALL_BACKENDS = ["reference", *BACKENDS]
# (T, H, I, N): odd sizes; N = 0 (no token routed), 1, 5 (drawn with replacement: repeats when T is small), T.
SHAPES = [(t, h, i, n) for t, h, i in itertools.product((1, 7, 67), (8, 24, 40), (8, 36)) for n in sorted({0, 1, 5, t})]


def make_inputs(T, H, I, N, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    token_index = torch.randint(0, T, (N,), generator=g)
    gate_up = torch.randn(2 * I, H, generator=g, dtype=torch.float64) / H**0.5
    down = torch.randn(H, I, generator=g, dtype=torch.float64) / I**0.5
    grad_y = torch.randn(N, H, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (hidden, gate_up, down, grad_y)], token_index


def run(fn, hidden, token_index, gate_up, down, grad_y, activation):
    """Output and the gradients of (hidden, gate_up, down) for the upstream gradient grad_y."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, gate_up, down)]
    y = fn(leaves[0], token_index, leaves[1], leaves[2], activation)
    y.backward(grad_y)
    return [y.detach(), *(t.grad for t in leaves)]


def test_auto_backend_on_cpu_is_the_extension():
    assert "cpp" in BACKENDS, "the C++ extension did not build: run `bash scripts/build_ext.sh`"
    assert select_backend("expert_ffn", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("T,H,I,N", SHAPES)
def test_matches_reference_float64(backend, T, H, I, N, force_backend):
    (hidden, gate_up, down, grad_y), token_index = make_inputs(T, H, I, N)
    want = run(reference_expert_ffn, hidden, token_index, gate_up, down, grad_y, "silu")
    force_backend(backend)
    got = run(expert_ffn, hidden, token_index, gate_up, down, grad_y, "silu")
    for name, g, w in zip(("y", "grad_hidden", "grad_gate_up", "grad_down"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12, msg=name)
    if N == 0:  # nothing routed: zero gradients, not missing ones
        assert all(bool((g == 0).all()) for g in got[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,I,N", [(7, 24, 36, 5), (67, 40, 8, 67)])
def test_gelu_tanh_matches_reference_float64(backend, T, H, I, N, force_backend):
    (hidden, gate_up, down, grad_y), token_index = make_inputs(T, H, I, N)
    hidden = hidden * 3  # reach the flat tails of tanh
    want = run(reference_expert_ffn, hidden, token_index, gate_up, down, grad_y, "gelu_tanh")
    force_backend(backend)
    got = run(expert_ffn, hidden, token_index, gate_up, down, grad_y, "gelu_tanh")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_tokens_add_their_gradients(backend, force_backend):
    force_backend(backend)
    (hidden, gate_up, down, _), _ = make_inputs(3, 8, 8, 0, seed=4)
    hidden.requires_grad_()
    y = expert_ffn(hidden, torch.tensor([2, 0, 2]), gate_up, down)
    torch.testing.assert_close(y[0], y[2], rtol=0, atol=0)
    y[0].sum().backward(retain_graph=True)
    once = hidden.grad[2].clone()
    hidden.grad = None
    y.sum().backward()
    torch.testing.assert_close(hidden.grad[2], 2 * once)
    assert bool((hidden.grad[1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_gradcheck(backend, activation, force_backend):
    force_backend(backend)
    (hidden, gate_up, down, _), token_index = make_inputs(5, 8, 6, 7, seed=3)  # 7 of 5 tokens: repeats
    leaves = [t.requires_grad_() for t in (hidden, gate_up, down)]
    assert torch.autograd.gradcheck(lambda x, w, d: expert_ffn(x, token_index, w, d, activation), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch_error(backend, dtype, force_backend):
    """Flash-attention's rule: error against float64 at most ~2x that of plain torch in `dtype`."""
    (hidden, gate_up, down, grad_y), token_index = make_inputs(67, 40, 36, 67, seed=5)
    exact = run(reference_expert_ffn, hidden, token_index, gate_up, down, grad_y, "silu")
    low = [t.to(dtype) for t in (hidden, gate_up, down, grad_y)]
    plain = run(reference_expert_ffn, low[0], token_index, *low[1:], "silu")
    force_backend(backend)
    got = run(expert_ffn, low[0], token_index, *low[1:], "silu")
    for name, g, p, e in zip(("y", "grad_hidden", "grad_gate_up", "grad_down"), got, plain, exact):
        assert g.dtype == dtype, name
        err = (g.double() - e).abs().max().item()
        plain_err = (p.double() - e).abs().max().item()
        assert err <= 2 * plain_err + 1e-6 * e.abs().max().item(), (name, err, plain_err)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("activation", [0, 1])
def test_opcheck_compiled_ops(activation):
    (hidden, gate_up, down, grad_y), token_index = make_inputs(7, 8, 6, 5, seed=2)
    ops = torch.ops.unlearn_fast
    _, gate_up_out = ops.expert_ffn(hidden, token_index, gate_up, down, activation)
    torch.library.opcheck(ops.expert_ffn.default, (hidden, token_index, gate_up, down, activation))
    for need_hidden in (True, False):
        torch.library.opcheck(
            ops.expert_ffn_backward.default,
            (grad_y, hidden, token_index, gate_up, down, gate_up_out, activation, need_hidden),
        )
    (hidden, gate_up, down, grad_y), token_index = make_inputs(7, 8, 6, 0, seed=2)  # no tokens
    torch.library.opcheck(ops.expert_ffn.default, (hidden, token_index, gate_up, down, activation))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rejects_bad_inputs(backend, force_backend):
    force_backend(backend)
    (hidden, gate_up, down, _), token_index = make_inputs(7, 8, 6, 5, seed=1)
    with pytest.raises(TypeError, match="share one dtype"):
        expert_ffn(hidden.float(), token_index, gate_up, down)
    with pytest.raises(ValueError, match="down must be"):
        expert_ffn(hidden, token_index, gate_up, down[:, :5].contiguous())
    with pytest.raises(ValueError, match="gate_up must be"):
        expert_ffn(hidden, token_index, gate_up[:, :7], down)
    with pytest.raises(IndexError, match=r"must lie in \[0, 7\)"):
        expert_ffn(hidden, torch.tensor([0, 7]), gate_up, down)
    with pytest.raises(IndexError, match="must lie in"):
        expert_ffn(hidden, torch.tensor([-1]), gate_up, down)
    with pytest.raises(TypeError, match="int64"):
        expert_ffn(hidden, token_index.int(), gate_up, down)
    with pytest.raises(ValueError, match="contiguous"):
        expert_ffn(hidden, token_index, gate_up.t().contiguous().t(), down)
    with pytest.raises(ValueError, match="unknown activation"):
        expert_ffn(hidden, token_index, gate_up, down, "relu")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_op_rejects_bad_inputs():
    (hidden, gate_up, down, _), token_index = make_inputs(7, 8, 6, 5, seed=1)
    op = torch.ops.unlearn_fast.expert_ffn
    with pytest.raises(RuntimeError, match="must lie in"):
        op(hidden, torch.tensor([0, 7]), gate_up, down, 0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(hidden, token_index, gate_up.float(), down, 0)
    with pytest.raises(RuntimeError, match="down must be"):
        op(hidden, token_index, gate_up, down[:, :5].contiguous(), 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(hidden, token_index, gate_up.t().contiguous().t(), down, 0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        op(hidden, token_index, gate_up, down, 2)


# ---------------------------------------------------------------------------------------------
# train_single_expert on real transformers MoE blocks.

FAMILIES = sorted(MOE_FAMILIES)


def _setup(family, dtype, seed=0):
    """A tiny model of the family, its last MoE layer, that layer's busiest expert on the batch, and the batch."""
    model = tiny_moe(family, num_layers=2, hidden_size=32, num_experts=4, top_k=2, seed=seed).to(dtype)
    if dtype == torch.float64:  # torch._grouped_mm, the default experts kernel, has no float64
        model.set_experts_implementation("eager")
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
    layer_idx, block = moe_layers(model)[-1]
    with torch.no_grad():
        captured = []
        handle = block.experts.register_forward_pre_hook(lambda m, args: captured.append(args[1]) and None)
        model(input_ids=ids)
        handle.remove()
    expert = int(torch.bincount(captured[0].reshape(-1), minlength=4).argmax())
    return model, ids, layer_idx, block, expert


def _loss(model, ids, seed=1):
    logits = model(input_ids=ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    return (logits * weights).sum()


def _tolerances(dtype):
    return dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_expert_matches_full_autograd(family, dtype):
    model, ids, layer_idx, block, e = _setup(family, dtype)
    tol = _tolerances(dtype)
    # Plain autograd on the fused Parameters: the reference gradients (all E slices).
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref_block = dict(moe_layers(ref))[layer_idx]
    for p in (ref_block.gate.weight, ref_block.experts.gate_up_proj, ref_block.experts.down_proj):
        p.requires_grad_(True)
    ref_logits = ref(input_ids=ids).logits
    _loss(ref, ids).backward()

    model.requires_grad_(False)
    block.gate.weight.requires_grad_(True)
    experts = block.experts
    x = torch.randn(13, 32, dtype=dtype)
    top_w, top_i = torch.rand(13, 2, dtype=dtype), torch.stack([torch.randperm(4)[:2] for _ in range(13)])
    direct = experts(x, top_i, top_w)
    with train_single_expert(model, layer_idx, e) as se:
        assert isinstance(se, SingleExpert) and se.parameters() == [se.gate_up, se.down]
        assert se.gate_up.shape == experts.gate_up_proj.shape[1:] and se.down.shape == experts.down_proj.shape[1:]
        assert not experts.gate_up_proj.requires_grad and not experts.down_proj.requires_grad
        torch.testing.assert_close(experts(x, top_i, top_w), direct, **tol)  # the experts module alone
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, ref_logits, **tol)  # and the whole model
        _loss(model, ids).backward()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    torch.testing.assert_close(se.gate_up.grad, ref_block.experts.gate_up_proj.grad[e], **tol)
    torch.testing.assert_close(se.down.grad, ref_block.experts.down_proj.grad[e], **tol)
    assert se.gate_up.grad.abs().max() > 0  # the expert is routed to: a real gradient
    torch.testing.assert_close(block.gate.weight.grad, ref_block.gate.weight.grad, **tol)
    # Shared experts untouched (they live outside `experts`).
    shared = moe_family(model).shared_expert
    if shared is not None:
        assert all(p.grad is None for p in getattr(block, shared).parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_sgd_step_changes_only_the_expert_slice(family):
    model, ids, layer_idx, block, e = _setup(family, torch.float64, seed=2)
    model.requires_grad_(False)
    experts = block.experts
    before = (experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone())
    flags = (experts.gate_up_proj.requires_grad, experts.down_proj.requires_grad)
    with train_single_expert(model, layer_idx, e) as se:
        opt = torch.optim.SGD(se.parameters(), lr=0.1)
        _loss(model, ids).backward()
        opt.step()
        trained = (se.gate_up.detach().clone(), se.down.detach().clone())
    for fused, old, new in zip((experts.gate_up_proj, experts.down_proj), before, trained):
        others = [i for i in range(fused.shape[0]) if i != e]
        assert torch.equal(fused[others], old[others])  # bitwise unchanged
        assert torch.equal(fused[e], new) and not torch.equal(new, old[e])
    assert (experts.gate_up_proj.requires_grad, experts.down_proj.requires_grad) == flags
    assert "forward" not in experts.__dict__  # the class forward is back


def test_exception_restores_forward_without_commit():
    model, ids, layer_idx, block, e = _setup("mixtral", torch.float64)
    experts = block.experts
    experts.gate_up_proj.requires_grad_(True)
    before = experts.gate_up_proj.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with train_single_expert(model, layer_idx, e) as se:
            with torch.no_grad():
                se.gate_up.add_(1.0)
            raise RuntimeError("boom")
    assert "forward" not in experts.__dict__ and experts.gate_up_proj.requires_grad
    assert torch.equal(experts.gate_up_proj.detach(), before)
    with train_single_expert(model, layer_idx, e) as se:  # commit() writes back mid-block
        with torch.no_grad():
            se.gate_up.add_(1.0)
        se.commit()
        assert torch.equal(experts.gate_up_proj[e].detach(), before[e] + 1.0)


def test_rejects_bad_layer_expert_and_activation():
    model, _, layer_idx, block, _ = _setup("deepseek_v3", torch.float64)
    with pytest.raises(ValueError, match="not an MoE layer"):
        with train_single_expert(model, 0, 0):  # DeepSeek's first layer is dense
            pass
    with pytest.raises(ValueError, match=r"expert must lie in \[0, 4\)"):
        with train_single_expert(model, layer_idx, 4):
            pass
    assert expert_activation(block.experts) == "silu"
    block.experts.act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match="ReLU is not supported"):
        with train_single_expert(model, layer_idx, 0):
            pass
    assert "forward" not in block.experts.__dict__


def test_gelu_tanh_experts():
    model, ids, layer_idx, block, e = _setup("qwen3_moe", torch.float64)
    from transformers.activations import GELUTanh

    block.experts.act_fn = GELUTanh()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with train_single_expert(model, layer_idx, e) as se:
            assert se.activation == "gelu_tanh"
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-10, atol=1e-11)


def test_warns_when_the_input_needs_a_gradient():
    model, ids, layer_idx, _, e = _setup("olmoe", torch.float64)
    model.requires_grad_(True)  # the layers below train: their gradients would be partial
    with train_single_expert(model, layer_idx, e), pytest.warns(UserWarning, match="only expert"):
        _loss(model, ids).backward()


_WGRAD_64BIT_SCRIPT = r"""
import torch
from unlearn_fast.kernels import expert_ffn as k

# da [N, 2I] with N * 2I > 2**31: the offset of row 2 of da overflows 32 bits. torch.empty maps the
# 6 GiB lazily; only the three 64-column rows the one program reads are ever touched.
N, TWO_I, H = 3, 2**30 + 64, 16
da = torch.empty(N, TWO_I, dtype=torch.float16)
g = torch.Generator().manual_seed(0)
da[:, :64] = torch.randn(N, 64, generator=g).half()
hidden = torch.randn(5, H, generator=g).half()
index = torch.tensor([4, 0, 2])
out = torch.full((64, H), float("nan"), dtype=torch.float16)  # program (0, 0) writes rows 0..63 only
k._gather_wgrad_kernel[(1, 1)](da, hidden, index, out, N, H, TWO_I, **k._config(torch.float16))
want = da[:, :64].float().t() @ hidden[index].float()
torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=2e-3)
print("ok")
"""


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_weight_gradient_offsets_are_64_bit():
    """The weight-gradient GEMM addresses da[k, m] at k * 2I + m: beyond 2**31 elements (N * 2I at
    realistic token counts and expert sizes) a 32-bit product wraps and reads elsewhere (or faults)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", _WGRAD_64BIT_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stdout, run.stderr[-2000:])
