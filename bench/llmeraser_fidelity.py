"""LLMEraser against retraining's own noise: time per request and fidelity (issue 15, items 4-5 and its floors).

    OMP_NUM_THREADS=1 python bench/llmeraser_fidelity.py [--people 50] [--seeds 0 1 2] [--method fisher]

SmolLM2-135M + LoRA (rank 8 on the seven linear modules of the last two layers: 162,816 parameters) fine-tuned
on n = 10 x ``--people`` fictitious facts (3 epochs, batch 8, lr 2e-3, seed 0; cached like every fine-tune), and
a removal S of 5% of them. In order:

1. the gold standard: the fine-tuning rerun without S for every seed of ``--seeds`` (seed 0 replays the original
   run's initialisation and data order; the others draw new ones): its mean, and its spread, retraining's noise;
2. λ calibrated (:func:`unlearn_fast.methods.llmeraser.calibrate`) over ``--dampings`` on
   ``--calibration-sets`` removals of |S| examples disjoint from S, each retrained once (seed 0): λ is never
   chosen on S;
3. the curvature (``--method``) fitted once at the adapter (the build, timed), S erased with the calibrated λ
   (the first request), then another removal of |S| examples (a later request: the build is reused);
4. the exact damped Gauss-Newton solve of the same system (CG on the full curvature operator preconditioned by
   the fitted curvature, to ``--tol`` or ``--exact-max-hvps`` single-example products).

Fidelity is measured on answer log-probabilities (the sum over each answer's tokens): the removed examples, a
sample of retained ones, and held-out facts about people never trained on. The three error sources are reported
apart: the solver (fitted vs exact solve), the linearisation (exact solve vs retraining with the same seed) and
retraining's seed spread. Writes ``--out``.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import torch
from llmeraser_vs_retrain import MODULES, adapter_vector

from unlearn_fast.data import make_batches, make_fictitious_facts
from unlearn_fast.finetune import LLAMA_LINEAR_LAYERS, FinetuneConfig, finetune_cached
from unlearn_fast.methods.llmeraser import LLMEraser, LLMEraserConfig, calibrate
from unlearn_fast.models.causal_lm import sequence_logprobs

SETS = ("removed", "retained", "held_out")


def logprobs(model: torch.nn.Module, tokenizer, examples) -> torch.Tensor:
    """Each example's answer log-probability (sum over its answer tokens), float64."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [sequence_logprobs(model, b).sum_logp.double() for b in make_batches(tokenizer, examples, batch_size=16)]
        )


def unseen_facts(examples, count: int, seed: int) -> list:
    """``count`` facts about fictitious people not among ``examples``' people."""
    seen = {ex.person for ex in examples}
    fresh = make_fictitious_facts(num_people=count, questions_per_person=10, seed=seed)
    return [ex for ex in fresh if ex.person not in seen][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=50, help="n = 10 x people facts")
    parser.add_argument("--remove-percent", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="retraining seeds")
    parser.add_argument("--method", default="fisher", choices=["fisher", "ekfac"], help="the fitted curvature")
    parser.add_argument("--samples", type=int, default=1, help="sampled labels per example (fisher rows)")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0])
    parser.add_argument("--damping", type=float, default=None, help="skip calibration and use this λ")
    parser.add_argument("--calibration-sets", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--exact-max-hvps", type=int, default=2500, help="0: skip the exact solve")
    parser.add_argument("--eval-retained", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/llmeraser_fidelity"))
    args = parser.parse_args()

    examples = make_fictitious_facts(num_people=args.people, questions_per_person=10, seed=0)
    n = len(examples)
    rng = random.Random(0)
    removed = sorted(rng.sample(range(n), max(1, round(n * args.remove_percent / 100))))
    others = [i for i in range(n) if i not in set(removed)]
    later = sorted(rng.sample(others, len(removed)))  # the later request, after S
    retained = sorted(rng.sample([i for i in others if i not in set(later)], args.eval_retained))
    held_out = unseen_facts(examples, args.eval_retained, seed=1)
    eval_sets = {"removed": [examples[i] for i in removed], "retained": [examples[i] for i in retained],
                 "held_out": held_out}  # fmt: skip
    targets = tuple(f"layers.{layer}.{MODULES[m]}.{m}" for layer in (28, 29) for m in LLAMA_LINEAR_LAYERS)
    config = FinetuneConfig(lora_rank=8, lora_alpha=16, target_modules=targets, lr=2e-3, batch_size=8,
                            max_epochs=3, target_answer_prob=None, seed=0)  # fmt: skip
    original, tokenizer, ft_report, hit = finetune_cached("smollm2", examples, config, progress=False)
    epochs = ft_report.epochs
    print(
        f"n={n}, |S|={len(removed)}; fine-tuned ({'cached' if hit else f'{ft_report.train_time_s:.0f} s'})", flush=True
    )

    def scores(model) -> dict[str, torch.Tensor]:
        return {k: logprobs(model, tokenizer, v) for k, v in eval_sets.items()}

    def retrain(excluded, seed: int = 0):
        """The fine-tuning rerun without ``excluded`` (cached: a rerun of this bench retrains nothing); its model
        and the time its training took when it ran."""
        model, _, report, hit = finetune_cached("smollm2", examples, dataclasses.replace(config, seed=seed),
                                                exclude=excluded, progress=False)  # fmt: skip
        print(f"retrained without {len(excluded)} examples, seed {seed}: "
              f"{'cached, ' if hit else ''}{report.train_time_s:.0f} s", flush=True)  # fmt: skip
        return model, report.train_time_s

    base = scores(original)
    gold, retrain_times, theta_gold0 = [], [], None
    for seed in args.seeds:
        model, seconds = retrain(removed, seed)
        gold.append(scores(model))
        retrain_times.append(seconds)
        theta_gold0 = adapter_vector(model) if seed == 0 else theta_gold0
        del model

    eraser_config = LLMEraserConfig(curvature_method=args.method, curvature_samples=args.samples, check_fit=False,
                                    damping=args.damping or args.dampings[0])  # fmt: skip
    eraser = LLMEraser(original, examples, eraser_config, tokenizer=tokenizer)
    calibration = None
    if args.damping is None:
        start = time.perf_counter()
        calibration = calibrate(eraser, removed, lambda r: retrain(r)[0], args.dampings,
                                count=args.calibration_sets, seed=1)  # fmt: skip
        print(f"calibrated λ = {calibration.damping:g} in {time.perf_counter() - start:.0f} s: {calibration.errors}")
    damping = args.damping or calibration.damping

    eraser = LLMEraser(original, examples, dataclasses.replace(eraser_config, damping=damping), tokenizer=tokenizer)
    start = time.perf_counter()
    eraser.fit_curvature()
    build_s = time.perf_counter() - start
    first = eraser.remove(removed, progress=False)
    first_s = time.perf_counter() - start - build_s
    later_s = eraser.remove(later, progress=False).report.wall_time_s
    erased = scores(first.model)
    theta, theta_fit = adapter_vector(original), adapter_vector(first.model)
    print(f"build {build_s:.1f} s, first request {first_s:.1f} s, later {later_s:.1f} s", flush=True)

    exact = None
    # The exact solve does not depend on its preconditioner (to tol): kept per n and λ, so that another --method
    # reuses it.
    exact_file = args.out.parent / f"llmeraser_fidelity-exact-n{n}-lambda{damping:g}-tol{args.tol:g}.pt"
    if args.exact_max_hvps and exact_file.exists():
        exact = torch.load(exact_file, weights_only=False)
        print(f"exact solve: {exact_file} (cached)", flush=True)
    elif args.exact_max_hvps:
        curvature_dir = args.out.parent / f"{args.out.name}-curvature"
        eraser.save_curvature(curvature_dir)
        exact_config = dataclasses.replace(eraser_config, damping=damping, curvature_method="exact", solver="cg",
                                           preconditioner=args.method, tol=args.tol, max_hvps=args.exact_max_hvps)  # fmt: skip
        exact_eraser = LLMEraser(original, examples, exact_config, tokenizer=tokenizer)
        exact_eraser.load_curvature(curvature_dir)
        result = exact_eraser.remove(removed)
        exact = {"scores": scores(result.model), "theta": adapter_vector(result.model), "report": result.report}
        print(f"exact solve: residual {result.report.residual:.3g} after {result.report.hvps} HVPs, "
              f"{result.report.wall_time_s:.0f} s", flush=True)  # fmt: skip
        exact_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(exact, exact_file)

    payload = {
        "settings": {
            **vars(args),
            "out": str(args.out),
            "n": n,
            "removed": removed,
            "later": later,
            "finetune": dataclasses.asdict(config),
            "damping": damping,
        },  # fmt: skip
        "times": {
            "finetune_s": ft_report.train_time_s,
            "retrain_s": retrain_times,
            "build_s": build_s,
            "first_s": first_s,
            "later_s": later_s,
            "epochs": epochs,
        },  # fmt: skip
        "calibration": dataclasses.asdict(calibration) if calibration else None,
        "means": {
            name: {k: float(v.mean()) for k, v in s.items()}
            for name, s in [("original", base), ("llmeraser", erased)]
            + [(f"retrain seed {sd}", g) for sd, g in zip(args.seeds, gold)]
            + ([("exact", exact["scores"])] if exact else [])
        },  # fmt: skip
    }
    lines = report(args, payload, base, erased, gold, exact, theta, theta_fit, theta_gold0)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))


def report(args, payload, base, erased, gold, exact, theta, theta_fit, theta_gold0) -> list[str]:
    """The three tables: time per request, fidelity with retraining's spread, the error sources."""
    t = payload["times"]
    retrain_s = statistics.fmean(t["retrain_s"])
    n, lam = payload["settings"]["n"], payload["settings"]["damping"]
    epoch_s = retrain_s / t["epochs"] * n / (n - len(payload["settings"]["removed"]))
    lines = [
        f"# LLMEraser against retraining (bench/llmeraser_fidelity.py): n = {n}, |S| = "
        f"{len(payload['settings']['removed'])}, curvature {args.method}, λ = {lam:g} "
        f"({'calibrated on other removals' if payload['calibration'] else 'given by --damping, not calibrated'})",
        "",
        "| | time (s) | retraining / this |",
        "|---|---:|---:|",
        f"| retraining without S (mean of {len(t['retrain_s'])} seeds) | {retrain_s:.1f} | 1.0 |",
        f"| curvature build ({t['build_s'] / epoch_s:.2f} epochs of training compute) | {t['build_s']:.1f} | "
        f"{retrain_s / t['build_s']:.1f} |",
        f"| first request, build included | {t['build_s'] + t['first_s']:.1f} | "
        f"{retrain_s / (t['build_s'] + t['first_s']):.1f} |",
        f"| first request after the build | {t['first_s']:.1f} | {retrain_s / t['first_s']:.1f} |",
        f"| a later request | {t['later_s']:.1f} | {retrain_s / t['later_s']:.1f} |",
        "",
        "Mean answer log-probability per set; retraining: mean ± sd over seeds [min, max]; gap closed: "
        "(LLMEraser − original) / (retraining mean − original):",
        "",
        "| set | original | LLMEraser | exact solve | retraining | gap closed | within seed range |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for k in SETS:
        g = [float(s[k].mean()) for s in gold]
        mean, sd = statistics.fmean(g), statistics.stdev(g) if len(g) > 1 else 0.0
        o, e = float(base[k].mean()), float(erased[k].mean())
        x = f"{float(exact['scores'][k].mean()):.3f}" if exact else "–"
        # A gap smaller than retraining's own spread is noise: its ratio would mean nothing.
        closed = f"{100 * (e - o) / (mean - o):.0f}%" if abs(mean - o) > sd else "– (gap < sd)"
        lines.append(f"| {k} | {o:.3f} | {e:.3f} | {x} | {mean:.3f} ± {sd:.3f} [{min(g):.3f}, {max(g):.3f}] | "
                     f"{closed} | {'yes' if min(g) <= e <= max(g) else 'no'} |")  # fmt: skip

    def rms(a, b):
        return float((a - b).pow(2).mean().sqrt())

    change = rms(erased["retained"], base["retained"]) / rms(gold[0]["retained"], base["retained"])
    lines += ["", f"Retained examples: LLMEraser's RMS change of answer log-prob / retraining's (seed 0): {change:.2f}.",
              "", "Error sources on the removed examples (RMS over examples of the answer log-prob difference; "
              "adapter distances relative to ‖Θ_original − Θ_retrain seed 0‖):", "",
              "| source | what | log-prob RMS | adapter distance |", "|---|---|---:|---:|"]  # fmt: skip
    scale = float((theta - theta_gold0).norm())
    if exact:
        lines.append(f"| solver | {args.method} vs exact damped solve (residual {exact['report'].residual:.2g}) | "
                     f"{rms(erased['removed'], exact['scores']['removed']):.3f} | "
                     f"{float((theta_fit - exact['theta']).norm()) / scale:.3f} |")  # fmt: skip
        lines.append(f"| linearisation | exact solve vs retraining, seed 0 | "
                     f"{rms(exact['scores']['removed'], gold[0]['removed']):.3f} | "
                     f"{float((exact['theta'] - theta_gold0).norm()) / scale:.3f} |")  # fmt: skip
    lines.append(f"| total | {args.method} vs retraining, seed 0 | {rms(erased['removed'], gold[0]['removed']):.3f} | "
                 f"{float((theta_fit - theta_gold0).norm()) / scale:.3f} |")  # fmt: skip
    spread = [rms(g["removed"], gold[0]["removed"]) for g in gold[1:]]
    if spread:
        lines.append(f"| retraining's noise | seeds {args.seeds[1:]} vs seed 0 | "
                     f"{statistics.fmean(spread):.3f} | – |")  # fmt: skip
    if payload["calibration"]:
        errs = ", ".join(f"{k:g}: {v:.3f}" for k, v in payload["calibration"]["errors"].items())
        lines += ["", f"Calibration errors per λ (0 = what retraining does, 1 = no closer than not erasing): {errs}."]
    return lines


if __name__ == "__main__":
    main()
