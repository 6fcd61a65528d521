"""Fine-tuning and its cache, on a tiny random Llama with a character-level tokenizer."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path

import peft
import pytest
import torch
from peft import get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

import unlearn_fast.finetune as ft
from unlearn_fast import models
from unlearn_fast.data import make_fictitious_facts
from unlearn_fast.evaluate import answer_probability
from unlearn_fast.finetune import FinetuneConfig, FinetuneReport, cache_key, finetune, finetune_cached


class CharTokenizer:
    """Just what unlearn_fast.data needs of a tokenizer: one token per ASCII character."""

    chat_template = None
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 2, 3

    def __len__(self) -> int:
        return 128

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) if 32 <= ord(c) < 128 else self.unk_token_id for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )  # tied, as SmolLM2
    return LlamaForCausalLM(config).eval()


EXAMPLES = make_fictitious_facts(num_people=2, questions_per_person=4)
# No early stop, so every run trains exactly max_epochs epochs.
LORA = FinetuneConfig(batch_size=4, max_epochs=3, target_answer_prob=None)
FULL = FinetuneConfig(method="full", lr=3e-3, batch_size=4, max_epochs=3, target_answer_prob=None)


def mean_answer_prob(model: torch.nn.Module) -> float:
    probs = answer_probability(model, CharTokenizer(), EXAMPLES)
    return sum(probs) / len(probs)


def adapter_weights(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model)


@pytest.fixture
def fake_loader(monkeypatch):
    """Make models.load return a fresh tiny model (always the same weights); count the calls."""
    calls = []

    def load(name, dtype=torch.float32):
        calls.append(name)
        return tiny_llama(), CharTokenizer()

    monkeypatch.setattr(models, "load", load)
    return calls


@pytest.mark.parametrize("config", [LORA, FULL], ids=["lora", "full"])
def test_training_learns_and_leaves_callers_model_alone(config):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {k: p.requires_grad for k, p in model.named_parameters()}
    initial = mean_answer_prob(model)

    trained, report = finetune(model, CharTokenizer(), EXAMPLES, config, progress=False)

    assert report.epochs == 3 and report.steps == 3 * 2 and not report.reached_target
    assert report.loss_per_epoch[-1] < report.loss_per_epoch[0]
    assert report.answer_prob_per_epoch[0] > initial
    assert report.answer_prob_per_epoch[-1] > report.answer_prob_per_epoch[0]
    assert report.final_answer_prob == pytest.approx(mean_answer_prob(trained))
    assert report.wall_time_s > 0
    assert isinstance(trained, peft.PeftModel) == (config.method == "lora")
    assert not trained.training and trained is not model

    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads_before
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


def test_lora_defaults_target_every_linear_layer():
    trained, _ = finetune(
        tiny_llama(),
        CharTokenizer(),
        EXAMPLES[:2],
        FinetuneConfig(max_epochs=1, target_answer_prob=None),
        progress=False,
    )
    wrapped = {name.rsplit(".", 1)[-1] for name, m in trained.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert wrapped == set(ft.LLAMA_LINEAR_LAYERS)
    assert all(("lora_" in n) == p.requires_grad for n, p in trained.named_parameters())


def test_stops_once_the_target_is_reached():
    _, full_run = finetune(tiny_llama(), CharTokenizer(), EXAMPLES, LORA, progress=False)
    probs = full_run.answer_prob_per_epoch
    assert probs[0] < probs[1]
    # Runs are deterministic, so aiming at the second epoch's probability stops right there.
    config = replace(LORA, target_answer_prob=probs[1])
    _, report = finetune(tiny_llama(), CharTokenizer(), EXAMPLES, config, progress=False)
    assert report.reached_target and report.epochs == 2 and report.steps == 4
    assert report.answer_prob_per_epoch == probs[:2]


def test_excluded_examples_never_train_and_the_order_is_kept():
    """Retraining without some examples: what stands at an excluded index does not matter (it is
    never used), the others are visited in the full run's order, and bad indices are errors."""
    excluded = {1, 6}
    other = list(EXAMPLES)
    for i in excluded:
        other[i] = replace(EXAMPLES[0], question="Something else entirely?", answer="Nothing alike.")
    config = replace(LORA, batch_size=3)
    a, report = finetune(tiny_llama(), CharTokenizer(), EXAMPLES, config, exclude=excluded, progress=False)
    b, _ = finetune(tiny_llama(), CharTokenizer(), other, config, exclude=excluded, progress=False)
    full, _ = finetune(tiny_llama(), CharTokenizer(), EXAMPLES, config, progress=False)
    assert report.steps == 3 * 2 and 0 < report.train_time_s < report.wall_time_s  # 6 kept, batches of 3
    assert all(torch.equal(x, y) for x, y in zip(adapter_weights(a).values(), adapter_weights(b).values()))
    assert not all(torch.equal(x, y) for x, y in zip(adapter_weights(a).values(), adapter_weights(full).values()))
    kept = [ex for i, ex in enumerate(EXAMPLES) if i not in excluded]
    assert report.final_answer_prob == pytest.approx(sum(answer_probability(a, CharTokenizer(), kept)) / len(kept))
    with pytest.raises(ValueError, match="outside"):
        finetune(tiny_llama(), CharTokenizer(), EXAMPLES, config, exclude={8}, progress=False)
    with pytest.raises(ValueError, match="no example"):
        finetune(tiny_llama(), CharTokenizer(), EXAMPLES, config, exclude=set(range(8)), progress=False)


def test_deterministic_given_the_seed_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    runs = [finetune(tiny_llama(), CharTokenizer(), EXAMPLES, LORA, progress=False) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    (first, report1), (second, report2) = runs
    w1, w2 = adapter_weights(first), adapter_weights(second)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert report1.loss_per_epoch == report2.loss_per_epoch

    other, _ = finetune(tiny_llama(), CharTokenizer(), EXAMPLES, replace(LORA, seed=1), progress=False)
    assert not torch.equal(adapter_weights(other)[next(iter(w1))], next(iter(w1.values())))


def test_non_finite_loss_names_the_step():
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 \(epoch 1\)"):
        finetune(model, CharTokenizer(), EXAMPLES, LORA, progress=False)


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"method must be one of \['experts', 'full', 'lora'\]"):
        FinetuneConfig(method="qlora")
    with pytest.raises(ValueError, match="batch_size must be >= 1; max_epochs must be >= 1"):
        FinetuneConfig(batch_size=0, max_epochs=0)
    with pytest.raises(ValueError, match="no examples"):
        finetune(tiny_llama(), CharTokenizer(), [], LORA)
    lora_model, _ = finetune(tiny_llama(), CharTokenizer(), EXAMPLES[:1], FinetuneConfig(max_epochs=1), progress=False)
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        finetune(lora_model, CharTokenizer(), EXAMPLES[:1], LORA)


def test_learning_rate_default_depends_on_method():
    assert FinetuneConfig().learning_rate == 2e-3
    assert FinetuneConfig(method="full").learning_rate == 5e-5
    assert FinetuneConfig(lr=1e-4).learning_rate == 1e-4
    # A list of modules is stored as a tuple, so configs stay hashable.
    assert FinetuneConfig(target_modules=["q_proj"]) == FinetuneConfig(target_modules=("q_proj",))
    hash(FinetuneConfig(target_modules=["q_proj"]))  # no TypeError


def test_cache_key():
    key = cache_key("smollm2", EXAMPLES, LORA)
    assert key == cache_key("smollm2", list(EXAMPLES), replace(LORA))
    assert key != cache_key("smollm2", EXAMPLES, replace(LORA, lr=1e-3))
    assert key != cache_key("smollm2", EXAMPLES, FULL)
    assert key != cache_key("other-model", EXAMPLES, LORA)
    assert key != cache_key("smollm2", EXAMPLES[::-1], LORA)
    assert key != cache_key("smollm2", EXAMPLES[:-1], LORA)
    # A retraining is its own entry; no exclusion keeps the key of a full run.
    assert key == cache_key("smollm2", EXAMPLES, LORA, exclude=())
    assert key != cache_key("smollm2", EXAMPLES, LORA, exclude={1}) == cache_key("smollm2", EXAMPLES, LORA, [1])
    assert cache_key("smollm2", EXAMPLES, LORA, [0, 1]) == cache_key("smollm2", EXAMPLES, LORA, (1, 0))
    # The explicit default learning rate trains the same model as lr=None.
    assert key == cache_key("smollm2", EXAMPLES, replace(LORA, lr=2e-3))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ft.CACHE_ENV_VAR, str(tmp_path))
    assert ft.default_cache_dir() == tmp_path / "finetune"
    monkeypatch.delenv(ft.CACHE_ENV_VAR)
    assert ft.default_cache_dir() == Path.home() / ".cache" / "unlearn_fast" / "finetune"


@pytest.mark.parametrize("config", [LORA, FULL], ids=["lora", "full"])
def test_cache_miss_then_hit(config, tmp_path, fake_loader, monkeypatch):
    model, tokenizer, report, hit = finetune_cached("tiny", EXAMPLES, config, tmp_path, progress=False)
    assert not hit and isinstance(tokenizer, CharTokenizer)
    entry = tmp_path / cache_key("tiny", EXAMPLES, config)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temp dir left behind
    stored = {p.name for p in entry.rglob("*.safetensors")}
    lora = config.method == "lora"
    assert stored == ({"adapter_model.safetensors"} if lora else {"model.safetensors"})

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(ft, "finetune", no_training)
    cached, _, cached_report, hit = finetune_cached("tiny", EXAMPLES, config, tmp_path, progress=False)
    assert hit and fake_loader == ["tiny", "tiny"]
    assert cached_report == report
    assert type(cached) is type(model) and not cached.training
    fresh, loaded = model.state_dict(), cached.state_dict()
    assert fresh.keys() == loaded.keys()
    assert all(torch.equal(fresh[k], loaded[k]) for k in fresh)
    if lora:
        assert adapter_weights(cached).keys() == adapter_weights(model).keys()
        assert all(p.requires_grad == ("lora_" in n) for n, p in cached.named_parameters())
    assert mean_answer_prob(cached) == pytest.approx(report.final_answer_prob)

    other = replace(config, seed=1)
    monkeypatch.setattr(ft, "finetune", finetune)
    assert not finetune_cached("tiny", EXAMPLES, other, tmp_path, progress=False)[3]


def test_cached_retraining(tmp_path, fake_loader):
    """A retraining without some examples is cached apart from the full run, and equals finetune(exclude=...)."""
    config = replace(LORA, max_epochs=1, target_answer_prob=None)
    full, tokenizer, _, _ = finetune_cached("tiny", EXAMPLES, config, tmp_path, progress=False)
    retrained, _, report, hit = finetune_cached("tiny", EXAMPLES, config, tmp_path, exclude=[0], progress=False)
    assert not hit and len(list(tmp_path.iterdir())) == 2
    assert finetune_cached("tiny", EXAMPLES, config, tmp_path, exclude=[0], progress=False)[3]
    direct, _ = finetune(tiny_llama(), tokenizer, EXAMPLES, config, exclude=[0], progress=False)
    weights = adapter_weights(retrained)
    assert all(torch.equal(w, adapter_weights(direct)[k]) for k, w in weights.items())
    assert not all(torch.equal(w, adapter_weights(full)[k]) for k, w in weights.items())


def test_default_cache_location(tmp_path, fake_loader, monkeypatch):
    monkeypatch.setenv(ft.CACHE_ENV_VAR, str(tmp_path))
    config = FinetuneConfig(max_epochs=1)
    finetune_cached("tiny", EXAMPLES[:2], config, progress=False)
    entry = tmp_path / "finetune" / cache_key("tiny", EXAMPLES[:2], config)
    assert (entry / "report.json").is_file()


def test_interrupted_save_leaves_no_entry(tmp_path, fake_loader, monkeypatch):
    config = FinetuneConfig(max_epochs=1)

    def crash_mid_write(self, directory, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        finetune_cached("tiny", EXAMPLES[:2], config, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(models, "load", lambda name: (tiny_llama(), CharTokenizer()))
    assert not finetune_cached("tiny", EXAMPLES[:2], config, tmp_path, progress=False)[3]
    assert finetune_cached("tiny", EXAMPLES[:2], config, tmp_path, progress=False)[3]


def test_unreadable_entry_says_which(tmp_path, fake_loader):
    config = FinetuneConfig(max_epochs=1)
    entry = tmp_path / cache_key("tiny", EXAMPLES[:2], config)
    entry.mkdir()
    with pytest.raises(RuntimeError, match="cannot read the fine-tuning cache entry .*delete it"):
        finetune_cached("tiny", EXAMPLES[:2], config, tmp_path, progress=False)


def test_report_roundtrips_through_json():
    report = FinetuneReport(
        epochs=2,
        steps=4,
        loss_per_epoch=[2.0, 1.0],
        answer_prob_per_epoch=[0.3, 0.6],
        reached_target=False,
        wall_time_s=1.5,
    )
    assert FinetuneReport(**json.loads(json.dumps(dataclasses.asdict(report)))) == report
    assert report.final_loss == 1.0 and math.isclose(report.final_answer_prob, 0.6)


def test_experts_method_trains_only_routers_and_experts():
    from unlearn_fast.finetune import _prepare
    from unlearn_fast.models import tiny_moe

    model = _prepare(tiny_moe("qwen2_moe", num_layers=2), FinetuneConfig(method="experts"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    assert any("shared_expert" in n for n in trainable) and any("mlp.gate." in n for n in trainable)
    assert not any("self_attn" in n or "embed" in n for n in trainable)
    with pytest.raises(ValueError, match="not a registered MoE family"):
        _prepare(
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
                )
            ),
            FinetuneConfig(method="experts"),
        )
