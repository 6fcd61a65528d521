"""Batched HVPs and the fused curvature product: time and peak memory against their baselines.

(a) Hutchinson's diagonal (Sophia-H) with K=8 probes in one batched pass vs 8 sequential
    single-probe HVPs, on a 2-layer Llama of SmolLM2-135M's shapes (hidden 576, vocab 49152, tied
    head) with LoRA r=8 adapters, for both curvatures and both differentiation methods.
(b) The fused LM-head curvature product vs plain torch materialising [K,T,V], T=512..2048,
    V=49152, H=576, K=2 (the unfused peak grows as K*T*V: K=8 at T=2048 needs ~13 GB).

Run with ``make bench`` (or ``pytest bench/test_hvp.py --benchmark-only``).
"""

import pytest
import torch
from conftest import peak_memory_above_inputs

# Appended to each setup: peak_memory_above_inputs counts a run's peak only above the setup's own
# high-water mark (model init leaves one ~100 MB above the final resident size), so hand freed
# heap back to the OS and hold a ballast up to that mark: the run's peak then counts from there.
LIFT_TO_HIGH_WATER = """
import ctypes, resource
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/statm") as f:
    _resident = int(f.read().split()[1]) * resource.getpagesize()
_ballast = torch.ones(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - _resident, 0) // 4 + 1)
"""

HUTCHINSON_SETUP = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from unlearn_fast.hvp import hutchinson_diagonal, make_loss_fn
from unlearn_fast.models import hvp_safe
config = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=True,
)
lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])
model = get_peft_model(LlamaForCausalLM(config).eval(), lora)
ids = torch.randint(0, 49152, (2, 64))
with hvp_safe(model):
    loss, params = make_loss_fn(model, {{"input_ids": ids, "labels": ids}})
kwargs = dict(curvature="{curvature}", method="{method}")
gen = torch.Generator().manual_seed(0)
"""

HUTCHINSON_CASES = {
    "batched": "with hvp_safe(model): hutchinson_diagonal(loss, params, num_probes=8, generator=gen, **kwargs)",
    "sequential": (
        "with hvp_safe(model): [hutchinson_diagonal(loss, params, num_probes=1, generator=gen, **kwargs) "
        "for _ in range(8)]"
    ),
}


@pytest.mark.parametrize("impl", list(HUTCHINSON_CASES))
@pytest.mark.parametrize("method", ["forward_over_reverse", "double_backward"])
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_hutchinson_batched_vs_sequential(benchmark, impl, method, curvature):
    setup = HUTCHINSON_SETUP.format(curvature=curvature, method=method) + LIFT_TO_HIGH_WATER
    scope: dict = {}
    exec(setup, scope)
    statement = HUTCHINSON_CASES[impl]
    benchmark.group = f"hutchinson K=8 {curvature} {method}"
    benchmark.extra_info.update(
        op="hutchinson_diagonal",
        impl=impl,
        baseline="sequential",
        shape="Llama 2 layers H=576 V=49152, LoRA r=8 (64.5k params), 2x64 tokens",
        peak_bytes_above_inputs=peak_memory_above_inputs(setup, statement),
    )
    benchmark.pedantic(lambda: exec(statement, scope), rounds=2, warmup_rounds=1)


CURVATURE_SETUP = """
import torch
from unlearn_fast.ops import ce_curvature
T, H, V, K = {T}, 576, 49152, 2
x = torch.randn(T, H)
w = torch.randn(V, H).mul_(0.02)
dx = torch.randn(K, T, H)
weights = torch.full((T,), 1.0 / T)
"""

CURVATURE_CASES = {
    "unfused": (
        "p = torch.softmax(x @ w.T, -1); u = dx @ w.T; "
        "r = weights[:, None] * (p * u - p * (p * u).sum(-1, keepdim=True)); out = r @ w"
    ),
    "fused": "out = ce_curvature(x, w, tangent_hidden=dx, token_weights=weights).hidden",
}


@pytest.mark.parametrize("impl", list(CURVATURE_CASES))
@pytest.mark.parametrize("tokens", [512, 1024, 2048])
def test_ce_curvature_vs_unfused(benchmark, impl, tokens):
    setup = CURVATURE_SETUP.format(T=tokens) + LIFT_TO_HIGH_WATER
    scope: dict = {"torch": torch}
    exec(setup, scope)
    statement = CURVATURE_CASES[impl]
    benchmark.group = f"ce_curvature K=2 T={tokens}"
    benchmark.extra_info.update(
        op="ce_curvature",
        impl=impl,
        baseline="unfused",
        shape=f"K=2 T={tokens} H=576 V=49152",
        peak_bytes_above_inputs=peak_memory_above_inputs(setup, statement),
    )
    benchmark.pedantic(lambda: exec(statement, scope), rounds=1, warmup_rounds=0)
