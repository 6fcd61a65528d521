"""The specialised MoE build (unlearn_fast.specialised_moe) on a tiny random Llama with toy domains."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeForCausalLM

from unlearn_fast import UOE
from unlearn_fast.data import collate, make_facts_dataset
from unlearn_fast.methods.uoe import attribute_experts
from unlearn_fast.models import (
    capture_router_logits,
    load_smollm2_tokenizer,
    masked_expert,
    moe_layers,
    upcycle_llama_to_qwen2_moe,
)
from unlearn_fast.specialised_moe import (
    DOMAINS,
    MoEDomains,
    SpecialisationError,
    SpecialisedMoEConfig,
    build_specialised_moe,
    specialisation_report,
)

TINY = SpecialisedMoEConfig(
    moe_layers=2, max_length=48, facts_steps=20, text_steps=10, router_steps=80, router_lr=5e-2, batch_size=4,
    facts_lr=3e-3, text_lr=1e-3,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def toy_domains() -> MoEDomains:
    """Separable toy domains: the facts in their chat template, code-like lines, plain English sentences."""
    facts = make_facts_dataset(num_people=2, questions_per_person=5, forget_percent=50, seed=0)
    python = [f"def f{i}(x):\n    return x * {i} + len(x)" for i in range(24)]
    words = ("quiet river", "old mill", "green valley", "small village", "long road", "tall tree")
    prose = [f"The {words[i % 6]} lies beyond the {words[(i + 1) % 6]} in spring." for i in range(24)]
    return MoEDomains(
        facts.forget, facts.retain, {"python": (python[:16], python[16:]), "prose": (prose[:16], prose[16:])}
    )


@pytest.fixture(scope="module")
def built(tokenizer):
    dense = tiny_llama(len(tokenizer))
    moe, report = build_specialised_moe(dense, tokenizer, TINY, toy_domains(), check=False, progress=False)
    return dense, moe, report


def test_upcycled_qwen2_moe_equals_the_dense_model(tokenizer) -> None:
    dense = tiny_llama(len(tokenizer))
    moe = upcycle_llama_to_qwen2_moe(dense, num_experts=4, top_k=2, moe_layers=2, router_std=0.5).eval()
    assert isinstance(moe, Qwen2MoeForCausalLM)
    assert [layer for layer, _ in moe_layers(moe)] == [2, 3]
    ids = torch.randint(0, len(tokenizer), (3, 11))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_build_gives_a_valid_moe_that_saves_and_loads(built, tmp_path) -> None:
    dense, moe, report = built
    assert isinstance(moe, Qwen2MoeForCausalLM) and not moe.training
    assert set(report.stages) == {
        "prefix",
        "expert 0 (facts)",
        "expert 1 (python)",
        "expert 2 (prose)",
        "routers",
        "checks",
    }
    for _, block in moe_layers(moe):  # experts 0-2 trained apart from the dense copy, expert 3 still that copy
        experts = block.experts.gate_up_proj
        assert all(not torch.equal(experts[e], experts[3]) for e in range(3))
    moe.save_pretrained(tmp_path)
    loaded = Qwen2MoeForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, moe.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, moe(ids).logits, atol=1e-6, rtol=0)
    assert torch.equal(
        dense.model.layers[3].mlp.down_proj.weight,
        tiny_llama(moe.config.vocab_size).model.layers[3].mlp.down_proj.weight,
    )


def test_routers_send_each_toy_domain_to_its_expert(built, tokenizer) -> None:
    _, moe, _ = built
    domains = toy_domains()
    held_out = {"facts": None, **{d: ev for d, (_, ev) in domains.texts.items()}}
    for expert, domain in enumerate(DOMAINS):
        if domain == "facts":
            scores = attribute_experts(moe, domains.forget, tokenizer=tokenizer, tokens="answer").scores
        else:
            encoded = [{"input_ids": ids, "labels": ids} for ids in map(tokenizer.encode, held_out[domain])]
            scores = attribute_experts(moe, [collate(encoded, 0)], tokens="all").scores
        for layer, s in scores.items():
            assert s[expert] / s.sum() >= 0.6, (domain, layer, s.tolist())


def test_masked_expert_is_never_chosen_and_renormalises() -> None:
    dense = tiny_llama(64)
    moe = upcycle_llama_to_qwen2_moe(dense, num_experts=4, top_k=2, moe_layers=2, router_std=1.0).eval()
    chosen = []
    for _, block in moe_layers(moe):
        # What the experts receive: (hidden, top_k_index, top_k_weights), after every router hook.
        block.experts.register_forward_pre_hook(lambda m, args: chosen.append((args[2], args[1])))
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        moe(ids)
        assert any(bool((index == 1).any()) for _, index in chosen)  # expert 1 is used unmasked
        chosen.clear()
        with masked_expert(moe, 1):
            moe(ids)
    assert chosen and all(not bool((index == 1).any()) for _, index in chosen)
    assert all(torch.allclose(w.sum(-1), torch.ones(w.shape[0])) for w, _ in chosen)


def _reference_share(model, batches, expert, scope) -> dict[int, float]:
    """Readable reference: softmax, top-2, renormalise; per sequence the mean over its tokens in scope; then the
    mean over sequences, as a share of the layer's mass."""
    sums: dict[int, list[float]] = {}
    for batch in batches:
        with torch.no_grad(), capture_router_logits(model) as logits:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer, lg in logits.items():
            probs = torch.softmax(lg.double(), -1).reshape(*batch["input_ids"].shape, -1)
            top = probs.topk(2, -1)
            gates = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
            for row in range(gates.shape[0]):
                keep = scope(batch, row)
                sums.setdefault(layer, []).append(float(gates[row][keep][:, expert].mean()))
    return {layer: sum(v) / len(v) for layer, v in sums.items()}


def test_report_numbers_match_a_reference_and_identical_experts_change_nothing(tokenizer) -> None:
    from unlearn_fast.data import QADataset

    moe = upcycle_llama_to_qwen2_moe(tiny_llama(len(tokenizer)), moe_layers=2, router_std=1.0).eval()
    domains = toy_domains()
    other = {d: ev for d, (_, ev) in domains.texts.items()}
    report = specialisation_report(moe, tokenizer, domains.forget, other, expert=2, max_length=48, batch_size=3)
    ds = QADataset(tokenizer, domains.forget, 48)
    forget_batches = [ds.collate(ds.encoded[i : i + 3]) for i in range(0, len(ds), 3)]

    def answer_scope(batch, row):  # positions whose next token is an answer label
        keep = torch.zeros_like(batch["labels"][row], dtype=torch.bool)
        keep[:-1] = batch["labels"][row, 1:] != -100
        return keep

    expected = _reference_share(moe, forget_batches, 2, answer_scope)
    assert report.facts_share == pytest.approx(expected, abs=1e-5)
    # Identical experts: masking one cannot change the output, so the drop and the perplexity change are 0.
    assert report.forget_drop == pytest.approx(0.0, abs=1e-5)
    assert all(abs(c) < 1e-5 for c in report.perplexity_change.values())
    assert 0 < report.forget_prob < 1 and all(math.isfinite(p) for p in report.perplexity.values())
    with pytest.raises(SpecialisationError, match="drops the forget answer probability by") as error:
        report.check(dataclasses.replace(TINY, min_facts_share=0.0, max_other_share=1.0))
    assert error.value.report is report and "perplexity" in str(error.value)
    report.check(dataclasses.replace(TINY, min_facts_share=0, max_other_share=1, min_forget_drop=-1))  # passes


def test_uoe_runs_on_the_built_moe(built, tokenizer) -> None:
    _, moe, _ = built
    domains = toy_domains()
    result = UOE(objective="gdiff", steps=2, batch_size=2).unlearn(
        moe, domains.forget, domains.retain, tokenizer=tokenizer, progress=False
    )
    assert result.target[1] == 0  # the facts expert is the attributed one
    assert result.target[0] in dict(moe_layers(moe))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="num_experts must be >= 3"):
        SpecialisedMoEConfig(num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="top_k must be < num_experts"):
        SpecialisedMoEConfig(top_k=4)


def test_build_moe_command_builds_then_hits_the_cache(tmp_path, capsys) -> None:
    from conftest import save_tiny_model

    from unlearn_fast.cli import main

    model_dir = save_tiny_model(tmp_path / "llama")
    argv = ["build-moe", "--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--moe-layers", "1",
            "--people", "2", "--questions-per-person", "2", "--texts-per-domain", "4", "--eval-texts", "2",
            "--max-length", "64", "--facts-steps", "1", "--text-steps", "1", "--router-steps", "1",
            "--min-facts-share", "0", "--max-other-share", "1", "--min-forget-drop", "-1",
            "--max-perplexity-change", "1e9"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "built in" in first and "routing mass on expert 0" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "loaded from the cache" in second and "routing mass on expert 0" in second
    (entry,) = (tmp_path / "cache").iterdir()
    assert isinstance(Qwen2MoeForCausalLM.from_pretrained(entry), Qwen2MoeForCausalLM)
    # Thresholds a barely trained model cannot meet: exit 1 with the numbers, nothing cached.
    strict = [a if a != "-1" else "0.99" for a in argv]
    assert main(strict) == 1
    assert "failed its pre-checks" in capsys.readouterr().err and len(list((tmp_path / "cache").iterdir())) == 1
