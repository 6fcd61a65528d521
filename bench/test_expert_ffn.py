"""One UOE training step of a Mixtral MoE layer: ``train_single_expert`` vs plain autograd on the fused experts.

The layer: hidden 576, expert width 1536, 8 experts, top-2 (SmolLM2-135M's widths), T = 4096 tokens, random
weights, float32. One step = forward of the sparse block, backward of a fixed random linear loss, SGD step. Trained:
the router and expert e* (``train_single_expert``, gradients only for e*'s slices), or the router and the fused
``gate_up_proj`` / ``down_proj`` (plain autograd, gradients for all 8 slices), with transformers' default
"grouped_mm" experts (the baseline, the faster here) or its "eager" loop. ``grad_bytes`` is the size of the gradients
the step leaves behind (expected ~1/E of plain autograd's); peak memory is measured in a fresh process.
Run with ``pytest bench/test_expert_ffn.py --benchmark-only``.

Measured here (2-core AMD EPYC, one thread, shared): single_expert 1.36 s, grouped_mm 1.93 s (0.70x), eager 2.78 s;
gradients 10.1 MB vs 81.0 MB (1/8); peak memory above inputs 120 MB vs 425 MB (0.28x). The forward of all E experts
(unchanged) is most of single_expert's step: its backward is e*'s only.
"""

import pytest
import torch
from conftest import peak_memory_above_inputs

T, H, I, E, K = 4096, 576, 1536, 8, 2

SETUP = """
import torch, transformers
from unlearn_fast.models.expert_training import train_single_expert
T, H, I, E, K = {T}, {H}, {I}, {E}, {K}
config = transformers.MixtralConfig(
    vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=9,
    num_key_value_heads=3, num_local_experts=E, num_experts_per_tok=K,
)
model = transformers.MixtralForCausalLM(config)
model.requires_grad_(False)
block = model.model.layers[0].mlp
x = torch.randn(1, T, H)
g = torch.randn(1, T, H)
impl = {impl!r}
if impl == "single_expert":
    context = train_single_expert(model, 0, 3)
    se = context.__enter__()
    params = [block.gate.weight, *se.parameters()]
else:
    model.set_experts_implementation(impl.removeprefix("autograd_"))
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
block.gate.weight.requires_grad_(True)
for p in params:
    p.requires_grad_(True)
opt = torch.optim.SGD(params, lr=1e-3)
"""

STEP = "(block(x) * g).sum().backward(); opt.step()"
IMPLS = ["autograd_grouped_mm", "autograd_eager", "single_expert"]


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_layer_training_step(benchmark, impl):
    setup = SETUP.format(T=T, H=H, I=I, E=E, K=K, impl=impl)
    scope: dict = {}
    torch.manual_seed(0)
    exec(setup, scope)
    exec(STEP, scope)  # first step: creates the gradients
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in scope["params"])

    def step():
        scope["opt"].zero_grad(set_to_none=True)
        exec(STEP, scope)

    benchmark.group = "UOE expert-layer training step"
    benchmark.extra_info.update(
        op="expert_ffn",
        impl=impl,
        baseline="autograd_grouped_mm",
        shape=f"T={T} H={H} I={I} E={E} top-{K}, float32",
        grad_bytes=grad_bytes,
        peak_bytes_above_inputs=peak_memory_above_inputs(setup, STEP),
    )
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
