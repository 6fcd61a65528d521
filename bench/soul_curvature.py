"""SOUL's claim with its curvature at work: Sophia (GNB and Hutchinson) against AdamW at matched utility.

    OMP_NUM_THREADS=1 python bench/soul_curvature.py [--shard 0/2]   # one process per core: --shard 0/2, 1/2
    python bench/soul_curvature.py --report bench/results/soul_curvature-shard*of2.json

SmolLM2-135M with the demo's cached LoRA (fine-tuned on the fictitious facts, as `unlearn-fast
demo`), unlearned with each objective (GA, GradDiff, NPO) x optimizer (Sophia-G, Sophia-H, AdamW)
x lr x seed for at most --steps steps. Every --eval-every steps the run records the forget answer
probability (lower: more forgotten) and the retain answer probability (a fixed sample of the
retain split; the utility proxy), so each run traces a path through the (utility, forgetting)
plane; a run stops once it has crossed both the gold forget level and the utility floor (nothing
later is read). The gold model (fine-tuned on the retain split alone) gives the forget level
retraining reaches.

Read-outs, per objective and optimizer, over all lrs (each optimizer's frontier), mean ±
half-range over seeds: the forget probability at matched utility (retain = --floor x its initial
value, interpolated along each path) and the retain probability at matched forgetting (forget =
the gold level); the per-lr table of the latter; and every run with Sophia's win rate (the share
of coordinates its clip leaves alone: first, median and last step). Configurations run seed by
seed, so an interrupted grid still covers every configuration for the first seeds; a rerun
resumes from the JSON.

Writes bench/results/soul_curvature[-shardIofN].{json,md,png}.
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
        f"gold: retain {initial['gold_retain']:.3f}); mean ± half-range over the seeds that reach it:",
        "",
        "| objective | optimizer | lr | retain prob at gold forget level | at step | seeds reaching it |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["objective"], r["optimizer"]) for r in runs}, key=lambda k: (k[0], list(OPTIMIZERS).index(k[1])))
    for objective, optimizer in keys:
        for lr in lrs:
            mine = [
                at_forget_level(r["path"], level)
                for r in runs
                if (r["objective"], r["optimizer"], r["lr"]) == (objective, optimizer, lr)
            ]
            if not mine:
                continue
            reached = [m for m in mine if m[2]]
            if not reached:  # no seed got there within the steps: the last point, for reference
                lines.append(
                    f"| {objective} | {optimizer} | {lr:g} | not reached (last retain "
                    f"{statistics.mean(m[0] for m in mine):.3f}) | - | 0/{len(mine)} |"
                )
                continue
            retain, steps = [m[0] for m in reached], [m[1] for m in reached]
            lines.append(
                f"| {objective} | {optimizer} | {lr:g} | {statistics.mean(retain):.3f} ± "
                f"{(max(retain) - min(retain)) / 2:.3f} | {statistics.mean(steps):.1f} | {len(reached)}/{len(mine)} |"
            )
    return lines


OPTIMIZERS = {  # bench name -> SOUL keyword arguments
    "sophia": {"optimizer": "sophia", "estimator": "gnb"},
    "sophia-hutchinson": {"optimizer": "sophia", "estimator": "hutchinson"},
    "adamw": {"optimizer": "adamw"},
}


def frontier_table(runs: list[dict], initial: dict, floor: float) -> list[str]:
    """Each optimizer's forgetting at matched utility, read off its frontier: per seed, the lowest
    forget probability any lr reaches while the retain probability is still >= ``floor`` (each
    path interpolated at the floor; a path that never falls that far contributes its last point),
    then mean ± half-range over seeds; and the utility at matched forgetting, read the same way:
    the highest retain probability any lr keeps where the forget probability reaches the gold level."""
    lines = [
        f"Frontiers over all lrs. Forget answer probability at matched utility (retain = {floor:.3f}; lower is "
        f"better) and retain answer probability at matched forgetting (forget = gold {initial['gold_forget']:.3f}; "
        "higher is better), mean ± half-range over seeds; the Sophia runs' win rate (first / median / last step, "
        "median over the runs on the frontier):",
        "",
        "| objective | optimizer | forget at matched utility | lr on frontier | retain at matched forgetting "
        "| lr on frontier | win rate |",
        "|---|---|---:|---|---:|---|---|",
    ]
    keys = sorted({(r["objective"], r["optimizer"]) for r in runs}, key=lambda k: (k[0], list(OPTIMIZERS).index(k[1])))
    for objective, optimizer in keys:
        mine = [r for r in runs if (r["objective"], r["optimizer"]) == (objective, optimizer)]
        forget, retain, lr_f, lr_r, rates = [], [], [], [], []
        for seed in sorted({r["seed"] for r in mine}):
            seeded = [r for r in mine if r["seed"] == seed]
            best_f = min(seeded, key=lambda r: at_floor(r["path"], floor)[0])
            forget.append(at_floor(best_f["path"], floor)[0])
            lr_f.append(best_f["lr"])
            reached = [r for r in seeded if at_forget_level(r["path"], initial["gold_forget"])[2]]
            if reached:
                best_r = max(reached, key=lambda r: at_forget_level(r["path"], initial["gold_forget"])[0])
                retain.append(at_forget_level(best_r["path"], initial["gold_forget"])[0])
                lr_r.append(best_r["lr"])
            if best_f["win_rate"]:
                rates.append(best_f["win_rate"])
        wr = " / ".join(f"{statistics.median(x):.2f}" for x in zip(*rates)) if rates else "-"
        ret = f"{statistics.mean(retain):.3f} ± {(max(retain) - min(retain)) / 2:.3f}" if retain else "not reached"
        lines.append(
            f"| {objective} | {optimizer} | {statistics.mean(forget):.3f} ± {(max(forget) - min(forget)) / 2:.3f} | "
            f"{', '.join(f'{x:g}' for x in lr_f)} | {ret} ({len(retain)}/{len(lr_f)} seeds) | "
            f"{', '.join(f'{x:g}' for x in lr_r) or '-'} | {wr} |"
        )
    return lines


def runs_table(runs: list[dict], floor: float) -> list[str]:
    lines = [
        "All runs (forget at matched utility: interpolated at the floor, else the last point; win rate: first / "
        "median / last step):",
        "",
        "| objective | optimizer | lr | seed | steps run | forget at floor | reached | win rate | s |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in runs:
        forget_at, reached = at_floor(r["path"], floor)
        wr = " / ".join(f"{w:.3f}" for w in r["win_rate"]) if r["win_rate"] else "-"
        lines.append(
            f"| {r['objective']} | {r['optimizer']} | {r['lr']:g} | {r['seed']} | {r['path'][-1][0]} | "
            f"{forget_at:.3f} | {'yes' if reached else 'no (last)'} | {wr} | {r['seconds']:.0f} |"
        )
    return lines


def report(saved: dict, out: Path | None) -> str:
    runs, initial, floor = saved["runs"], saved["initial"], saved["floor"]
    lrs = sorted({r["lr"] for r in runs})
    text = "\n".join(
        [
            *frontier_table(runs, initial, floor),
            "",
            *matched_forgetting_table(runs, initial, lrs),
            "",
            *runs_table(runs, floor),
        ]
    )
    if out is not None:
        out.with_suffix(".md").write_text(text + "\n")
        plot(runs, initial, floor, out.with_suffix(".png"))
    return text


def plot(runs: list[dict], initial: dict, floor: float, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    objectives = sorted({r["objective"] for r in runs})
    colours = {"sophia": "tab:blue", "sophia-hutchinson": "tab:orange", "adamw": "tab:red"}
    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 4.2), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        for optimizer, colour in colours.items():
            mine = [r for r in runs if (r["objective"], r["optimizer"]) == (objective, optimizer)]
            for r in mine:
                ax.plot([p[1] for p in r["path"]], [p[2] for p in r["path"]], color=colour, alpha=0.25, lw=0.8)
            points = sorted((p[1], p[2]) for r in mine for p in r["path"])
            frontier, best = [], float("inf")
            for retain, forget in reversed(points):  # from high utility down: the lowest forget so far
                if forget < best:
                    best = forget
                    frontier.append((retain, forget))
            if frontier:
                ax.plot(*zip(*frontier), color=colour, lw=2, label=f"{optimizer} frontier (all lrs, seeds)")
        ax.axvline(floor, color="grey", lw=0.8, ls=":")
        ax.axhline(initial["gold_forget"], color="green", lw=0.8, ls=":", label="gold (retain-only) forget")
        ax.set(title=objective, xlabel="retain answer probability (utility)", ylabel="forget answer probability")
        ax.invert_xaxis()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=["ga", "gdiff", "npo"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--floor", type=float, default=0.9, help="matched utility: this x the initial retain prob")
    parser.add_argument("--eval-retain-size", type=int, default=24)
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th configuration starting at I")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soul_curvature"))
    parser.add_argument(
        "--report", type=Path, nargs="+", help="only rebuild the tables and plot from these runs' JSON (shards merged)"
    )
    args = parser.parse_args()
    if args.report:
        saved = [json.loads(p.read_text()) for p in args.report]
        merged = {**saved[0], "runs": [r for s in saved for r in s["runs"]]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(report(merged, args.out))
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

    shard, shards = map(int, args.shard.split("/"))
    out = args.out if shards == 1 else args.out.with_name(f"{args.out.name}-shard{shard}of{shards}")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.with_suffix(".json").read_text())["runs"] if out.with_suffix(".json").exists() else []
    done = {(r["objective"], r["optimizer"], r["lr"], r["seed"]) for r in runs}  # resume after an interruption
    grid = [
        (o, opt, lr, seed) for seed in args.seeds for o in args.objectives for opt in args.optimizers for lr in args.lrs
    ][shard::shards]
    for objective, optimizer, lr, seed in (g for g in grid if g not in done):
        path = [(0, initial["retain"], initial["forget"])]

        def record(step, m, rec, path=path):
            if step % args.eval_every:
                return False
            path.append((step, answer_probability(m, retain_eval), answer_probability(m, forget_eval)))
            # Both read-outs are in once the path has crossed the gold forget level and the utility floor.
            return path[-1][2] <= initial["gold_forget"] and path[-1][1] <= floor

        start = time.perf_counter()
        result = SOUL(objective=objective, lr=lr, steps=args.steps, seed=seed, **OPTIMIZERS[optimizer]).unlearn(
            model, data.forget, data.retain, tokenizer=tokenizer, progress=False, callback=record
        )
        rates = [r["win_rate"] for r in result.history if "win_rate" in r]
        runs.append(
            {
                "objective": objective,
                "optimizer": optimizer,
                "lr": lr,
                "seed": seed,
                "seconds": time.perf_counter() - start,
                "path": path,
                "win_rate": [rates[0], statistics.median(rates), rates[-1]] if rates else None,
            }
        )
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "path"}), flush=True)
        out.with_suffix(".json").write_text(json.dumps({"initial": initial, "floor": floor, "runs": runs}, indent=1))
        del result
    print(report({"initial": initial, "floor": floor, "runs": runs}, out))


if __name__ == "__main__":
    main()
