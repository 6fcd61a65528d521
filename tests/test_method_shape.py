"""One method shape: every method runs config -> run -> result -> save -> load the same way, and the
loaded weights reproduce the result (its parameters bitwise, its forget metric exactly)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_llmeraser import CharTokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast import (
    SOUL,
    UOE,
    LLMEraser,
    LLMEraserConfig,
    SOULConfig,
    UnlearnResult,
    UOEConfig,
)
from unlearn_fast.data import QADataset
from unlearn_fast.evaluate import sequence_logprobs
from unlearn_fast.models import tiny_moe
from unlearn_fast.objectives import NPO

TOK = CharTokenizer()
# Rows in three of the accepted forms: every method reads them through one data entry point.
FORGET = [{"question": f"who is p{i}?", "answer": f"a{i}b"} for i in range(4)]
RETAIN = [(f"where is c{i}?", f"in x{i}") for i in range(4)]


def lora_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).eval()
    return get_peft_model(
        base,
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False
        ),
    )


def forget_logp(model: torch.nn.Module) -> float:
    dataset = QADataset(TOK, [(r["question"], r["answer"]) for r in FORGET])
    with torch.no_grad():
        return float(
            sequence_logprobs(model, dataset.collate([dataset[i] for i in range(len(dataset))])).sum_logp.sum()
        )


def run_soul(model):
    return SOUL(SOULConfig(objective=NPO(beta=0.5), lr=1e-2, steps=3, batch_size=2)).unlearn(
        model, FORGET, RETAIN, tokenizer=TOK, progress=False
    )


def run_uoe(model):
    return UOE(UOEConfig(objective="gdiff", lr=1e-2, steps=3, batch_size=2)).unlearn(
        model, FORGET, RETAIN, tokenizer=TOK, progress=False
    )


def run_llmeraser(model):
    train = FORGET + [{"question": q, "answer": a} for q, a in RETAIN]
    return LLMEraser(model, train, LLMEraserConfig(solver="cg", damping=1e-1, check_fit=False), tokenizer=TOK).remove(
        [0, 1], progress=False
    )


@pytest.mark.parametrize(
    "method, make_model, run",
    [
        ("soul", lora_llama, run_soul),
        ("uoe", lambda: tiny_moe("qwen2_moe", vocab_size=128), run_uoe),
        ("llmeraser", lora_llama, run_llmeraser),
    ],
)
def test_config_run_result_save_load(tmp_path, method, make_model, run):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = run(model)
    assert isinstance(result, UnlearnResult) and result.method == method
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "the caller's model changed"
    assert result.trained and result.history and result.metrics and result.wall_time_s > 0
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed and changed <= set(result.trained), "a parameter changed that the result does not record"

    path = result.save(tmp_path / method)
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "result.json", "weights.safetensors"]
    assert json.loads((path / "config.json").read_text()) == result.config.to_dict()
    with pytest.raises(FileExistsError):
        result.save(path)
    result.save(path, overwrite=True)

    loaded = UnlearnResult.load(path, model)
    assert loaded.method == method and loaded.history == json.loads(json.dumps(result.history))
    for (name, p), q in zip(result.model.named_parameters(), loaded.model.parameters()):
        assert torch.equal(p, q), name
    assert forget_logp(loaded.model) == forget_logp(result.model) != forget_logp(model)
    assert type(result.config).from_dict(loaded.config).to_dict() == result.config.to_dict()


def test_loading_into_another_model_is_a_clear_error(tmp_path):
    result = run_soul(lora_llama())
    result.save(tmp_path / "r")
    with pytest.raises(ValueError, match="saved from another model"):
        UnlearnResult.load(tmp_path / "r", tiny_moe("mixtral", vocab_size=128))
