"""SOUL and UOE on a model whose decoder layers are FSDP-sharded over 2 CPU processes (gloo) give
the single-process results, resume exactly from per-rank checkpoints, and refuse what they cannot
do; a DistributedDataParallel-wrapped model trains as the module inside it, for all three methods."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_harness import run_on_ranks
from peft import LoraConfig, get_peft_model
from test_llmeraser import DATA, TOK, several_module_model
from test_soul_distributed import ragged_batches, tiny_llama64
from test_uoe_distributed import ragged_batches as moe_batches

from unlearn_fast import SOUL, UOE, LLMEraser, attribute_experts, distributed
from unlearn_fast.models import tiny_moe

# (objective, optimizer, estimator, LoRA): the Sophia estimators that work on shards, AdamW, the
# reference preset; all parameters (the unsharded embeddings and head train too) or LoRA adapters.
RUNS = [
    ("gdiff", "sophia", "gnb", False),
    ("npo", "adamw", "gnb", False),
    ("ga", "soul_reference", "gnb", False),
    ("gdiff", "sophia", "empirical", True),
]


def model_for(lora: bool, shard: bool, device: str = "cpu", dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    model = tiny_llama64().to(device, dtype)
    if lora:
        config = LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        torch.manual_seed(1)
        model = get_peft_model(model, config).to(dtype)
    return distributed.shard_layers(model, device=device) if shard else model


def full_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole (DTensors gathered), in order."""
    return torch.cat(
        [(p.full_tensor() if distributed.is_sharded(p) else p).detach().reshape(-1) for p in model.parameters()]
    )


def soul(objective: str, optimizer: str, estimator: str, steps: int = 5) -> SOUL:
    return SOUL(
        objective=objective,
        optimizer=optimizer,
        estimator=estimator,
        lr=1e-2,
        steps=steps,
        hessian_interval=2,
        max_grad_norm=0.05,
    )  # small enough to clip: the norm of the shards counts


def compute(shard: bool, checkpoint_dir: str | None = None) -> dict:
    forget, retain = ragged_batches(3, seed=1), ragged_batches(2, seed=2)
    out = {}
    for objective, optimizer, estimator, lora in RUNS:
        model = model_for(lora, shard)
        result = soul(objective, optimizer, estimator).unlearn(model, forget, retain, progress=False, inplace=True)
        key = f"{objective}/{optimizer}/{estimator}/{'lora' if lora else 'full'}"
        out[key] = full_parameters(result.model)
        out[key + " grad norm"] = torch.tensor([r["grad_norm"] for r in result.history])
    # float32: FSDP reduces it with other collectives than float64 (gloo lacks some of them).
    result = soul("gdiff", "sophia", "gnb").unlearn(
        model_for(False, shard, dtype=torch.float32), forget, retain, progress=False, inplace=True
    )
    out["gdiff/sophia/gnb/full float32"] = full_parameters(result.model)
    if checkpoint_dir is not None:  # every rank writes its shards; interrupted at step 3, resumed

        def stop(step, model, record):
            if step == 3:
                raise KeyboardInterrupt

        model = model_for(False, shard)
        before = full_parameters(model)
        with pytest.raises(KeyboardInterrupt):
            soul("gdiff", "sophia", "gnb", steps=4).unlearn(
                model,
                forget,
                retain,
                progress=False,
                inplace=True,
                callback=stop,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=2,
            )
        out["restored after interrupt"] = torch.equal(full_parameters(model), before)
        resumed = soul("gdiff", "sophia", "gnb", steps=4).unlearn(
            model, forget, retain, progress=False, inplace=True, checkpoint_dir=checkpoint_dir
        )
        out["resumed"] = full_parameters(resumed.model)
        out["files"] = sorted(p.name for p in Path(checkpoint_dir).iterdir())
        if shard:  # rank 1 loses its file (a crash between the ranks' writes): both refuse to resume
            torch.distributed.barrier()  # both have listed the files
            rank = torch.distributed.get_rank()
            if rank == 1:
                (Path(checkpoint_dir) / "soul_checkpoint.rank1of2.pt").unlink()
            try:
                soul("gdiff", "sophia", "gnb", steps=4).unlearn(
                    model_for(False, shard), forget, retain, progress=False, inplace=True, checkpoint_dir=checkpoint_dir
                )
            except RuntimeError as error:
                out["disagree"] = str(error)
    return out


def uoe_compute(shard: bool) -> dict:
    """Attribution on a fully sharded MoE; UOE with the target layer kept whole, the others sharded."""
    forget, retain = moe_batches(3, seed=1), moe_batches(2, seed=2)
    moe = tiny_moe("mixtral", num_layers=3)
    attribution = attribute_experts(distributed.shard_layers(moe) if shard else moe, forget)
    layer, _ = attribution.top()
    out = {"attribution": torch.cat(list(attribution.scores.values())), "target layer": layer}
    for objective in ("ga", "npo"):
        moe = tiny_moe("mixtral", num_layers=3)
        if shard:
            distributed.shard_layers(moe, skip=[layer])
        result = UOE(objective=objective, lr=1e-2, steps=4, batch_size=4).unlearn(
            moe, forget, retain, progress=False, inplace=True
        )
        out[f"uoe {objective}"] = full_parameters(result.model)
    return out


def ddp_wrapped() -> dict:
    """Each method on DDP(model) and on the bare model: (wrapped, bare) results per method."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    forget, retain = ragged_batches(3, seed=1), ragged_batches(2, seed=2)
    moe_forget, moe_retain = moe_batches(3, seed=1), moe_batches(2, seed=2)
    out = {}
    for wrap in (True, False):

        def given(model, wrap=wrap):
            return DDP(model) if wrap else model

        tag = "wrapped" if wrap else "bare"
        out[f"soul {tag}"] = full_parameters(
            soul("gdiff", "sophia", "gnb").unlearn(given(tiny_llama64()), forget, retain, progress=False).model
        )
        out[f"uoe {tag}"] = full_parameters(
            UOE(objective="ga", lr=1e-2, steps=4, batch_size=4)
            .unlearn(given(tiny_moe("mixtral", num_layers=3)), moe_forget, moe_retain, progress=False)
            .model
        )
        eraser = LLMEraser(
            given(several_module_model()),
            DATA[:7],
            tokenizer=TOK,
            solver="cg",
            damping=1.0,
            tol=1e-8,
            examples_per_pass=2,
        )
        out[f"llmeraser {tag}"] = full_parameters(eraser.remove([1, 4]).model)
    return out


def errors() -> dict:
    forget = ragged_batches(2, seed=1)
    out = {}
    for name, call in {
        "copy": lambda: SOUL(objective="ga").unlearn(model_for(False, True), forget, progress=False),
        "hutchinson": lambda: SOUL(objective="ga", estimator="hutchinson").unlearn(
            model_for(False, True), forget, progress=False, inplace=True
        ),
        "uoe target": lambda: UOE(objective="ga", target=(1, 0)).unlearn(
            distributed.shard_layers(tiny_moe("mixtral", num_layers=3)),
            moe_batches(1, seed=1),
            progress=False,
            inplace=True,
        ),
        "llmeraser": lambda: LLMEraser(model_for(True, True), [("a question", "an answer")]),
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
    return {**compute(True, str(Path(out_dir) / "checkpoint")), **uoe_compute(True), **errors()}


def test_sharded_methods_match_one_process(tmp_path):
    ranks = run_on_ranks(on_rank, tmp_path)
    single = {**compute(False), **uoe_compute(False)}
    for key, want in single.items():
        for got in ranks:  # other partial sums and norms, other rounding
            if not torch.is_tensor(want):
                assert got[key] == want, key
            elif want.dtype == torch.float32:  # the MoE, and a float32 run (steps of 1e-2: rounding ~1e-5)
                torch.testing.assert_close(got[key], want, rtol=1e-3, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
            else:
                torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-11, msg=lambda m, key=key: f"{key}: {m}")
    uninterrupted = (
        soul("gdiff", "sophia", "gnb", steps=4)
        .unlearn(model_for(False, False), ragged_batches(3, seed=1), ragged_batches(2, seed=2), progress=False)
        .model
    )
    for got in ranks:
        assert got["restored after interrupt"]
        torch.testing.assert_close(got["resumed"], full_parameters(uninterrupted), rtol=1e-9, atol=1e-11)
        assert got["files"] == ["soul_checkpoint.rank0of2.pt", "soul_checkpoint.rank1of2.pt"]
        assert "ranks disagree on the step of their checkpoints" in got["disagree"]
        assert "cannot be copied" in got["copy"] and "inplace=True" in got["copy"]
        assert "estimator='hutchinson'" in got["hutchinson"]
        assert "LM head is FSDP-sharded" in got["head"]
        assert "target layer 1 is FSDP-sharded" in got["uoe target"] and "skip=[1]" in got["uoe target"]
        assert "FSDP-sharded" in got["llmeraser"]


def compute_one(shard: bool, device: str = "cpu") -> torch.nn.Module:
    """One SOUL run (LoRA, gnb) for the torchrun launch."""
    return (
        soul("npo", "sophia", "gnb")
        .unlearn(
            model_for(True, shard, device),
            ragged_batches(3, seed=1),
            ragged_batches(2, seed=2),
            progress=False,
            inplace=True,
        )
        .model
    )


@pytest.mark.filterwarnings("ignore:LLMEraser. the training-loss gradient")
def test_ddp_wrapped_models_train_as_the_module_inside(tmp_path):
    for got in run_on_ranks(ddp_on_rank, tmp_path):
        for method in ("soul", "uoe", "llmeraser"):
            assert torch.equal(got[f"{method} wrapped"], got[f"{method} bare"]), method


def ddp_on_rank(out_dir: str) -> dict:  # a module-level function: the ranks are spawned
    return ddp_wrapped()


def test_torchrun_launch(tmp_path):
    """The documented launch: torchrun starts the ranks, the script shards and trains."""
    here = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(here / "fsdp_torchrun_script.py"),
            str(tmp_path / "params.pt"),
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert launch.returncode == 0, launch.stderr[-4000:]
    torch.testing.assert_close(
        torch.load(tmp_path / "params.pt"), full_parameters(compute_one(shard=False)), rtol=1e-9, atol=1e-11
    )


def test_shard_layers_needs_a_process_group():
    with pytest.raises(ValueError, match="process group of 2 or more ranks"):
        distributed.shard_layers(tiny_llama64())
