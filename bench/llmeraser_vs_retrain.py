"""LLMEraser against retraining: SmolLM2-135M + LoRA fine-tuned on fictitious facts.

    OMP_NUM_THREADS=1 python bench/llmeraser_vs_retrain.py [--people 4] [--questions 10]
        [--remove-percent 5] [--dampings 1e-3] [--solver cg] [--epochs 15]

A LoRA is fine-tuned on n fictitious facts (:func:`unlearn_fast.finetune.finetune_cached`, fixed
epochs); ``--remove-percent`` of them are then unlearned twice: by LLMEraser (instance removal,
one influence step per damping), and by the gold standard, retraining the LoRA from the same
initialisation with the same per-epoch data order minus the removed examples, for the same number
of epochs (:func:`retrain_without`: ``finetune(..., exclude=removed)``). Reported: the removed and the retained
examples' mean answer loss under the original, LLMEraser and retrained adapters, the share of the
original -> retrained change that LLMEraser makes ("gap closed"), and the times. Writes
bench/results/llmeraser_vs_retrain.{json,md}.

By default the adapter sits on the last two decoder layers (all seven linear modules, rank 8):
every curvature product still runs the full forward pass, but differentiates the top layers only,
so the run fits a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from unlearn_fast import models
from unlearn_fast.data import QAExample, make_batches, make_fictitious_facts
from unlearn_fast.evaluate import sequence_logprobs
from unlearn_fast.finetune import LLAMA_LINEAR_LAYERS, FinetuneConfig, finetune, finetune_cached
from unlearn_fast.methods.llmeraser import LLMEraser
from unlearn_fast.solvers import IterationInfo

MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def retrain_without(
    examples: Sequence[QAExample], removed: set[int], config: FinetuneConfig, epochs: int, tokenizer: Any
) -> tuple[torch.nn.Module, float]:
    """The fine-tuning run (same seed: the same LoRA initialisation and per-epoch shuffles of all n
    indices) with the removed examples dropped from every epoch, for ``epochs``; returns the model
    and the time of its optimizer steps."""
    base, _ = models.load("smollm2")
    config = dataclasses.replace(config, max_epochs=epochs, target_answer_prob=None)
    model, report = finetune(base, tokenizer, examples, config, exclude=removed, progress=False)
    return model, report.train_time_s


def example_losses(model: torch.nn.Module, tokenizer: Any, examples: Sequence[QAExample]) -> torch.Tensor:
    """Each example's mean cross-entropy over its answer tokens."""
    out = []
    model.eval()
    with torch.no_grad():
        for batch in make_batches(tokenizer, examples, batch_size=8):
            scores = sequence_logprobs(model, batch)
            out.append((-scores.sum_logp / scores.n_tokens).double().cpu())
    return torch.cat(out)


def adapter_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for n, p in model.named_parameters() if "lora_" in n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=4)
    parser.add_argument("--questions", type=int, default=10, help="questions per person")
    parser.add_argument("--remove-percent", type=float, default=5.0)
    parser.add_argument("--layers", type=int, nargs="+", default=[28, 29], help="decoder layers with adapters")
    parser.add_argument("--modules", nargs="+", default=list(LLAMA_LINEAR_LAYERS), choices=list(MODULES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--solver", default="cg", help="cg (fewest passes at small n), qp, lissa, reference_adam")
    parser.add_argument("--curvature", default="gauss_newton", choices=["gauss_newton", "hessian"])
    parser.add_argument(
        "--curvature-data",
        nargs="+",
        default=["train", "edited"],
        choices=["train", "edited"],
        help="H over train_data (the paper) and/or over the edited set (a Newton step on it)",
    )
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-hvps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="facts, removed examples, fine-tuning")
    parser.add_argument(
        "--check-replay",
        action="store_true",
        help="also retrain without removing anything, to check that retrain_without replays finetune",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/llmeraser_vs_retrain"))
    args = parser.parse_args()

    examples = make_fictitious_facts(num_people=args.people, questions_per_person=args.questions, seed=args.seed)
    n = len(examples)
    removed = sorted(random.Random(args.seed).sample(range(n), max(1, round(n * args.remove_percent / 100))))
    kept = [i for i in range(n) if i not in set(removed)]
    targets = tuple(f"layers.{layer}.{MODULES[m]}.{m}" for layer in args.layers for m in args.modules)
    config = FinetuneConfig(
        lora_rank=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=targets,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        target_answer_prob=None,
        seed=args.seed,
    )
    print(f"{n} facts, removing {len(removed)}: {removed}; LoRA r={args.rank} on layers {args.layers}")

    original, tokenizer, ft_report, hit = finetune_cached("smollm2", examples, config, progress=False)
    print(
        f"fine-tuned ({'cache hit' if hit else 'trained'}): {ft_report.epochs} epochs, "
        f"{ft_report.wall_time_s:.0f} s, final answer prob {ft_report.final_answer_prob:.3f}"
    )
    retrained, retrain_time = retrain_without(examples, set(removed), config, ft_report.epochs, tokenizer)
    print(f"retrained without the removed examples: {retrain_time:.0f} s")
    replay_error = None
    if args.check_replay:
        replayed, _ = retrain_without(examples, set(), config, ft_report.epochs, tokenizer)
        replay_error = (adapter_vector(replayed) - adapter_vector(original)).abs().max().item()
        print(f"replay of the fine-tuning: max |Θ_replay − Θ_finetune| = {replay_error:.3g}")
        del replayed

    def losses(model: torch.nn.Module) -> dict[str, float]:
        per_example = example_losses(model, tokenizer, examples)
        return {"removed": per_example[removed].mean().item(), "retained": per_example[kept].mean().item()}

    rows: dict[str, dict[str, Any]] = {
        "original": {**losses(original), "time_s": ft_report.wall_time_s},
        "retrained": {**losses(retrained), "time_s": retrain_time},
    }
    gold = adapter_vector(retrained)
    theta = adapter_vector(original)
    rows["original"]["distance_to_retrained"] = (theta - gold).norm().item()
    rows["retrained"]["distance_to_retrained"] = 0.0

    def progress(info: IterationInfo) -> None:
        if info.iteration % 10 == 0:
            print(
                f"  iteration {info.iteration}: residual {info.relative_residual:.3g}, {info.hvps_used} HVPs",
                flush=True,
            )

    erasers = {}
    for damping, curvature_data in itertools.product(args.dampings, args.curvature_data):
        eraser = LLMEraser(
            original,
            examples,
            tokenizer=tokenizer,
            solver=args.solver,
            damping=damping,
            curvature=args.curvature,
            curvature_data=curvature_data,
            tol=args.tol,
            max_hvps=args.max_hvps,
            solver_options={"callback": progress},
        )
        result = eraser.remove(removed)
        report = result.report
        name = f"LLMEraser λ={damping:g}, H over {curvature_data}"
        rows[name] = {
            **losses(result.model),
            "time_s": report.wall_time_s,
            "distance_to_retrained": (adapter_vector(result.model) - gold).norm().item(),
        }
        erasers[name] = {k: v for k, v in asdict(report).items() if k not in ("residual_history", "solver_info")}
        erasers[name]["lambda_min_estimate"] = report.solver_info.get("lambda_min_estimate")
        print(
            f"{name}: residual {report.residual:.2g} after {report.iterations} iterations ({report.hvps} HVPs), "
            f"{report.wall_time_s:.0f} s, ‖ΔΘ‖ {report.delta_norm:.3g}, ∇R ratio {report.train_grad_ratio:.3g}"
        )
        del result

    base = rows["original"]
    for row in rows.values():
        for split in ("removed", "retained"):
            gap = rows["retrained"][split] - base[split]
            row[f"{split}_gap_closed"] = (row[split] - base[split]) / gap if gap else math.nan

    lines = [
        f"LLMEraser vs retraining: SmolLM2-135M, LoRA r={args.rank} on layers {args.layers} "
        f"({len(args.modules)} modules), {n} fictitious facts, {len(removed)} removed ({args.remove_percent:g}%), "
        f"{ft_report.epochs} epochs of batch {args.batch_size}; solver {args.solver}, {args.curvature}, tol {args.tol:g}.",
        "",
        "| adapter | removed loss | gap closed | retained loss | gap closed | ‖Θ − Θ_retrained‖ | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['removed']:.4f} | {100 * row['removed_gap_closed']:.0f}% | {row['retained']:.4f} | "
            f"{100 * row['retained_gap_closed']:.0f}% | {row['distance_to_retrained']:.4g} | {row['time_s']:.0f} |"
        )
    if replay_error is not None:
        lines += ["", f"Replay check: max |Θ_replay − Θ_finetune| = {replay_error:.3g}."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {
            **vars(args),
            "out": str(args.out),
            "n": n,
            "removed": removed,
            "finetune": asdict(config),
            "torch_threads": torch.get_num_threads(),
        },
        "finetune_report": asdict(ft_report),
        "rows": rows,
        "llmeraser": erasers,
        "replay_error": replay_error,
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
