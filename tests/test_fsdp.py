"""SOUL on a model whose decoder layers are FSDP-sharded over 2 CPU processes (gloo) gives the
single-process results, resumes exactly from per-rank checkpoints, and refuses what it cannot do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_harness import run_on_ranks
from peft import LoraConfig, get_peft_model
from test_soul_distributed import ragged_batches, tiny_llama64

from unlearn_fast import SOUL, distributed

# (objective, optimizer, estimator, LoRA): the Sophia estimators that work on shards, AdamW, the
# reference preset; all parameters (the unsharded embeddings and head train too) or LoRA adapters.
RUNS = [("gdiff", "sophia", "gnb", False), ("npo", "adamw", "gnb", False), ("ga", "soul_reference", "gnb", False),
        ("gdiff", "sophia", "empirical", True)]


def model_for(lora: bool, shard: bool) -> torch.nn.Module:
    model = tiny_llama64()
    if lora:
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        torch.manual_seed(1)
        model = get_peft_model(model, config).double()
    return distributed.shard_layers(model) if shard else model


def full_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole (DTensors gathered), in order."""
    return torch.cat([(p.full_tensor() if distributed.is_sharded(p) else p).detach().reshape(-1)
                      for p in model.parameters()])


def soul(objective: str, optimizer: str, estimator: str, steps: int = 5) -> SOUL:
    return SOUL(objective=objective, optimizer=optimizer, estimator=estimator, lr=1e-2, steps=steps,
                hessian_interval=2, max_grad_norm=0.05)  # small enough to clip: the norm of the shards counts


def compute(shard: bool, checkpoint_dir: str | None = None) -> dict:
    forget, retain = ragged_batches(3, seed=1), ragged_batches(2, seed=2)
    out = {}
    for objective, optimizer, estimator, lora in RUNS:
        model = model_for(lora, shard)
        result = soul(objective, optimizer, estimator).unlearn(model, forget, retain, progress=False, inplace=True)
        key = f"{objective}/{optimizer}/{estimator}/{'lora' if lora else 'full'}"
        out[key] = full_parameters(result.model)
        out[key + " grad norm"] = torch.tensor([r["grad_norm"] for r in result.history])
    if checkpoint_dir is not None:  # every rank writes its shards; interrupted at step 3, resumed
        def stop(step, model, record):
            if step == 3:
                raise KeyboardInterrupt

        model = model_for(False, shard)
        before = full_parameters(model)
        with pytest.raises(KeyboardInterrupt):
            soul("gdiff", "sophia", "gnb", steps=4).unlearn(model, forget, retain, progress=False, inplace=True,
                                                            callback=stop, checkpoint_dir=checkpoint_dir,
                                                            checkpoint_every=2)
        out["restored after interrupt"] = torch.equal(full_parameters(model), before)
        resumed = soul("gdiff", "sophia", "gnb", steps=4).unlearn(model, forget, retain, progress=False, inplace=True,
                                                                  checkpoint_dir=checkpoint_dir)
        out["resumed"] = full_parameters(resumed.model)
        out["files"] = sorted(p.name for p in Path(checkpoint_dir).iterdir())
    return out


def errors() -> dict:
    forget = ragged_batches(2, seed=1)
    out = {}
    for name, call in {
        "copy": lambda: SOUL(objective="ga").unlearn(model_for(False, True), forget, progress=False),
        "hutchinson": lambda: SOUL(objective="ga", estimator="hutchinson").unlearn(
            model_for(False, True), forget, progress=False, inplace=True),
    }.items():
        try:
            call()
        except ValueError as error:
            out[name] = str(error)
    model = tiny_llama64()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))  # the whole model, head included
    try:
        SOUL(objective="ga").unlearn(model, forget, progress=False, inplace=True)
    except ValueError as error:
        out["head"] = str(error)
    return out


def on_rank(out_dir: str) -> dict:
    return {**compute(True, str(Path(out_dir) / "checkpoint")), **errors()}


def test_sharded_soul_matches_one_process(tmp_path):
    ranks = run_on_ranks(on_rank, tmp_path)
    single = compute(False)
    for key, want in single.items():
        for got in ranks:  # other partial sums and norms, other rounding (float64)
            torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-11, msg=key)
    uninterrupted = soul("gdiff", "sophia", "gnb", steps=4).unlearn(
        model_for(False, False), ragged_batches(3, seed=1), ragged_batches(2, seed=2), progress=False).model
    for got in ranks:
        assert got["restored after interrupt"]
        torch.testing.assert_close(got["resumed"], full_parameters(uninterrupted), rtol=1e-9, atol=1e-11)
        assert got["files"] == ["soul_checkpoint.rank0of2.pt", "soul_checkpoint.rank1of2.pt"]
        assert "cannot be copied" in got["copy"] and "inplace=True" in got["copy"]
        assert "estimator='hutchinson'" in got["hutchinson"]
        assert "LM head is FSDP-sharded" in got["head"]


def test_shard_layers_needs_a_process_group():
    with pytest.raises(ValueError, match="process group of 2 or more ranks"):
        distributed.shard_layers(tiny_llama64())
