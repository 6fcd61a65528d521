"""Prefix caching: forwards that skip the frozen bottom layers equal the full forwards."""

import pytest
import torch

from unlearn_fast.models import MOE_FAMILIES, tiny_moe
from unlearn_fast.models.prefix_cache import prefix_cached


def batches(vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for rows, length in ((2, 7), (3, 5)):
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding on one row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_cached_forward_equals_full_forward(family, layer):
    model = tiny_moe(family, num_layers=3)
    data = batches()
    with torch.no_grad():
        want = [model(**b).logits for b in data]
    with prefix_cached(model, layer, data) as cache, torch.no_grad():
        got = [model(**b).logits for b in data]
        assert len(cache.states) == (len(data) if layer else 0) and cache.hits == (len(data) if layer else 0)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    # The skipped layers run again after the context.
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, want[0], rtol=0, atol=0)


def test_gradients_reach_layers_above_the_cache_only():
    model = tiny_moe("mixtral", num_layers=3)
    data = batches()
    with prefix_cached(model, 2, data):
        model(**data[1]).logits.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("model.layers.0.") or n.startswith("model.layers.1."))
    assert grads["model.layers.2.mlp.gate.weight"] is not None


def test_unknown_batch_is_an_error():
    model = tiny_moe("qwen3_moe", num_layers=2)
    data = batches()
    with prefix_cached(model, 1, data[:1]), pytest.raises(KeyError, match="not built for"):
        model(**data[1])
    with pytest.raises(ValueError, match="layer must be in"):
        with prefix_cached(model, 2, data):
            pass


def test_paused_runs_full_forwards_on_any_batch():
    model = tiny_moe("mixtral", num_layers=3)
    data = batches()
    with torch.no_grad():
        want = model(**data[1]).logits
    with prefix_cached(model, 2, data[:1]) as cache, torch.no_grad():
        with cache.paused():
            torch.testing.assert_close(model(**data[1]).logits, want, rtol=0, atol=0)
        with pytest.raises(KeyError):
            model(**data[1])


def test_same_ids_under_different_masks_are_cached_apart():
    # The prefix depends on the attention mask too: a key of the ids alone would serve one
    # batch's hidden states to the other.
    model = tiny_moe("mixtral", num_layers=3)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    full, padded = torch.ones_like(ids), torch.ones_like(ids)
    padded[:, :3] = 0
    data = [{"input_ids": ids, "attention_mask": full}, {"input_ids": ids, "attention_mask": padded}]
    with torch.no_grad():
        want = [model(**b).logits for b in data]
    with prefix_cached(model, 2, data) as cache, torch.no_grad():
        got = [model(**b).logits for b in data]
        assert len(cache.states) == 2
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_known_states_are_reused_without_running_the_bottom_layers():
    # An MoE upcycled from a dense model computes the same bottom layers: the dense model's cache serves it.
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn_fast.models import upcycle_llama_to_qwen2_moe

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    moe = upcycle_llama_to_qwen2_moe(dense, moe_layers=1, router_std=1.0).eval()
    data = batches()
    with torch.no_grad():
        want = [moe(**b).logits for b in data]
    with prefix_cached(dense, 2, data) as dense_cache:
        states = dense_cache.states
    calls = []
    moe.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with prefix_cached(moe, 2, data, states) as cache, torch.no_grad():
        assert not calls  # nothing recomputed on entry
        got = [moe(**b).logits for b in data]
        assert cache.hits == len(data)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
