"""FSDP on SmolLM2-135M: what sharding the decoder layers saves per rank, and what it costs.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 bench/fsdp_memory.py [--steps 6]

Two runs of SOUL on every parameter (GradDiff, Sophia-G, batch 4: 2 rows per rank), over 2 CPU
ranks (gloo), same data: data-parallel with the whole model on every rank, then with
:func:`unlearn_fast.distributed.shard_layers`. Reported per rank: the bytes of the parameters this
rank holds (the gradient and Sophia's two state tensors are each as large again), the median time
of a step, and the largest difference between the two runs' final parameters. Rank 0 writes
bench/results/fsdp_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from unlearn_fast import SOUL, distributed, models
from unlearn_fast.data import make_fictitious_facts


def local_bytes(model: torch.nn.Module) -> int:
    return sum(distributed.local(p).numel() * p.element_size() for p in model.parameters())


def whole(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.full_tensor() if distributed.is_sharded(p) else p).detach().reshape(-1) for p in model.parameters()]
    )


def run(shard: bool, steps: int, forget, retain) -> dict:
    model, tokenizer = models.load("smollm2")
    model.requires_grad_(True)
    full_bytes = local_bytes(model)
    if shard:
        distributed.shard_layers(model)
    soul = SOUL(objective="gdiff", lr=1e-5, steps=steps, batch_size=4, hessian_interval=2)
    result = soul.unlearn(model, forget, retain, tokenizer=tokenizer, inplace=True, progress=False)
    times = [b["time_s"] - a["time_s"] for a, b in zip(result.history, result.history[1:])]
    return {
        "parameter_bytes": local_bytes(model),
        "whole_model_bytes": full_bytes,
        "step_s": statistics.median(times),
        "final": whole(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="bench/results/fsdp_memory")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    facts = make_fictitious_facts(num_people=4, questions_per_person=4)
    forget, retain = facts[:8], facts[8:]
    plain = run(False, args.steps, forget, retain)
    sharded = run(True, args.steps, forget, retain)
    difference = (plain.pop("final") - sharded.pop("final")).abs().max().item()
    rows = [
        {"rank": dist.get_rank(), "run": name, **r} for name, r in (("whole model", plain), ("shard_layers", sharded))
    ]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        rows = [row for rank_rows in gathered for row in rank_rows]
        lines = [
            "| rank | run | parameter MB on the rank | of the whole model | step (s) | step vs whole |",
            "|---|---|---|---|---|---|",
        ]
        base = {row["rank"]: row["step_s"] for row in rows if row["run"] == "whole model"}
        for row in rows:
            lines.append(
                f"| {row['rank']} | {row['run']} | {row['parameter_bytes'] / 2**20:.1f} | "
                f"{row['parameter_bytes'] / row['whole_model_bytes']:.2f}x | {row['step_s']:.2f} | "
                f"{row['step_s'] / base[row['rank']]:.2f}x |"
            )
        lines.append(
            f"\nLargest |difference| between the two runs' final parameters: {difference:.3g} "
            f"(float32, {args.steps} steps)."
        )
        text = "\n".join(lines)
        print(text)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps({"rows": rows, "max_difference": difference, "steps": args.steps}, indent=1)
        )
        out.with_suffix(".md").write_text(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
