"""LLMEraser's cost against retraining, as the training set and the epochs grow.

    OMP_NUM_THREADS=1 python bench/llmeraser_cost.py [--sizes 500 2000] [--epochs 3] [--sample 32]

For each training-set size n: a LoRA (rank 8, the last two decoder layers of SmolLM2-135M) is
fine-tuned on n fictitious facts for ``--epochs`` epochs (timed: the cost of training on n
examples), then 5% of the examples are removed by LLMEraser with the curvature estimated on a
fixed sample of ``--sample`` training examples (``curvature_sample``; CG to tol 1e-3, no fit
check, at most --max-hvps curvature products), so that the solve costs the same at any n. The first size is fine-tuned for ``--epochs``
and ``--short-epochs`` epochs, the others for ``--short-epochs`` only (CPU time). At the first size the removal is also done by
retraining without the removed examples (same initialisation and data order; timed), and the
removed/retained losses of the three adapters are compared ("gap closed" as in
bench/llmeraser_vs_retrain.py). LLMEraser is also timed on an adapter fine-tuned for
``--short-epochs`` epochs: its cost should not depend on how long fine-tuning ran. All times come
from this one run; writes bench/results/llmeraser_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from llmeraser_vs_retrain import MODULES, example_losses, retrain_without

from unlearn_fast.data import make_fictitious_facts
from unlearn_fast.finetune import LLAMA_LINEAR_LAYERS, FinetuneConfig, finetune_cached
from unlearn_fast.methods.llmeraser import LLMEraser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--short-epochs", type=int, default=1)
    parser.add_argument("--sample", type=int, default=32, help="curvature_sample")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--max-hvps", type=int, default=640, help="solver budget (20 CG iterations at --sample 32)")
    parser.add_argument("--remove-percent", type=float, default=5.0)
    parser.add_argument(
        "--fit-larger",
        action="store_true",
        help="fine-tune an adapter at every size (default: the larger sizes edit the first size's "
        "adapter, the cost of an edit not depending on the adapter's values)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="fine-tune cache (default: the user cache)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llmeraser_cost"))
    args = parser.parse_args()
    targets = tuple(f"layers.{layer}.{MODULES[m]}.{m}" for layer in (28, 29) for m in LLAMA_LINEAR_LAYERS)

    def config(epochs: int) -> FinetuneConfig:
        return FinetuneConfig(
            lora_rank=8,
            lora_alpha=16,
            target_modules=targets,
            lr=2e-3,
            batch_size=8,
            max_epochs=epochs,
            target_answer_prob=None,
            seed=0,
        )

    def erase(model, tokenizer, examples, removed) -> tuple[LLMEraser, object]:
        eraser = LLMEraser(
            model,
            examples,
            tokenizer=tokenizer,
            solver="cg",
            damping=args.damping,
            curvature_sample=args.sample,
            check_fit=False,
            max_hvps=args.max_hvps,
        )
        return eraser, eraser.remove(removed)

    rows: list[dict] = []
    first_adapter = None
    # The first size at both epoch counts (LLMEraser's cost should not depend on them), the short one last: the
    # cheap measurements come first on a slow machine.
    jobs = [(args.sizes[0], args.epochs), *((n, args.epochs) for n in args.sizes[1:])]
    if args.short_epochs != args.epochs:
        jobs.append((args.sizes[0], args.short_epochs))
    for n, epochs in jobs:
        examples = make_fictitious_facts(num_people=-(-n // 10), questions_per_person=10, seed=0)[:n]
        removed = sorted(random.Random(0).sample(range(n), round(n * args.remove_percent / 100)))
        start = time.perf_counter()
        if n != args.sizes[0] and not args.fit_larger:
            # The edit's cost depends on n, |S| and the solver budget, not on the adapter's values (same
            # shapes, same operations); fine-tuning at every size would dominate this CPU run.
            (model, tokenizer), train_time, hit = first_adapter, math.nan, False
            print(f"n={n}: editing the n={args.sizes[0]} adapter (no fine-tune at this size)", flush=True)
        else:
            model, tokenizer, ft, hit = finetune_cached(
                "smollm2", examples, config(epochs), cache_dir=args.cache_dir, progress=False
            )
            train_time = ft.wall_time_s  # as measured when trained (a cache hit replays the record)
            print(
                f"n={n}, {epochs} epochs: fine-tuned in {train_time:.0f} s "
                f"({'cache hit' if hit else 'trained'}, {time.perf_counter() - start:.0f} s now)",
                flush=True,
            )
            if first_adapter is None:
                first_adapter = (model, tokenizer)
        _, result = erase(model, tokenizer, examples, removed)
        report = result.report
        row = {
            "n": n,
            "epochs": epochs,
            "removed": len(removed),
            "train_time_s": train_time,
            "train_cache_hit": hit,
            "llmeraser_time_s": report.wall_time_s,
            "gradient_time_s": report.gradient_time_s,
            "solve_time_s": report.solve_time_s,
            "hvps": report.hvps,
            "residual": report.residual,
            "converged": report.converged,
        }
        print(
            f"  LLMEraser: {report.wall_time_s:.1f} s ({report.hvps} HVPs, residual {report.residual:.2g})", flush=True
        )
        rows.append(row)
        if len(rows) == 1:
            first_job = (examples, removed, result.model)
        del result
        write(args, rows, None)

    # Retraining last: the longest measurement.
    examples, removed, erased = first_job
    model, tokenizer = first_adapter
    n, epochs = jobs[0]
    retrained, rows[0]["retrain_time_s"] = retrain_without(examples, set(removed), config(epochs), epochs, tokenizer)
    print(f"  retrained without them: {rows[0]['retrain_time_s']:.0f} s", flush=True)
    kept = [i for i in range(n) if i not in set(removed)]
    comparison = {}
    for name, m in (("original", model), ("LLMEraser", erased), ("retrained", retrained)):
        losses = example_losses(m, tokenizer, examples)
        comparison[name] = {"removed": losses[removed].mean().item(), "retained": losses[kept].mean().item()}
    for split in ("removed", "retained"):
        gap = comparison["retrained"][split] - comparison["original"][split]
        comparison["LLMEraser"][f"{split}_gap_closed"] = (
            comparison["LLMEraser"][split] - comparison["original"][split]
        ) / gap
    write(args, rows, comparison)


def write(args, rows: list[dict], comparison: dict | None) -> None:
    first = next(r for r in rows if r["n"] == args.sizes[0] and r["epochs"] == args.epochs)
    lines = [
        f"LLMEraser cost vs training: SmolLM2-135M, LoRA r=8 on layers 28-29 (7 modules), remove "
        f"{args.remove_percent:g}%; curvature_sample={args.sample}, CG to tol 1e-3, λ={args.damping:g}; "
        f"torch threads {torch.get_num_threads()}.",
        "",
        "| n | epochs | training time (s) | LLMEraser time (s) | ratio | HVPs | residual |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trained = "not fine-tuned here" if math.isnan(r["train_time_s"]) else f"{r['train_time_s']:.0f}"
        lines.append(
            f"| {r['n']} | {r['epochs']} | {trained} | {r['llmeraser_time_s']:.1f} | "
            f"{r['llmeraser_time_s'] / r['train_time_s']:.3f} | {r['hvps']} | {r['residual']:.2g} |"
        )
    if "retrain_time_s" in first:
        lines += [
            "",
            f"Retraining without the removed examples at n={first['n']}: {first['retrain_time_s']:.0f} s; "
            f"LLMEraser / retraining = {first['llmeraser_time_s'] / first['retrain_time_s']:.3f}.",
        ]
    for r in rows:
        if r is not first:
            lines.append(
                f"LLMEraser time at n={r['n']}, {r['epochs']} epochs / at n={first['n']}, {first['epochs']} "
                f"epochs: {r['llmeraser_time_s'] / first['llmeraser_time_s']:.2f}."
            )
    if comparison:
        lines += ["", f"At n={first['n']}: | adapter | removed loss | retained loss |", "|---|---:|---:|"]
        for name, c in comparison.items():
            lines.append(f"| {name} | {c['removed']:.4f} | {c['retained']:.4f} |")
        c = comparison["LLMEraser"]
        lines.append(
            f"LLMEraser closes {100 * c['removed_gap_closed']:.0f}% of the removed-loss gap; retained loss "
            f"{100 * (c['retained'] / comparison['retrained']['retained'] - 1):+.1f}% vs retrained."
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "settings": {**vars(args), "out": str(args.out), "cache_dir": str(args.cache_dir)},
                "rows": rows,
                "comparison": comparison,
            },
            indent=1,
        )
    )
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
