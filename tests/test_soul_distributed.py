"""SOUL under torch.distributed (2 CPU processes, gloo) gives the single-process results."""

from __future__ import annotations

from pathlib import Path

import torch
from distributed_harness import run_on_ranks
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast import SOUL
from unlearn_fast.objectives import make_objective

# (objective, optimizer, estimator): every estimator, and the objectives with their own means
# (token means, NPO's mean over sequences, RMU's over attended tokens).
RUNS = [
    ("gdiff", "sophia", "gnb"),
    ("npo", "sophia", "hutchinson"),
    ("rmu", "adamw", "gnb"),
    ("ga", "soul_reference", "gnb"),
]


def tiny_llama64():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).double()


def ragged_batches(n, seed, rows=5, length=12):
    """Rows of different lengths and prompt lengths: the ranks' shards hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for r in range(rows):
            end = int(torch.randint(7, length + 1, (), generator=g))
            prompt = int(torch.randint(2, 6, (), generator=g))
            mask[r, end:] = 0
            labels[r, end:] = -100
            labels[r, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def compute(checkpoint_dir: str | None = None) -> dict:
    forget, retain = ragged_batches(3, seed=1), ragged_batches(2, seed=2)
    out = {}
    for objective, optimizer, estimator in RUNS:
        kwargs = {"layer": 1, "alpha": 10.0} if objective == "rmu" else {}
        soul = SOUL(
            objective=make_objective(objective, **kwargs),
            optimizer=optimizer,
            estimator=estimator,
            lr=1e-2,
            steps=5,
            hessian_interval=2,
        )
        result = soul.unlearn(tiny_llama64(), forget, retain, progress=False)
        key = f"{objective}/{optimizer}/{estimator}"
        out[key] = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
        out[key + " loss"] = torch.tensor([r["loss"] for r in result.history])
    if checkpoint_dir is not None:  # rank 0 writes, every rank resumes from it
        soul = SOUL(objective="gdiff", lr=1e-2, steps=4, hessian_interval=2)

        def stop(step, model, record):
            if step == 3:
                raise KeyboardInterrupt

        try:
            soul.unlearn(
                tiny_llama64(),
                forget,
                retain,
                progress=False,
                callback=stop,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=2,
            )
        except KeyboardInterrupt:
            pass
        resumed = soul.unlearn(tiny_llama64(), forget, retain, progress=False, checkpoint_dir=checkpoint_dir)
        out["resumed"] = torch.cat([p.detach().reshape(-1) for p in resumed.model.parameters()])
    return out


def on_rank(out_dir: str) -> dict:
    out = compute(str(Path(out_dir) / "checkpoint"))
    try:  # a batch smaller than the world: every rank raises the same error
        SOUL(objective="ga").unlearn(tiny_llama64(), ragged_batches(1, 3, rows=1), progress=False)
    except ValueError as error:
        out["small_batch_error"] = str(error)
    return out


def test_two_processes_match_one(tmp_path):
    ranks = run_on_ranks(on_rank, tmp_path)
    single = compute()
    for got in ranks:
        assert "cannot be split across 2 ranks" in got["small_batch_error"]
    for key, want in single.items():
        for got in ranks:  # other partial sums, other rounding (float64)
            torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-11, msg=key)
        # The ranks apply the same all-reduced gradients: bitwise identical models.
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Interrupted at step 3, resumed from rank 0's step-2 checkpoint: the uninterrupted run.
    uninterrupted = (
        SOUL(objective="gdiff", lr=1e-2, steps=4, hessian_interval=2)
        .unlearn(tiny_llama64(), ragged_batches(3, seed=1), ragged_batches(2, seed=2), progress=False)
        .model
    )
    want = torch.cat([p.detach().reshape(-1) for p in uninterrupted.parameters()])
    for got in ranks:
        torch.testing.assert_close(got["resumed"], want, rtol=1e-9, atol=1e-11)
