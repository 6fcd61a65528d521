"""Batched HVPs and Gauss-Newton products against dense Hessians (float64, tiny models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast.hvp import (
    SoftmaxCrossEntropy,
    hutchinson_diagonal,
    hvp,
    make_loss_fn,
    sample_probes,
)
from unlearn_fast.models import hvp_safe

METHODS = ["forward_over_reverse", "double_backward"]
DT = torch.float64


# --- helpers ------------------------------------------------------------------------------------


def flatten(tree: dict[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) if batched else t.reshape(-1) for t in tree.values()], -1)


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, t in like.items():
        out[name] = flat[i : i + t.numel()].view(t.shape)
        i += t.numel()
    return out


def dense_hessian(loss_fn, params):
    return torch.autograd.functional.hessian(lambda flat: loss_fn(unflatten(flat, params)), flatten(params))


def dense_gauss_newton(loss: SoftmaxCrossEntropy, params):
    """J^T H_l J from the Jacobian of the logits and the per-token CE Hessian at the logits."""

    def logits_of(flat):
        ps = unflatten(flat, params)
        weight, bias = loss.head(ps)
        return F.linear(loss.features(ps), weight, bias) * loss.logit_scale

    flat = flatten(params)
    logits = logits_of(flat).detach()
    jac = torch.autograd.functional.jacobian(logits_of, flat)  # [T, V, P]
    p = torch.softmax(logits, -1)
    w = torch.where(loss.labels == -100, 0.0, loss.token_weights)
    h = w[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])  # [T, V, V]
    return torch.einsum("tap,tab,tbq->pq", jac, h, jac)


def assert_products(got: dict, dense: torch.Tensor, vectors: dict, rtol: float):
    want = flatten(vectors, batched=True) @ dense  # dense is symmetric
    err = (flatten(got, batched=True) - want).abs().max().item()
    assert err <= rtol * want.abs().max().item() + 1e-12, (err, want.abs().max().item())


def random_vectors(params, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


# --- a tiny MLP classifier ----------------------------------------------------------------------


def tiny_mlp(seed=0, logit_scale=1.0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=g, dtype=DT)
    labels = torch.randint(0, 5, (9,), generator=g)
    if ignore:
        labels[3] = -100
    params = {
        "w1": torch.randn(6, 4, generator=g, dtype=DT) * 0.7,
        "b1": torch.randn(6, generator=g, dtype=DT) * 0.1,
        "w2": torch.randn(5, 6, generator=g, dtype=DT) * 0.7,
        "b2": torch.randn(5, generator=g, dtype=DT) * 0.1,
    }
    loss = SoftmaxCrossEntropy(
        features=lambda ps: torch.tanh(F.linear(x, ps["w1"], ps["b1"])),
        weight="w2",
        bias="b2",
        labels=labels,
        token_weights=torch.full((9,), 1 / 8, dtype=DT),
        logit_scale=logit_scale,
    )
    return loss, params


@pytest.mark.parametrize("method", METHODS)
def test_mlp_hessian_matches_dense(method):
    loss, params = tiny_mlp()
    vectors = random_vectors(params, 3)
    got = hvp(loss, params, vectors, method=method)
    assert set(got) == set(params) and all(got[n].shape == vectors[n].shape for n in params)
    assert_products(got, dense_hessian(loss, params), vectors, 1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("logit_scale", [1.0, 2.5])
@pytest.mark.parametrize("names", [("w1", "b1", "w2", "b2"), ("w1",), ("w2", "b2")])
def test_mlp_gauss_newton_matches_dense(method, logit_scale, names):
    loss, params = tiny_mlp(logit_scale=logit_scale)
    frozen = {n: p for n, p in params.items() if n not in names}
    params = {n: p for n, p in params.items() if n in names}
    features = loss.features
    loss.features = lambda ps: features({**frozen, **ps})
    if "w2" in frozen:  # a frozen head is a tensor, not a name
        loss.weight, loss.bias = frozen["w2"], frozen["b2"]
    vectors = random_vectors(params, 4)
    got = hvp(loss, params, vectors, curvature="gauss_newton", method=method, chunk_rows=2)
    dense = dense_gauss_newton(loss, params)
    assert_products(got, dense, vectors, 1e-10)
    assert torch.linalg.eigvalsh(dense).min() > -1e-12  # PSD, unlike the Hessian
    quad = (flatten(got, batched=True) * flatten(vectors, batched=True)).sum(-1)
    assert torch.all(quad >= -1e-12)


def test_list_params_single_vector_and_chunking():
    loss, params = tiny_mlp()
    names = list(params)
    as_list = lambda ps: loss(dict(zip(names, ps)))  # noqa: E731
    vectors = random_vectors(params, 5, seed=1)
    batched = hvp(loss, params, vectors)
    got = hvp(as_list, list(params.values()), list(vectors.values()), chunk_size=2)
    assert isinstance(got, list)
    for n, t in zip(names, got):
        torch.testing.assert_close(t, batched[n], rtol=1e-12, atol=1e-12)
    single = hvp(loss, params, {n: v[2] for n, v in vectors.items()}, method="double_backward", chunk_size=1)
    for n in names:
        torch.testing.assert_close(single[n], batched[n][2], rtol=1e-10, atol=1e-12)


def test_parameter_the_loss_is_linear_in_has_zero_rows():
    x = torch.randn(5, dtype=DT)
    params = {"a": torch.randn(5, dtype=DT), "c": torch.randn((), dtype=DT)}
    loss = lambda ps: (ps["a"] * x).pow(2).sum() + ps["c"]  # noqa: E731
    vectors = random_vectors(params, 2)
    for method in METHODS:
        got = hvp(loss, params, vectors, method=method)
        torch.testing.assert_close(got["a"], 2 * x**2 * vectors["a"])
        assert torch.all(got["c"] == 0)


class _CubeNoJvp(torch.autograd.Function):
    """x**3 with a twice-differentiable backward but no forward-mode AD."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_auto_falls_back_to_double_backward():
    params = {"x": torch.randn(4, dtype=DT)}
    loss = lambda ps: _CubeNoJvp.apply(ps["x"]).sum()  # noqa: E731
    vectors = random_vectors(params, 3)
    with pytest.raises(NotImplementedError, match="jvp"):
        hvp(loss, params, vectors, method="forward_over_reverse")
    with pytest.warns(UserWarning, match="double backward"):
        got = hvp(loss, params, vectors)
    torch.testing.assert_close(got["x"], 6 * params["x"] * vectors["x"])


def test_hutchinson_is_mean_of_probe_products_and_converges():
    loss, params = tiny_mlp()
    dense = dense_hessian(loss, params)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    est = hutchinson_diagonal(loss, params, num_probes=6, generator=g1)
    probes = flatten(sample_probes(params, 6, generator=g2), batched=True)
    assert torch.all(probes.abs() == 1)
    torch.testing.assert_close(flatten(est), (probes * (probes @ dense)).mean(0), rtol=1e-10, atol=1e-12)

    diag = torch.diagonal(dense)
    for distribution in ("rademacher", "gaussian"):
        g = torch.Generator().manual_seed(0)
        est = flatten(hutchinson_diagonal(loss, params, num_probes=4000, distribution=distribution, generator=g))
        scale = dense.norm(dim=1).max().item()
        assert (est - diag).abs().max().item() < 0.15 * scale, distribution
    gen = torch.Generator().manual_seed(1)
    gn = hutchinson_diagonal(loss, params, num_probes=3, curvature="gauss_newton", generator=gen)
    assert set(gn) == set(params)


def test_bad_arguments():
    loss, params = tiny_mlp()
    vectors = random_vectors(params, 2)
    with pytest.raises(ValueError, match="method"):
        hvp(loss, params, vectors, method="newton")
    with pytest.raises(ValueError, match="curvature"):
        hvp(loss, params, vectors, curvature="fisher")
    with pytest.raises(TypeError, match="SoftmaxCrossEntropy"):
        hvp(lambda ps: loss(ps), params, vectors, curvature="gauss_newton")
    with pytest.raises(ValueError, match="one K"):
        hvp(loss, params, {**vectors, "w1": vectors["w1"][:1]})
    with pytest.raises(ValueError, match="cover exactly"):
        hvp(loss, params, {"w1": vectors["w1"]})
    with pytest.raises(TypeError, match="float32"):
        hvp(loss, params, {**vectors, "b1": vectors["b1"].float()})
    with pytest.raises(ValueError, match="distribution"):
        sample_probes(params, 2, distribution="uniform")


# --- a tiny Llama (eager attention), LoRA-sized subsets ------------------------------------------


def tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=17,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(DT).eval()


def llama_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 17, (2, 6), generator=g)
    # Right padding: in float64, transformers' eager attention turns left-padded rows into NaN.
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    labels = input_ids.clone()
    labels[:, :2] = -100
    labels[1, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# RMSNorm and RoPE of transformers compute in float32 even in a float64 model: ~1e-7 relative.
LLAMA_RTOL = 2e-6


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_llama_subset_hessian_and_gauss_newton(tie, method):
    model = tiny_llama(tie)
    batch = llama_batch()
    names = ["model.layers.1.self_attn.v_proj.weight", "model.layers.0.post_attention_layernorm.weight"]
    names.append("model.embed_tokens.weight" if tie else "lm_head.weight")
    with hvp_safe(model):
        loss, params = make_loss_fn(model, batch, names)
        assert loss.weight == names[-1]  # the head is trained (tied: through the embedding's name)
        # The loss is the mean CE of the labelled next tokens, as the model computes it.
        torch.testing.assert_close(loss(params).float(), model(**batch).loss, rtol=1e-6, atol=1e-6)
        vectors = random_vectors(params, 3)
        got = hvp(loss, params, vectors, method=method)
        assert_products(got, dense_hessian(loss, params), vectors, LLAMA_RTOL)
        got = hvp(loss, params, vectors, method=method, curvature="gauss_newton", chunk_rows=3)
        assert_products(got, dense_gauss_newton(loss, params), vectors, LLAMA_RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_peft_lora_adapters(method):
    model = tiny_llama(tie=True)
    peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in peft.named_parameters():  # move B off zero, where the Hessian is degenerate
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    with hvp_safe(peft):
        loss, params = make_loss_fn(peft, llama_batch(seed=1))
        assert len(params) == 8 and all("lora_" in n for n in params)
        assert isinstance(loss.weight, torch.Tensor)  # the frozen head
        vectors = random_vectors(params, 2)
        got = hvp(loss, params, vectors, method=method)
        assert_products(got, dense_hessian(loss, params), vectors, LLAMA_RTOL)
        got = hvp(loss, params, vectors, method=method, curvature="gauss_newton")
        assert_products(got, dense_gauss_newton(loss, params), vectors, LLAMA_RTOL)
        batched = hutchinson_diagonal(loss, params, num_probes=4, generator=torch.Generator().manual_seed(3))
        probes = sample_probes(params, 4, generator=torch.Generator().manual_seed(3))
        one_by_one = [hvp(loss, params, {n: u[k] for n, u in probes.items()}) for k in range(4)]
        for n in params:
            want = torch.stack([probes[n][k] * one_by_one[k][n] for k in range(4)]).mean(0)
            torch.testing.assert_close(batched[n], want, rtol=1e-9, atol=1e-12)


def test_make_loss_fn_errors():
    model = tiny_llama(tie=False)
    with pytest.raises(KeyError, match="no parameters"):
        make_loss_fn(model, llama_batch(), ["model.nope"])
    batch = llama_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no labelled tokens"):
        make_loss_fn(model, batch, ["lm_head.weight"])
