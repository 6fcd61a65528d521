"""End-to-end method timings on small random models, each against its baseline in the same run.

* SOUL (20 steps, GradDiff): Sophia-G, and Sophia with Hutchinson, against the same run with AdamW.
* UOE (20 steps, GA, target layer 3 of 4): with and without prefix caching, against GA on all
  parameters (SOUL's loop with AdamW).
* LLMEraser removing 2 of 20 examples (qp and cg solves, λ = 1e-2, at most 320 curvature
  products as in the demo; the eraser's construction and fit check included) against retraining
  the LoRA without them (``finetune(exclude=)``). With n = 20 retraining is cheap: this group
  shows where the influence step does not pay, next to docs/RESULTS.md's n = 500 and 2,000.

The Llama has SmolLM2's tokenizer and vocabulary (49,152) but 4 layers of width 64, so the figures
say how the methods' costs compare, not how long SmolLM2 takes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast import SOUL, UOE, LLMEraser
from unlearn_fast.data import make_fictitious_facts
from unlearn_fast.finetune import FinetuneConfig, finetune
from unlearn_fast.models import load_smollm2_tokenizer, tiny_moe

FACTS = make_fictitious_facts(num_people=4, questions_per_person=5)
FORGET, RETAIN = FACTS[:4], FACTS[4:]
FINETUNE = FinetuneConfig(lora_rank=4, lr=1e-2, batch_size=4, max_epochs=5, target_answer_prob=None)


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def finetuned(tokenizer):
    model, _ = finetune(tiny_llama(len(tokenizer)), tokenizer, FACTS, FINETUNE, progress=False)
    return model


def moe_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (4, 24), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


SOUL_RUNS = {"adamw": {"optimizer": "adamw"}, "sophia gnb": {}, "sophia hutchinson": {"estimator": "hutchinson"}}


@pytest.mark.parametrize("impl", list(SOUL_RUNS))
def test_soul(benchmark, impl, finetuned, tokenizer):
    soul = SOUL(objective="gdiff", lr=1e-4, steps=20, hessian_interval=5, **SOUL_RUNS[impl])
    benchmark.group = "method: SOUL, 20 steps (tiny Llama + LoRA)"
    benchmark.extra_info.update(impl=impl, baseline="adamw", shape="4 layers x 64, batch 4, LoRA r=4")
    benchmark.pedantic(
        lambda: soul.unlearn(finetuned, FORGET, RETAIN, tokenizer=tokenizer, progress=False), rounds=2, warmup_rounds=1
    )


UOE_RUNS = {"all parameters, AdamW": None, "UOE": True, "UOE without prefix cache": False}


@pytest.mark.parametrize("impl", list(UOE_RUNS))
def test_uoe(benchmark, impl):
    model = tiny_moe("mixtral", num_layers=4, hidden_size=64)
    forget, retain = moe_batches(2, seed=1), moe_batches(2, seed=2)
    if UOE_RUNS[impl] is None:
        method = SOUL(objective="ga", optimizer="adamw", lr=5e-5, steps=20, batch_size=4, max_grad_norm=None)
    else:
        method = UOE(objective="ga", steps=20, target=(3, 0), prefix_cache=UOE_RUNS[impl])
    benchmark.group = "method: UOE, 20 steps (tiny Mixtral, 4 experts)"
    benchmark.extra_info.update(impl=impl, baseline="all parameters, AdamW", shape="4 layers x 64, batch 4")
    benchmark.pedantic(lambda: method.unlearn(model, forget, retain, progress=False), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["retrain", "llmeraser qp", "llmeraser cg"])
def test_llmeraser(benchmark, impl, finetuned, tokenizer):
    removed = [0, 1]
    benchmark.group = "method: LLMEraser removing 2 of 20 examples (tiny Llama + LoRA)"
    benchmark.extra_info.update(impl=impl, baseline="retrain", shape=f"{FINETUNE.max_epochs} epochs, LoRA r=4")
    if impl == "retrain":
        base = tiny_llama(len(tokenizer))

        def run():
            return finetune(base, tokenizer, FACTS, FINETUNE, exclude=set(removed), progress=False)
    else:
        solver = impl.split()[1]

        def run():
            eraser = LLMEraser(
                finetuned, FACTS, tokenizer=tokenizer, solver=solver, damping=1e-2, tol=1e-3, max_hvps=320
            )
            return eraser.remove(removed, progress=False)

    result = benchmark.pedantic(run, rounds=2)
    if impl != "retrain":
        benchmark.extra_info.update(hvps=result.report.hvps, residual=result.report.residual)
