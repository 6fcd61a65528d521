"""UOE against unlearning all parameters, on SmolLM2 upcycled into a 4-expert Mixtral.

    OMP_NUM_THREADS=2 python bench/uoe_vs_full.py [--steps 16] [--eval-every 2]

The model and data are the ``unlearn-fast uoe`` defaults (SmolLM2-135M upcycled to 4 experts,
top-2, its routers and experts fine-tuned on fictitious facts; cached on disk). Four runs from the
same fine-tuned model: UOE+GA and UOE+NPO (one expert and its router; Adam at ``--uoe-lr``, 1e-3
by default: the paper's 1e-4 barely moves in a few dozen steps) and GA and NPO on all parameters
(AdamW, lr 5e-5, the paper's baseline setting), batch 4.
Every ``--eval-every`` steps: forget efficacy FE (the mean answer probability on the forget split,
lower is more forgotten) and utility UT (the mean answer probability on a fixed sample of the
retain split and on the real-world facts). The table compares the methods at the same forget
efficacy: the lowest FE that every run reaches, with each run's UT at its first evaluation at or
below it (as the paper's Table 3 compares at matched FE), and the final state of each run.

Same run: the time of one UOE step with and without prefix caching at target layers 2/3 and 5/6 of
the depth, and the expert gradient memory of UOE's single-expert path against a plain autograd
backward through the fused expert parameters. Writes bench/results/uoe_vs_full.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch

from unlearn_fast import SOUL, UOE
from unlearn_fast.cli import _dataset, _finetuned, build_parser
from unlearn_fast.evaluate import answer_probability
from unlearn_fast.models import moe_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--retain-sample", type=int, default=16)
    parser.add_argument("--timing-steps", type=int, default=3)
    parser.add_argument(
        "--uoe-lr",
        type=float,
        default=1e-3,
        help="UOE's lr (the paper's 1e-4 is for ~500 steps at batch 16; this run has a few dozen)",
    )
    parser.add_argument("--full-lr", type=float, default=5e-5, help="all-parameter baselines' lr (the paper's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/uoe_vs_full"))
    args = parser.parse_args()

    cli = build_parser().parse_args(["uoe"])  # the command's defaults: same data, same cached fine-tune
    dataset = _dataset(cli)
    model, tokenizer, _ = _finetuned(cli, dataset)
    retain = random.Random(0).sample(dataset.retain, min(args.retain_sample, len(dataset.retain)))
    world = dataset.world_facts[: args.retain_sample]

    def metrics(m: torch.nn.Module) -> dict[str, float]:
        fe = statistics.mean(answer_probability(m, tokenizer, dataset.forget, batch_size=16))
        ret = statistics.mean(answer_probability(m, tokenizer, retain, batch_size=16))
        wor = statistics.mean(answer_probability(m, tokenizer, world, batch_size=16))
        return {"FE": fe, "retain": ret, "world": wor, "UT": (ret + wor) / 2}

    start_metrics = metrics(model)
    print(f"fine-tuned: {start_metrics}", flush=True)
    total_params = sum(p.numel() for p in model.parameters())

    def tracker(curve: list):
        def callback(step: int, m: torch.nn.Module, record: dict) -> None:
            if step % args.eval_every == 0:
                curve.append({"step": step, **metrics(m), "loss": record["loss"]})
                print(f"  step {step}: {curve[-1]}", flush=True)

        return callback

    runs: dict[str, dict] = {}
    for objective in ("ga", "npo"):
        curve: list = [{"step": 0, **start_metrics}]
        start = time.perf_counter()
        result = UOE(objective=objective, lr=args.uoe_lr, steps=args.steps, batch_size=4).unlearn(
            model, dataset.forget, dataset.retain, tokenizer=tokenizer, progress=False, callback=tracker(curve)
        )
        runs[f"UOE+{objective.upper()}"] = {
            "curve": curve,
            "time_s": time.perf_counter() - start,
            "target": result.target,
            "trained": result.trained_parameters,
        }
        print(f"UOE+{objective}: target {result.target}, {result.trained_parameters} parameters", flush=True)
        del result
    full = copy.deepcopy(model)
    full.requires_grad_(True)
    for objective in ("ga", "npo"):
        curve = [{"step": 0, **start_metrics}]
        start = time.perf_counter()
        SOUL(objective=objective, optimizer="adamw", lr=args.full_lr, steps=args.steps, batch_size=4).unlearn(
            full, dataset.forget, dataset.retain, tokenizer=tokenizer, progress=False, callback=tracker(curve)
        )
        runs[objective.upper()] = {"curve": curve, "time_s": time.perf_counter() - start, "trained": total_params}
    del full

    # Matched forget efficacy: the lowest FE every run reaches.
    level = max(min(p["FE"] for p in run["curve"]) for run in runs.values())
    rows = []
    for name, run in runs.items():
        at = next(p for p in run["curve"] if p["FE"] <= level)
        last = run["curve"][-1]
        rows.append(
            f"| {name} | {100 * run['trained'] / total_params:.3f}% | {at['step']} | {at['FE']:.4f} | "
            f"{at['UT']:.4f} ({at['retain']:.3f} / {at['world']:.3f}) | {last['FE']:.4f} | {last['UT']:.4f} | "
            f"{run['time_s']:.0f} |"
        )

    # Prefix caching and gradient memory, on the same model.
    layers = len(moe_layers(model))
    timing = {}
    for layer in (round(2 * layers / 3), round(5 * layers / 6)):
        for cache in (True, False):
            times: list[float] = []
            last = [time.perf_counter()]

            def clock(step, m, record, times=times, last=last):
                now = time.perf_counter()
                times.append(now - last[0])
                last[0] = now

            uoe = UOE(
                objective="ga",
                lr=args.uoe_lr,
                steps=args.timing_steps + 1,
                batch_size=4,
                target=(layer, 0),
                prefix_cache=cache,
            )
            uoe.unlearn(model, dataset.forget, dataset.retain, tokenizer=tokenizer, progress=False, callback=clock)
            timing[(layer, cache)] = statistics.median(times[1:])  # the first includes the set-up
        print(
            f"layer {layer}: step {timing[(layer, False)]:.2f} s without prefix cache, "
            f"{timing[(layer, True)]:.2f} s with",
            flush=True,
        )
    memory = expert_gradient_memory(model, tokenizer, dataset.forget[:4])

    lines = [
        f"UOE vs all-parameter unlearning: SmolLM2-135M upcycled to 4 experts (top-2), fine-tuned on "
        f"{len(dataset.forget) + len(dataset.retain)} fictitious facts; forget {len(dataset.forget)}. "
        f"{args.steps} steps of batch 4 (UOE lr {args.uoe_lr:g}, all-parameter lr {args.full_lr:g}); FE = forget answer probability (lower: more forgotten), UT = mean of "
        f"retain-sample and world-facts answer probabilities. Fine-tuned: FE {start_metrics['FE']:.4f}, "
        f"UT {start_metrics['UT']:.4f}.",
        "",
        f"Matched forget efficacy: FE ≤ {level:.4f}.",
        "",
        "| method | trained | step | FE | UT (retain / world) | final FE | final UT | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| target layer | step with prefix cache (s) | without (s) | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for layer in sorted({k[0] for k in timing}):
        lines.append(
            f"| {layer} of {layers} | {timing[(layer, True)]:.2f} | {timing[(layer, False)]:.2f} | "
            f"{timing[(layer, False)] / timing[(layer, True)]:.2f}x |"
        )
    lines += [
        "",
        f"Expert gradient memory: {memory['single']:,} bytes (UOE, e* only) vs {memory['fused']:,} bytes "
        f"(autograd through the fused [E,2I,H] and [E,H,I] parameters): {memory['single'] / memory['fused']:.3f}.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "settings": {**vars(args), "out": str(args.out)},
                "start": start_metrics,
                "runs": runs,
                "level": level,
                "timing": {f"{k[0]}/{'cache' if k[1] else 'no cache'}": v for k, v in timing.items()},
                "memory": memory,
            },
            indent=1,
            default=str,
        )
    )
    args.out.with_suffix(".md").write_text(text)


def expert_gradient_memory(model, tokenizer, examples) -> dict[str, int]:
    """Bytes of expert weight gradients after one backward: UOE's single-expert path vs plain autograd."""
    from unlearn_fast.data import make_batches
    from unlearn_fast.finetune import answer_loss
    from unlearn_fast.models.expert_training import train_single_expert

    batch = next(iter(make_batches(tokenizer, examples, batch_size=len(examples))))
    layer, block = moe_layers(model)[-1]
    m = copy.deepcopy(model)
    m.requires_grad_(False)
    with train_single_expert(m, layer, 0) as se:
        answer_loss(m, batch).backward()
        single = sum(p.grad.numel() * p.grad.element_size() for p in se.parameters())
    m = copy.deepcopy(model)
    m.requires_grad_(False)
    experts = dict(moe_layers(m))[layer].experts
    experts.requires_grad_(True)
    answer_loss(m, batch).backward()
    fused = sum(p.grad.numel() * p.grad.element_size() for p in experts.parameters())
    return {"single": single, "fused": fused}


if __name__ == "__main__":
    main()
