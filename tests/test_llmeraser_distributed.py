"""LLMEraser under torch.distributed (2 CPU processes, gloo) gives the single-process results."""

from __future__ import annotations

import math

import pytest
import torch
from distributed_harness import run_on_ranks
from test_llmeraser import DATA, TOK, one_thread, several_module_model  # noqa: F401 (a fixture)

from unlearn_fast.methods.llmeraser import LLMEraser


def _adapter_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def compute() -> dict:
    """Every distributed sum of the eraser, on 7 examples in passes of 2 (uneven shards)."""
    model = several_module_model()  # not fitted: the eraser warns, which does not matter here
    er = LLMEraser(model, DATA[:7], tokenizer=TOK, solver="cg", damping=1.0, tol=1e-8, examples_per_pass=2)
    vectors = torch.randn(2, er.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = _adapter_vector(model)
    out = {
        "full": er.operator.hvp_fn(vectors, None),
        "minibatch": er.operator.hvp_fn(vectors[0], [0, 3, 4]),
        "train_grad_norm": torch.tensor(er._train_gradient_norm()),
        # One example: the other rank's shard of it is empty.
        "remove_one": _adapter_vector(er.remove([5]).model) - before,
        "remove": _adapter_vector(er.remove([1, 4, 6]).model) - before,
        "modify_queries": _adapter_vector(er.modify_queries({2: "qy2", 5: "qx5"}).model) - before,
    }
    # A NaN on one example's tokens reaches one rank's pass only: every rank must still raise.
    broken = several_module_model()
    with torch.no_grad():
        broken.get_input_embeddings().weight[ord("#")] = math.nan
    try:
        LLMEraser(broken, [*DATA[:4], ("q#", "abc")], tokenizer=TOK, examples_per_pass=1).remove([0])
    except FloatingPointError as error:
        out["nan_error"] = str(error)
    return out


def on_rank(out_dir: str) -> dict:
    return compute()


@pytest.mark.filterwarnings("ignore:LLMEraser. the training-loss gradient")
def test_two_processes_match_one(tmp_path):
    ranks = run_on_ranks(on_rank, tmp_path)
    single = compute()
    assert "nan_error" in single and all("not finite" in r.get("nan_error", "") for r in ranks)
    for key, want in single.items():
        if key == "nan_error":
            continue
        for got in ranks:  # other passes, other rounding: CG's solutions agree to ~1e-9
            assert (got[key] - want).norm() <= 1e-8 * want.norm(), key
    # Rank 0's step is broadcast: the ranks' models are bitwise identical.
    for key in ("remove_one", "remove", "modify_queries"):
        assert torch.equal(ranks[0][key], ranks[1][key])
