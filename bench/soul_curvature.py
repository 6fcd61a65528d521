"""SOUL's claim with its curvature at work: Sophia-G against AdamW at matched utility.

    OMP_NUM_THREADS=1 python bench/soul_curvature.py [--objectives gdiff npo] [--lrs 1e-4 3e-4 1e-3] [--seeds 0 1]

SmolLM2-135M with the demo's cached LoRA (fine-tuned on the fictitious facts, as `unlearn-fast
demo`), unlearned with each objective x optimizer x lr x seed for --steps steps. Every
--eval-every steps the run records the forget answer probability (lower: more forgotten) and the
retain answer probability (a fixed sample of the retain split; the utility proxy), so each run
traces a path through the (utility, forgetting) plane. Per objective and optimizer, the forget
probability at matched utility is read off each path where the retain probability first falls to
--floor x its initial value (linear interpolation between evaluations; runs that never fall that
far give their last point, marked), then averaged over seeds at the best lr. Sophia's win rate
(the share of coordinates its clip leaves alone) is reported per run: first, median and last step.
The gold model (fine-tuned on the retain split alone) gives the forget level retraining reaches.

Writes bench/results/soul_curvature.{json,md} and a PNG of the paths.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from unlearn_fast import SOUL, SOULConfig
from unlearn_fast.data import make_facts_dataset
from unlearn_fast.finetune import FinetuneConfig, finetune_cached
from unlearn_fast.training import answer_probability


def at_floor(path: list[tuple[int, float, float]], floor: float) -> tuple[float, bool]:
    """The forget probability where the path's retain probability first reaches ``floor``
    (interpolated), and whether it did; else the path's last forget probability."""
    for (_, r0, f0), (_, r1, f1) in zip(path, path[1:]):
        if r1 <= floor < r0 or r1 <= floor == r0:
            t = (r0 - floor) / (r0 - r1) if r0 != r1 else 1.0
            return f0 + t * (f1 - f0), True
    return path[-1][2], False


def at_forget_level(path: list[tuple[int, float, float]], level: float) -> tuple[float, float, bool]:
    """(retain probability, step) where the path's forget probability first falls to ``level``
    (interpolated between evaluations), and whether it did; else the path's last point."""
    for (s0, r0, f0), (s1, r1, f1) in zip(path, path[1:]):
        if f1 <= level < f0:
            t = (f0 - level) / (f0 - f1)
            return r0 + t * (r1 - r0), s0 + t * (s1 - s0), True
    return path[-1][1], path[-1][0], False


def matched_forgetting_table(runs: list[dict], initial: dict, lrs: list[float]) -> list[str]:
    """Utility when forgetting matches retraining: the retain probability at the gold model's
    forget level, per objective, optimizer and lr (mean ± half-range over seeds)."""
    level = initial["gold_forget"]
    lines = [
        f"Retain answer probability (utility) when the forget answer probability first reaches the gold "
        f"model's level {level:.3f} (fine-tuned: retain {initial['retain']:.3f}, forget {initial['forget']:.3f}; "
        f"gold: retain {initial['gold_retain']:.3f}); mean ± half-range over seeds:",
        "",
        "| objective | optimizer | lr | retain prob at gold forget level | at step | seeds reaching it |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["objective"], r["optimizer"]) for r in runs}, key=lambda k: (k[0], k[1] != "sophia"))
    for objective, optimizer in keys:
        for lr in lrs:
            mine = [
                at_forget_level(r["path"], level)
                for r in runs
                if (r["objective"], r["optimizer"], r["lr"]) == (objective, optimizer, lr)
            ]
            if not mine:
                continue
            retain, steps = [m[0] for m in mine], [m[1] for m in mine]
            lines.append(
                f"| {objective} | {optimizer} | {lr:g} | {statistics.mean(retain):.3f} ± "
                f"{(max(retain) - min(retain)) / 2:.3f} | {statistics.mean(steps):.1f} | "
                f"{sum(m[2] for m in mine)}/{len(mine)} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--objectives", nargs="+", default=["gdiff", "npo"])
    parser.add_argument("--optimizers", nargs="+", default=["sophia", "adamw"])
    parser.add_argument("--floor", type=float, default=0.9, help="matched utility: this x the initial retain prob")
    parser.add_argument("--eval-retain-size", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soul_curvature"))
    parser.add_argument("--report", type=Path, help="only rebuild the matched-forgetting table from this run's JSON")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        lrs = sorted({r["lr"] for r in saved["runs"]})
        print("\n".join(matched_forgetting_table(saved["runs"], saved["initial"], lrs)))
        return

    data = make_facts_dataset(num_people=20, questions_per_person=10, forget_percent=10, seed=0)
    model, tokenizer, _, _ = finetune_cached("smollm2", data.forget + data.retain, FinetuneConfig(), progress=False)
    gold, _, _, _ = finetune_cached("smollm2", data.retain, FinetuneConfig(), progress=False)
    probe = SOULConfig()
    from unlearn_fast.data import as_batches

    def batches(rows):
        return as_batches(rows, tokenizer=tokenizer, batch_size=8, max_length=probe.max_length, what="eval")

    forget_eval = batches(data.forget)
    retain_eval = batches(random.Random(0).sample(data.retain, args.eval_retain_size))
    initial = {
        "forget": answer_probability(model, forget_eval),
        "retain": answer_probability(model, retain_eval),
        "gold_forget": answer_probability(gold, forget_eval),
        "gold_retain": answer_probability(gold, retain_eval),
    }
    del gold
    print("initial:", json.dumps(initial), flush=True)
    floor = args.floor * initial["retain"]

    runs = []
    for objective in args.objectives:
        for optimizer in args.optimizers:
            for lr in args.lrs:
                for seed in args.seeds:
                    path = [(0, initial["retain"], initial["forget"])]

                    def record(step, m, rec, path=path):
                        if step % args.eval_every == 0:
                            path.append((step, answer_probability(m, retain_eval), answer_probability(m, forget_eval)))

                    start = time.perf_counter()
                    result = SOUL(objective=objective, optimizer=optimizer, lr=lr, steps=args.steps, seed=seed).unlearn(
                        model, data.forget, data.retain, tokenizer=tokenizer, progress=False, callback=record
                    )
                    rates = [r["win_rate"] for r in result.history if "win_rate" in r]
                    forget_at, reached = at_floor(path, floor)
                    runs.append(
                        {
                            "objective": objective,
                            "optimizer": optimizer,
                            "lr": lr,
                            "seed": seed,
                            "seconds": time.perf_counter() - start,
                            "path": path,
                            "forget_at_floor": forget_at,
                            "reached_floor": reached,
                            "win_rate": [rates[0], statistics.median(rates), rates[-1]] if rates else None,
                        }
                    )
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "path"}), flush=True)
                    del result

    summary = []
    for objective in args.objectives:
        for optimizer in args.optimizers:
            per_lr = []
            for lr in args.lrs:
                mine = [r for r in runs if (r["objective"], r["optimizer"], r["lr"]) == (objective, optimizer, lr)]
                values = [r["forget_at_floor"] for r in mine]
                per_lr.append(
                    {
                        "lr": lr,
                        "mean": statistics.mean(values),
                        "spread": (max(values) - min(values)) / 2,
                        "reached": sum(r["reached_floor"] for r in mine),
                        "runs": len(mine),
                    }
                )
            best = min(per_lr, key=lambda x: x["mean"])
            summary.append({"objective": objective, "optimizer": optimizer, **best})

    lines = [
        f"Forget answer probability at matched utility (retain answer probability = {args.floor:g} x "
        f"{initial['retain']:.3f} = {floor:.3f}); fine-tuned forget {initial['forget']:.3f}, gold (retain-only) "
        f"forget {initial['gold_forget']:.3f}. {args.steps} steps, batch 4, best lr per row, mean ± half-range "
        f"over seeds {args.seeds}:",
        "",
        "| objective | optimizer | best lr | forget prob at floor | seeds reaching the floor |",
        "|---|---|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['objective']} | {s['optimizer']} | {s['lr']:g} | {s['mean']:.3f} ± {s['spread']:.3f} | "
            f"{s['reached']}/{s['runs']} |"
        )
    lines += ["", *matched_forgetting_table(runs, initial, args.lrs)]
    lines += [
        "",
        "All runs (win rate: first / median / last step):",
        "",
        "| objective | optimizer | lr | seed | forget at floor | reached | win rate | s |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in runs:
        wr = " / ".join(f"{w:.3f}" for w in r["win_rate"]) if r["win_rate"] else "-"
        lines.append(
            f"| {r['objective']} | {r['optimizer']} | {r['lr']:g} | {r['seed']} | {r['forget_at_floor']:.3f} | "
            f"{'yes' if r['reached_floor'] else 'no (last)'} | {wr} | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"initial": initial, "floor": floor, "runs": runs, "summary": summary}, indent=1)
    )
    args.out.with_suffix(".md").write_text(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(args.objectives), figsize=(5 * len(args.objectives), 4), squeeze=False)
    for ax, objective in zip(axes[0], args.objectives):
        for r in (r for r in runs if r["objective"] == objective):
            style = "-" if r["optimizer"] == "sophia" else "--"
            ax.plot(
                [p[1] for p in r["path"]],
                [p[2] for p in r["path"]],
                style,
                alpha=0.7,
                label=f"{r['optimizer']} lr {r['lr']:g} s{r['seed']}",
            )
        ax.axvline(floor, color="grey", lw=0.8)
        ax.axhline(initial["gold_forget"], color="green", lw=0.8)
        ax.set(title=objective, xlabel="retain answer probability (utility)", ylabel="forget answer probability")
        ax.invert_xaxis()
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
