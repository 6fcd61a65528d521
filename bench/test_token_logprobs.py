"""Fused token log-probs vs plain torch ``log_softmax(X @ W.T).gather(...)``: time and peak memory.

Shapes of SmolLM2 (T=2048, H=576, V=49152) and of a 152k vocabulary (Qwen). Run with
``make bench`` (or ``pytest bench/test_token_logprobs.py --benchmark-only``).
"""

import pytest
import torch
from conftest import peak_memory_above_inputs

T, H = 2048, 576
VOCABS = [49152, 151936]

SETUP = """
T, H, V = {T}, {H}, {V}
x = torch.randn(T, H, requires_grad=True)
w = (torch.randn(V, H) * 0.02).requires_grad_()
labels = torch.randint(0, V, (T,))
weights = torch.full((T,), -1.0 / T)
import unlearn_fast
from unlearn_fast.ops import token_logprobs, token_logprob_sum
"""

# Each implementation: forward only, and forward + backward of the mean cross-entropy.
CASES = {
    ("plain", "forward"): "with torch.no_grad(): torch.log_softmax(x @ w.T, -1).gather(1, labels[:, None])",
    (
        "plain",
        "forward+backward",
    ): "(torch.log_softmax(x @ w.T, -1).gather(1, labels[:, None]).squeeze(1) * weights).sum().backward()",
    ("fused", "forward"): "with torch.no_grad(): token_logprobs(x, w, labels)",
    # Generic path: per-token outputs, backward recomputes the logits (4 matmuls).
    ("fused", "forward+backward"): "(token_logprobs(x, w, labels).logp * weights).sum().backward()",
    # Loss-aware path: gradient formed in the forward pass (3 matmuls, as plain torch).
    ("fused_sum", "forward+backward"): "token_logprob_sum(x, w, labels, weights).total.backward()",
}


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("impl,mode", list(CASES))
def test_token_logprobs(benchmark, impl, mode, vocab):
    setup = SETUP.format(T=T, H=H, V=vocab)
    scope: dict = {"torch": torch}
    exec(setup, scope)
    statement = CASES[(impl, mode)]

    def run():
        scope["x"].grad = None
        scope["w"].grad = None
        exec(statement, scope)

    benchmark.group = f"token_logprobs {mode} V={vocab}"
    benchmark.extra_info.update(
        op="token_logprobs",
        impl=impl,
        mode=mode,
        baseline="plain",
        shape=f"T={T} H={H} V={vocab}",
        peak_bytes_above_inputs=peak_memory_above_inputs(setup, statement),
    )
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
