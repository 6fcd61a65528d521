"""kronfluence (EK-FAC influence functions, a test extra installed by scripts/setup.sh) as a peer of
LLMEraser's inverse-HVP, in this process, on the tiny float64 LoRA of test_curvature.py (B off zero, rank 1
on o_proj and down_proj: 80 parameters, 12 examples). The compared quantity is what kronfluence's pairwise
scores compute: the influence of the removal's right-hand side b on every training example,

    s_j = ∇L(z_j) · (H + λI)⁻¹ b,   b = (1/n) Σ_S ∇L(z)   (what LLMEraser.remove solves for),

against the exact dense solve. The glue (a kronfluence Task, the loss and damping scalings) lives in
bench/llmeraser_kronfluence.py, which runs the same comparison on SmolLM2-135M; its docstring derives them:
kronfluence sums the answer-token CE per example where LLMEraser divides it by the mean answer length T̄,
so its curvature is T̄·H; its ``damping_factor`` is absolute (None alone means 0.1 x the mean eigenvalue),
so it gets T̄·λ, and s_j = Σ_{q∈S} score[q, j] / (n·T̄). Both track the LoRA A and B Linear modules, each a
Kronecker block, and kronfluence's task draws LLMEraser's sampled labels (its passes run with LLMEraser's eager
attention, so that the probabilities drawn from are the same), so the two EK-FACs implement the same
approximation from the same draws: they agree to float32 RMSNorm rounding (the ~1e-7 floor of every
model-derived quantity on this model, see test_curvature.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_curvature import DATA, LAM, TOK, delta, dense_gn, eraser, off_zero, one_thread, rel  # noqa: F401

pytest.importorskip("kronfluence", reason="the peer is a test extra: scripts/setup.sh installs kronfluence --no-deps")

_spec = importlib.util.spec_from_file_location(
    "llmeraser_kronfluence", Path(__file__).parents[1] / "bench" / "llmeraser_kronfluence.py"
)
peer_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_bench)

REMOVED = [3, 7]
# Label draws per example for both EK-FACs. With one draw the sampled EK-FAC is mostly noise here (12 examples:
# 1.00 relative error against the exact scores, ours and kronfluence's alike); 16 (measured, seed 0) bring it
# to 0.24, close to the 0.24 of the exact-label EK-FAC (curvature_labels="exact"): the approximation's own error.
SAMPLES = 16


@pytest.fixture(scope="module")
def system():
    """The model, its examples, their gradients G [n, d] and the exact scores at a λ (dense float64 solve)."""
    model, data = off_zero(), DATA[:12]
    er = eraser(model, data)
    G = torch.stack([er._gradient([er._term(er._encoded[j], 1.0, f"train_data[{j}]")]) for j in range(er.n)])
    b = G[REMOVED].sum(0) / er.n
    H = dense_gn(er)

    def exact(damping):
        return G @ torch.linalg.solve(H + damping * torch.eye(er.dim, dtype=H.dtype), b)

    return model, data, G, exact


def test_exact_solve_scores_equal_the_dense_solve(system):
    model, data, G, exact = system
    # LLMEraser.remove's step (CG to 1e-11 on the Gauss-Newton operator) is (H + λI)⁻¹ b: measured 1.7e-8.
    assert rel(G @ delta(eraser(model, data), REMOVED), exact(LAM)) < 1e-6


@pytest.fixture(scope="module")
def kronfluence_peer(system, tmp_path_factory):
    model, data, _, _ = system
    peer = peer_bench.KronfluencePeer(model, TOK, data, LAM, workdir=tmp_path_factory.mktemp("kronfluence"))
    peer.fit(SAMPLES)
    return peer


@pytest.mark.parametrize("scale", [1, 10])
def test_kronfluence_ekfac_is_our_ekfac(system, kronfluence_peer, scale):
    model, data, G, exact = system
    damping = scale * LAM
    assert kronfluence_peer.mean_answer_tokens == 5  # T̄: 3 letters, a space and EOS per answer
    theirs = kronfluence_peer.scores(REMOVED, damping)
    ours = G @ delta(eraser(model, data, damping=damping, curvature_method="ekfac", curvature_samples=SAMPLES), REMOVED)
    gold = exact(damping)
    # The same EK-FAC: measured 6.9e-8 (λ) and 6.0e-8 (10λ), the float32 RMSNorm floor. A match at two λ with one
    # scaling also confirms that kronfluence's damping_factor is absolute. Given λ instead of T̄·λ (T̄ = 5),
    # kronfluence's scores differ from ours by 0.30 (λ) and 1.04 (10λ): this assertion fails.
    assert rel(theirs, ours) < 1e-6, rel(theirs, ours)
    # Each against the exact scores: measured 0.236 (λ) and 0.132 (10λ), for both; the exact-label EK-FAC is
    # 0.240 and 0.112, so what is left is the approximation's, not the draws'. EK-FAC drops the coupling between
    # lora_A and lora_B (separate modules, in kronfluence too: at λ the block-diagonal exact solve alone is 0.22
    # off) and keeps only the diagonal in the Kronecker eigenbasis. A bound, not a goal.
    for name, scores in (("kronfluence", theirs), ("ours", ours)):
        assert rel(scores, gold) < 0.35, (name, rel(scores, gold))
    # Close to the exact scores' direction: cosine measured 0.982 (λ) and 0.993 (10λ).
    assert torch.nn.functional.cosine_similarity(theirs, gold, dim=0) > 0.95
