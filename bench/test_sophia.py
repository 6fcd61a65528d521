"""One optimizer step over SmolLM2-135M's parameters: fused Sophia vs ``torch.optim.AdamW(foreach=True)``.

The parameters are those of a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's
config (no download; tied embeddings: 272 tensors, 134.5M values), with fixed random gradients.
Each case times ``step()`` after a first step has created the optimizer state. Target (issue
SOUL): the fused Sophia step at most 1.2x the time of foreach AdamW, measured in the same run.
Run with ``make bench`` (or ``pytest bench/test_sophia.py --benchmark-only``).

``sophia_opt_sophiag`` is the peer, Sophia's authors' SophiaG (per-tensor torch ops), in the same run.

Each case runs on one thread and on all of them: foreach AdamW on the CPU is a sequence of
per-tensor ATen ops, each its own OpenMP region, so on a loaded (shared) machine its multi-thread
time swings with the other load far more than that of one fused pass; the one-thread ratio is
the stable figure there.
"""

import functools

import pytest
import torch
from sophia_opt import SophiaG

from unlearn_fast.optim import Sophia

OPTIMIZERS = {
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True),
    # Sophia-G/H between Hessian refreshes: m, decay and the clipped step.
    "sophia": lambda params: Sophia(params, lr=1e-4, estimator="gnb", bs=4096),
    # The empirical estimator: the h EMA from g*g in the same pass.
    "sophia_empirical": lambda params: Sophia(params, lr=1e-4, estimator="empirical", bs=4096),
    "sophia_soul_reference": lambda params: Sophia.soul_reference(params, lr=1e-4),
    # The peer: Sophia's authors' SophiaG (sophia-opt, a test extra), its default bs 5120 per step.
    "sophia_opt_sophiag": lambda params: SophiaG(params, lr=1e-4, weight_decay=0.1),
}
THREADS = sorted({1, torch.get_num_threads()})


@functools.cache
def smollm2_params() -> list[torch.nn.Parameter]:
    """SmolLM2-135M-shaped parameters with fixed random gradients (shared by the cases)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    params = [p for p in transformers.LlamaForCausalLM(config).parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", list(OPTIMIZERS))
def test_sophia_step(benchmark, impl, threads):
    params = smollm2_params()
    opt = OPTIMIZERS[impl](params)
    opt.step()  # creates the state

    benchmark.group = f"optimizer step SmolLM2-135M, {threads} thread(s)"
    benchmark.extra_info.update(
        op="sophia_update",
        impl=impl,
        baseline="adamw_foreach",
        threads=threads,
        shape=f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M values, float32",
    )
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.pedantic(opt.step, rounds=5, warmup_rounds=1)
    finally:
        torch.set_num_threads(default_threads)
