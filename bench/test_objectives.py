"""One NPO + retain training step on SmolLM2-135M with a LoRA (r=16 on every linear layer, the
fine-tunes' adapter), ours against the peer forgetium (a test extra) in the same run.

``make bench`` (or ``pytest bench/test_objectives.py --benchmark-only``). Both sides take the same
collated batch (4 forget + 4 retain facts) and the same AdamW step on the LoRA weights, so only
the objective differs: ours takes every likelihood through the fused LM-head op and caches the
reference log-probs at ``prepare``; forgetium materialises the [tokens, vocab] logits and keeps a
frozen copy of the model as NPO's reference. tests/test_forgetium_peer.py checks that both compute
the same loss and gradients. Time: one step after ``prepare``; peak memory: ``prepare`` plus two
steps, above the loaded model and batches, in a fresh process each.
"""

import pytest
from conftest import peak_memory_above_inputs

pytest.importorskip("forgetium", reason="the peer is a test extra: pip install -e '.[test]'")

SETUP = """
import torch
from peft import LoraConfig, get_peft_model
from unlearn_fast.data import as_batches, make_fictitious_facts
from unlearn_fast.finetune import FinetuneConfig
from unlearn_fast.models import load_smollm2

torch.manual_seed(0)
model, tokenizer = load_smollm2()
cfg = FinetuneConfig()
model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                         target_modules=list(cfg.target_modules)))
with torch.no_grad():  # a trained-looking adapter: B away from 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 1e-3)
facts = make_fictitious_facts(num_people=2, questions_per_person=4)
forget, retain = (as_batches(rows, tokenizer=tokenizer, batch_size=4, max_length=128, what="bench")[0]
                  for rows in (facts[:4], facts[4:]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
"""

PREPARE = {
    "ours": """
from unlearn_fast.objectives import NPO
objective = NPO(beta=0.1, gamma=1.0)
objective.prepare(model, [forget], [retain])
loss_of = lambda: objective.loss(model, forget, retain)[0]
""",
    "forgetium": """
from forgetium.core.config import UnlearningConfig
from forgetium.methods.npo import NPOUnlearner
peer = NPOUnlearner(model, tokenizer, UnlearningConfig(), beta=0.1, retain_weight=1.0)
peer.prepare()
loss_of = lambda: peer.compute_loss(forget, retain)[0]
""",
}

STEP = """
def step():
    loss_of().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
"""


@pytest.mark.parametrize("impl", list(PREPARE))
def test_npo_retain_step(benchmark, impl):
    namespace: dict = {}
    exec(SETUP + PREPARE[impl] + STEP, namespace)
    benchmark.group = "objective: one NPO + retain step (SmolLM2-135M + LoRA r=16)"
    benchmark.extra_info.update(
        impl=impl,
        baseline="forgetium",
        shape="batch 4 forget + 4 retain facts",
        peak_bytes_above_inputs=peak_memory_above_inputs(SETUP, PREPARE[impl] + STEP + "step()\nstep()"),
    )
    benchmark.pedantic(namespace["step"], rounds=3, warmup_rounds=1)
