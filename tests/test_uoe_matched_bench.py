"""bench/uoe_matched.py: matched-forgetting interpolation, tables, and the facts-expert-only baseline."""

import importlib.util
from pathlib import Path

import pytest
import torch

from unlearn_fast.data import make_facts_dataset
from unlearn_fast.models import load_smollm2_tokenizer, moe_layers, upcycle_llama_to_qwen2_moe

spec = importlib.util.spec_from_file_location("uoe_matched", Path(__file__).parents[1] / "bench" / "uoe_matched.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CURVE = [
    {"step": 0, "forget": 0.9, "retain": 0.8, "world": 0.5, "ppl_python": 4.0, "ppl_prose": 10.0},
    {"step": 4, "forget": 0.5, "retain": 0.7, "world": 0.5, "ppl_python": 4.4, "ppl_prose": 10.0},
    {"step": 8, "forget": 0.1, "retain": 0.3, "world": 0.4, "ppl_python": 5.2, "ppl_prose": 12.0},
]


def test_at_level_interpolates_at_the_first_crossing() -> None:
    point, reached = bench.at_level(CURVE, 0.3)  # halfway between steps 4 and 8
    assert reached
    assert point == pytest.approx({"step": 6, "forget": 0.3, "retain": 0.5, "world": 0.45, "ppl_python": 4.8,
                                   "ppl_prose": 11.0})  # fmt: skip
    assert bench.at_level(CURVE, 0.5)[0]["step"] == pytest.approx(4)  # exactly at an evaluation
    assert bench.at_level(CURVE, 0.95) == (CURVE[0], True)  # already below before any step
    point, reached = bench.at_level(CURVE, 0.05)  # never reached: the last point, marked
    assert not reached and point == CURVE[-1]
    # A trajectory that dips, recovers and dips again: the first crossing counts.
    bumpy = [dict(CURVE[0]), {**CURVE[1], "forget": 0.2}, {**CURVE[2], "forget": 0.6}]
    assert bench.at_level(bumpy, 0.4)[0]["step"] == pytest.approx(4 * (0.9 - 0.4) / (0.9 - 0.2))


def test_matched_table_reports_mean_sd_over_seeds_and_reached_counts() -> None:
    late = [{**p, "forget": p["forget"] + 0.3} for p in CURVE]  # this seed never reaches 0.3
    runs = {"A": [{"curve": CURVE, "trained": 10, "time_s": 1.0}, {"curve": late, "trained": 10, "time_s": 3.0}]}
    lines = bench.matched_table(runs, 0.3, CURVE[0])
    row = lines[-1]
    assert row.startswith("| A | 1/2 | 7.000 ± 1.414 | 0.400 ± 0.141 |")  # steps 6 and 8, retain 0.5 and 0.3
    assert "| 2.000 ± 1.414 |" in row and "| 10 |" in row
    assert "| 25.000 ± 7.071 | 15.000 ± 7.071 |" in row  # ppl python +20% and +30%, prose +10% and +20%
    assert bench.mean_sd([1.0]) == "1.000 ± 0.000"


def test_routing_table_rows() -> None:
    lines = bench.routing_table({"UOE": {"forget": (0.9, 0.5), "python": (0.05, 0.04)}})
    assert lines[0] == "| run | forget | python |"
    assert lines[2] == "| UOE | 90.0% → 50.0% | 5.0% → 4.0% |"


def test_facts_expert_graddiff_moves_only_expert_zero() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    moe = upcycle_llama_to_qwen2_moe(LlamaForCausalLM(config), moe_layers=2, router_std=1.0).eval()
    facts = make_facts_dataset(num_people=2, questions_per_person=3, forget_percent=50)
    out, trained, _ = bench.facts_expert_graddiff(
        moe, tokenizer, facts.forget, facts.retain, 1e-2, 2, 0, lambda *a: None
    )
    before, after = dict(moe.named_parameters()), dict(out.named_parameters())
    for name, p in before.items():
        if "experts." in name:
            assert not torch.equal(after[name][0], p[0]), name  # expert 0 trained
            assert torch.equal(after[name][1:], p[1:]), name  # the others exactly kept
        else:
            assert torch.equal(after[name], p), name  # routers, attention, embeddings untouched
    assert trained == sum(block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel()
                          for _, block in moe_layers(moe))  # fmt: skip
