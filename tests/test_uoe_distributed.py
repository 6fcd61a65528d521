"""UOE under torch.distributed (2 CPU processes, gloo) gives the single-process results."""

from __future__ import annotations

from pathlib import Path

import torch
from distributed_harness import run_on_ranks

from unlearn_fast import UOE, attribute_experts
from unlearn_fast.models import tiny_moe


def ragged_batches(n, seed, rows=4, length=10):
    """Rows of different lengths: the ranks' shards hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for r in range(rows):
            end = int(torch.randint(6, length + 1, (), generator=g))
            mask[r, end:] = 0
            labels[r, end:] = -100
            labels[r, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def compute(checkpoint_dir: str | None = None) -> dict:
    forget, retain = ragged_batches(3, seed=1), ragged_batches(2, seed=2)
    out = {"attribution": torch.cat(list(attribute_experts(tiny_moe("mixtral", num_layers=3), forget).scores.values()))}
    for objective in ("ga", "gdiff", "npo"):
        result = UOE(objective=objective, lr=1e-2, steps=4, batch_size=4).unlearn(
            tiny_moe("mixtral", num_layers=3), forget, retain, progress=False
        )
        out[objective] = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
        out[objective + " loss"] = torch.tensor([[r["loss"], r["anchor"]] for r in result.history])
        out[objective + " target"] = torch.tensor(result.target)
    if checkpoint_dir is not None:  # rank 0 writes, every rank resumes from it
        uoe = UOE(objective="gdiff", lr=1e-2, steps=4, batch_size=4)

        def stop(step, model, record):
            if step == 3:
                raise KeyboardInterrupt

        try:
            uoe.unlearn(
                tiny_moe("mixtral", num_layers=3),
                forget,
                retain,
                progress=False,
                callback=stop,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=2,
            )
        except KeyboardInterrupt:
            pass
        resumed = uoe.unlearn(
            tiny_moe("mixtral", num_layers=3), forget, retain, progress=False, checkpoint_dir=checkpoint_dir
        )
        out["resumed"] = torch.cat([p.detach().reshape(-1) for p in resumed.model.parameters()])
    return out


def on_rank(out_dir: str) -> dict:
    return compute(str(Path(out_dir) / "checkpoint"))


def test_two_processes_match_one(tmp_path):
    ranks = run_on_ranks(on_rank, tmp_path)
    single = compute()
    for key, want in single.items():
        for got in ranks:  # other partial sums, other rounding (float32)
            torch.testing.assert_close(got[key], want.to(got[key].dtype), rtol=1e-4, atol=2e-5, msg=key)
        # The ranks apply the same all-reduced gradients: bitwise identical models.
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Interrupted at step 3, resumed from rank 0's step-2 checkpoint: the uninterrupted 2-rank run.
    for got in ranks:
        assert torch.equal(got["resumed"], got["gdiff"])
