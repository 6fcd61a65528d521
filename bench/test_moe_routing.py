"""Fused expert routing (UOE) vs the unfused plain-torch composition: time and peak memory.

T=16384 tokens of router logits, E=64 experts, top-8, float32, two routings: softmax with
renormalisation (Mixtral/Qwen3-style) and DeepSeek-V3's sigmoid + bias + top-2-sum groups (8 groups,
4 kept) + scaling. The baseline is what transformers' routers do (``torch.topk``), scattered to a
dense [T, E] gate matrix and reduced with torch ops: the attribution ``(w[:, None] * g).sum(0)``
and the anchor loss ``(w * ((g - onehot)**2).sum(-1)).sum()`` with autograd's backward. The fused
ops (C++ kernels here) never materialise g. Run with ``make bench`` (or
``pytest bench/test_moe_routing.py --benchmark-only``).

Measured here (2026-11-23, AMD EPYC, 1 thread, C++ kernels; time and peak memory above the
inputs relative to plain in the same run):

| case | softmax + renorm | DeepSeek-V3 routing |
|---|---|---|
| attribution, time | 0.72x | 0.65x |
| attribution, peak memory | 0.03x | 0.02x |
| anchor loss forward + backward, time | 1.37x | 1.25x |
| anchor loss forward + backward, peak memory | 0.26x | 0.17x |

The fused anchor loss routes every row twice (the backward recomputes the routing from the
logits instead of keeping [T, E] tensors), with a scalar exp and a k-pass top-k per row on the
CPU, so it trades CPU time for memory; torch's plain path keeps several [T, E] tensors alive.
"""

import pytest
import torch
from conftest import peak_memory_above_inputs

T, E, K = 16384, 64, 8
THREADS = sorted({1, torch.get_num_threads()})

SETUP = """
from unlearn_fast.ops.moe_routing import Routing, expert_attribution, router_anchor_loss
T, E, K, ROUTER = {T}, {E}, {K}, {router!r}
logits = torch.randn(T, E).requires_grad_()
weights = torch.rand(T) / T
target = 3
if ROUTER == "softmax_renorm":
    routing, bias = Routing(top_k=K, renormalize=True), None
else:
    routing = Routing(top_k=K, score="sigmoid", renormalize=True, scaling=2.5, n_group=8, topk_group=4,
                      group_score="top2_sum", renorm_eps=1e-20)
    bias = torch.randn(E) * 0.1

def plain_gates(x):
    # transformers' routers, written out (Mixtral / DeepSeek-V3), then scattered to [T, E].
    if ROUTER == "softmax_renorm":
        probs = torch.softmax(x, dim=-1)
        top, idx = torch.topk(probs, K, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
    else:
        scores = x.sigmoid()
        choice = scores + bias
        groups = choice.view(-1, 8, E // 8).topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, k=4, dim=-1, sorted=False)[1], 1)
        keep = keep.unsqueeze(-1).expand(-1, 8, E // 8).reshape(-1, E).bool()
        idx = torch.topk(choice.masked_fill(~keep, float("-inf")), k=K, dim=-1, sorted=False)[1]
        top = scores.gather(1, idx)
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
    return torch.zeros_like(x).scatter(1, idx, top)

onehot = torch.zeros(T, E)
onehot[:, target] = 1.0
"""

CASES = {
    ("plain", "attribution"): "with torch.no_grad(): (weights[:, None] * plain_gates(logits)).sum(0)",
    ("fused", "attribution"): "expert_attribution(logits, weights, routing, bias)",
    ("plain", "anchor forward+backward"): "(weights * ((plain_gates(logits) - onehot) ** 2).sum(-1)).sum().backward()",
    ("fused", "anchor forward+backward"): "router_anchor_loss(logits, target, weights, routing, bias).backward()",
}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("router", ["softmax_renorm", "deepseek_v3"])
@pytest.mark.parametrize("impl,mode", list(CASES))
def test_moe_routing(benchmark, impl, mode, router, threads):
    setup = SETUP.format(T=T, E=E, K=K, router=router)
    scope: dict = {"torch": torch}
    exec(setup, scope)
    statement = CASES[(impl, mode)]

    def run():
        scope["logits"].grad = None
        exec(statement, scope)

    benchmark.group = f"moe_routing {mode} {router}, {threads} thread(s)"
    benchmark.extra_info.update(
        op="moe_routing",
        impl=impl,
        mode=mode,
        baseline="plain",
        threads=threads,
        shape=f"T={T} E={E} k={K} float32 {router}",
        peak_bytes_above_inputs=peak_memory_above_inputs(setup, statement),
    )
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    finally:
        torch.set_num_threads(default_threads)
