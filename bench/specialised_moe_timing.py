"""Time a short real build of the specialised MoE and extrapolate the full build's time.

    OMP_NUM_THREADS=1 python bench/specialised_moe_timing.py --steps 3

Checks first that the Qwen2-MoE upcycled from SmolLM2-135M reproduces its logits, then runs every stage of
:func:`unlearn_fast.specialised_moe.build_specialised_moe` with ``--steps`` steps (full data, so the one-time
costs, the prefix caches and the pre-checks, are measured as they are), and prints each stage's seconds per step,
the extrapolation to the default config's steps, and the pre-check numbers of this undertrained model (not
expected to pass). Times are the process's CPU seconds (wall seconds scaled by the CPU/wall ratio per stage), so
that a run on a busy machine still estimates the build on a core of its own; run it with one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import torch

from unlearn_fast import models
from unlearn_fast.specialised_moe import SpecialisedMoEConfig, build_specialised_moe, default_domains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per stage of the short run (default 3)")
    parser.add_argument("--json", default=None, help="also write the timings here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    full = SpecialisedMoEConfig()
    short = dataclasses.replace(full, facts_steps=args.steps, text_steps=args.steps, router_steps=args.steps)

    c0 = time.process_time()
    dense, tokenizer = models.load("smollm2")
    load_cpu = time.process_time() - c0
    moe = models.upcycle_llama_to_qwen2_moe(dense, full.num_experts, full.top_k, full.moe_layers).eval()
    ids = tokenizer("def f(x):\n    return x + 1. The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    print(f"upcycled Qwen2-MoE vs SmolLM2 logits: max |diff| {diff:.2e} over {ids.shape[1]} tokens")
    del moe

    c0 = time.process_time()
    domains = default_domains(full)
    data_cpu = time.process_time() - c0
    _, report = build_specialised_moe(dense, tokenizer, short, domains, check=False, progress=False)

    steps = {"facts": full.facts_steps, "python": full.text_steps, "prose": full.text_steps}
    # On a shared machine wall time depends on the load: every stage's time is scaled by its CPU/wall ratio
    # (one thread: the CPU time is what the stage costs with a core of its own).
    checks = report.stages["checks"]
    rows, total = [], load_cpu + data_cpu + checks["cpu_s"]
    for name, stage in report.stages.items():
        if "steps" not in stage:  # the one-time stages: prefix, checks
            total += stage["cpu_s"] if name != "checks" else 0.0
            continue
        busy = stage["cpu_s"] / stage["seconds"]
        per_step = stage["per_step_s"] * busy
        fixed = stage["cpu_s"] - per_step * stage["steps"]
        domain = name.split("(")[-1].rstrip(")") if "(" in name else "routers"
        n = steps.get(domain, full.router_steps)
        estimate = fixed + per_step * n
        total += estimate
        rows.append({"stage": name, "fixed_s": fixed, "per_step_s": per_step, "full_steps": n, "full_s": estimate})
        print(f"{name:<20} fixed {fixed:7.1f} s  {per_step:6.2f} s/step  x {n:4d} steps -> {estimate:7.1f} s")
    print(
        f"CPU s: load {load_cpu:.1f}, data {data_cpu:.1f}, prefix {report.stages['prefix']['cpu_s']:.1f}, "
        f"pre-checks {checks['cpu_s']:.1f} (wall {checks['seconds']:.1f})"
    )
    print(f"extrapolated full build: {total / 60:.1f} CPU min on {torch.get_num_threads()} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "total_s": total, "threads": torch.get_num_threads(), "diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
