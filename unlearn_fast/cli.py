"""The ``unlearn-fast`` command.

    unlearn-fast demo                 the main job on the embedded default (SmolLM2-135M)
    unlearn-fast soul                 SOUL unlearning of the fine-tuned model, metrics before/after
    unlearn-fast finetune             teach a model the fictitious facts (cached on disk)
    unlearn-fast evaluate             unlearning metrics of a model on the fictitious facts
    unlearn-fast score "some text"    per-token log-probs and perplexity of texts
    unlearn-fast backends             which kernel backends run here, and why not
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

DEMO_TEXTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Machine unlearning removes the influence of specific training data from a model.",
)


def _score(model, tokenizer, text: str) -> tuple[list[tuple[str, float]], float]:
    """Per-token log-probs of ``text`` (each token given the ones before) and its perplexity."""
    import torch

    from unlearn_fast.evaluate import sequence_logprobs

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        scores = sequence_logprobs(model, batch)
    token_logp = scores.token_logp[0].tolist()
    tokens = [tokenizer.decode([token]) for token in ids[0, 1:].tolist()]
    perplexity = math.exp(-scores.sum_logp[0].item() / max(int(scores.n_tokens[0]), 1))
    return list(zip(tokens, token_logp)), perplexity


def _print_scores(text: str, rows: list[tuple[str, float]], perplexity: float) -> None:
    print(f"\n{text}")
    print(f"  {'token':<16} {'log p':>9}")
    for token, logp in rows:
        print(f"  {token!r:<16} {logp:>9.3f}")
    print(f"  perplexity: {perplexity:.2f}")


def cmd_backends(args: argparse.Namespace) -> int:
    from unlearn_fast import available_backends

    report = available_backends()
    for device, backends in report.items():
        for name, reason in backends.items():
            print(f"{device:<5} {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from unlearn_fast.models import load

    model, tokenizer = load(args.model)
    model.eval()
    results = []
    for text in args.texts:
        rows, perplexity = _score(model, tokenizer, text)
        _print_scores(text, rows, perplexity)
        results.append({"text": text, "tokens": rows, "perplexity": perplexity})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _dataset(args: argparse.Namespace):
    from unlearn_fast.data import make_facts_dataset

    return make_facts_dataset(
        num_people=args.people, questions_per_person=args.questions_per_person,
        forget_percent=args.forget_percent, seed=args.seed,
    )


def _finetune_config(args: argparse.Namespace):
    from unlearn_fast.finetune import FinetuneConfig

    return FinetuneConfig(
        method=args.method, lora_rank=args.rank, lr=args.lr, max_epochs=args.max_epochs,
        target_answer_prob=args.target_answer_prob, batch_size=args.batch_size, seed=args.seed,
    )


def _finetuned(args: argparse.Namespace, dataset, *, retain_only: bool = False):
    """The model fine-tuned on all the facts (forget and retain), from the cache when it can.

    ``retain_only``: fine-tuned on the retain split alone, the gold standard that unlearning
    imitates (its forget-split truth ratios are the reference of forget quality).
    """
    from unlearn_fast.finetune import finetune_cached

    config = _finetune_config(args)
    examples = dataset.retain if retain_only else dataset.forget + dataset.retain
    start = time.perf_counter()
    model, tokenizer, report, hit = finetune_cached(args.model, examples, config, cache_dir=args.cache_dir)
    what = "retain-only model" if retain_only else "fine-tuned model"
    source = "loaded from the cache" if hit else f"trained for {len(report.loss_per_epoch)} epochs"
    print(f"{what}: {source} in {time.perf_counter() - start:.1f} s "
          f"(training-set answer probability {report.answer_prob_per_epoch[-1]:.3f})")
    return model, tokenizer, report


def _evaluate(model, tokenizer, dataset, args: argparse.Namespace, label: str, reference=None) -> dict:
    import dataclasses
    import random

    from unlearn_fast.evaluate import evaluate

    if 0 < args.eval_retain_size < len(dataset.retain):
        # As TOFU does, utility is measured on a fixed sample of the retain split: generation
        # dominates evaluation time on a CPU.
        sample = random.Random(args.seed).sample(dataset.retain, args.eval_retain_size)
        dataset = dataclasses.replace(dataset, retain=sample)
    start = time.perf_counter()
    results = evaluate(model, tokenizer, dataset, reference_truth_ratios=reference, generate=not args.no_generate,
                       max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    print(f"evaluated the {label} model in {time.perf_counter() - start:.1f} s")
    return results


def _save_results(results_by_stage: dict, out_dir: str) -> None:
    from pathlib import Path

    from unlearn_fast.evaluate import format_comparison
    from unlearn_fast.plots import plot_answer_probs

    print()
    print(format_comparison(results_by_stage))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results_by_stage, indent=1))
    tmp.replace(out / "results.json")  # atomic: a reader never sees half a file
    png = plot_answer_probs(results_by_stage, out / "answer_probs.png")
    print(f"\nresults: {out / 'results.json'}\nplot:    {png}")


def cmd_finetune(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    _, _, report = _finetuned(args, dataset)
    print(json.dumps(report.__dict__ if hasattr(report, "__dict__") else report, indent=1, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from unlearn_fast.models import load

    dataset = _dataset(args)
    results = {}
    if not args.finetuned_only:
        model, tokenizer = load(args.model)
        results["base"] = _evaluate(model, tokenizer, dataset, args, "base")
    model, tokenizer, _ = _finetuned(args, dataset)
    results["fine-tuned"] = _evaluate(model, tokenizer, dataset, args, "fine-tuned")
    _save_results(results, args.out)
    return 0


def _soul(args: argparse.Namespace):
    from unlearn_fast import SOUL

    objective_kwargs = {k: v for k, v in (("gamma", args.gamma), ("beta", args.beta)) if v is not None}
    if args.objective in ("ga", "rmu"):
        objective_kwargs.pop("gamma", None)
    if args.objective != "npo":
        objective_kwargs.pop("beta", None)
    return SOUL(objective=args.objective, objective_kwargs=objective_kwargs, optimizer=args.optimizer,
                estimator=args.estimator, lr=args.unlearn_lr, steps=args.steps, batch_size=args.unlearn_batch_size,
                hessian_interval=args.hessian_interval, seed=args.seed)


def cmd_soul(args: argparse.Namespace) -> int:
    """Fine-tuned model -> SOUL -> metrics, against the retain-only gold standard."""
    dataset = _dataset(args)
    print(f"fictitious facts: {len(dataset.forget)} forget, {len(dataset.retain)} retain, "
          f"{len(dataset.world_facts)} world-knowledge questions")
    gold, tokenizer, _ = _finetuned(args, dataset, retain_only=True)
    results = {"retain-only (gold)": _evaluate(gold, tokenizer, dataset, args, "retain-only")}
    reference = results["retain-only (gold)"]["forget_truth_ratios"]
    del gold
    model, tokenizer, _ = _finetuned(args, dataset)
    results["fine-tuned"] = _evaluate(model, tokenizer, dataset, args, "fine-tuned", reference)
    soul = _soul(args)
    cfg = soul.config
    print(f"SOUL: {cfg.objective} with {cfg.optimizer} ({cfg.estimator}), lr {cfg.lr}, {cfg.steps} steps")
    result = soul.unlearn(model, dataset.forget, dataset.retain, tokenizer=tokenizer, checkpoint_dir=args.checkpoint_dir)
    print(f"unlearned in {result.wall_time_s:.1f} s (final loss {result.history[-1]['loss']:.3f})")
    results[f"SOUL {cfg.objective}/{cfg.optimizer}"] = _evaluate(
        result.model, tokenizer, dataset, args, "unlearned", reference)
    _save_results(results, args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the embedded default model and data, end to end."""
    from unlearn_fast import available_backends

    cpu = available_backends()["cpu"]
    print("unlearn_fast backends on CPU:", ", ".join(b for b, r in cpu.items() if r is None))
    return cmd_soul(args)


def _add_soul_options(parser: argparse.ArgumentParser) -> None:
    soul = parser.add_argument_group("SOUL unlearning")
    soul.add_argument("--objective", choices=("ga", "gdiff", "npo", "po", "rmu"), default="gdiff",
                      help="unlearning objective (default gdiff)")
    soul.add_argument("--optimizer", choices=("sophia", "adamw", "soul_reference"), default="sophia",
                      help="sophia (SOUL, default), adamw (first-order baseline), soul_reference")
    soul.add_argument("--estimator", choices=("gnb", "hutchinson", "empirical"), default="gnb",
                      help="Sophia's diagonal Hessian estimator (default gnb)")
    soul.add_argument("--unlearn-lr", type=float, default=1e-4, help="learning rate of unlearning (default 1e-4)")
    soul.add_argument("--steps", type=int, default=20, help="unlearning steps (default 20)")
    soul.add_argument("--unlearn-batch-size", type=int, default=4, help="default 4")
    soul.add_argument("--hessian-interval", type=int, default=10, help="k, steps between Hessian refreshes")
    soul.add_argument("--gamma", type=float, default=None, help="retain-loss weight (objective's default 1)")
    soul.add_argument("--beta", type=float, default=None, help="NPO's beta (default 0.1)")
    soul.add_argument("--checkpoint-dir", default=None,
                      help="save a checkpoint there every 10 steps and resume from it when run again (default: none)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (generated fictitious facts, TOFU-style)")
    data.add_argument("--people", type=int, default=20, help="fictitious people (default 20)")
    data.add_argument("--questions-per-person", type=int, default=10, help="questions per person (default 10)")
    data.add_argument("--forget-percent", type=float, default=10, help="share of examples to forget (default 10)")
    data.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default 0)")
    tune = parser.add_argument_group("fine-tuning (cached on disk, keyed by these settings)")
    tune.add_argument("--model", default="smollm2", help="'smollm2' (default, offline) or a local model directory")
    tune.add_argument("--method", choices=("lora", "full"), default="lora", help="default lora")
    tune.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    tune.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3 for LoRA)")
    tune.add_argument("--max-epochs", type=int, default=20, help="cap on epochs (default 20)")
    tune.add_argument("--target-answer-prob", type=float, default=0.85,
                      help="stop once the training answer probability reaches this (default 0.85)")
    tune.add_argument("--batch-size", type=int, default=16, help="default 16")
    tune.add_argument("--cache-dir", default=None, help="default ~/.cache/unlearn_fast/finetune ($UNLEARN_FAST_CACHE)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--no-generate", action="store_true", help="skip greedy generation (no ROUGE-L; faster)")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="generation length for ROUGE-L (default 32)")
    ev.add_argument("--eval-retain-size", type=int, default=40,
                    help="evaluate on this many retain examples, a fixed sample (default 40; 0 = all)")
    ev.add_argument("--eval-batch-size", type=int, default=16, help="default 16")
    ev.add_argument("--out", default="runs/demo", help="folder for results.json and the PNG plot (default runs/demo)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearn-fast",
        description="Fast machine unlearning for large language models (SOUL, LLMEraser, UOE).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="the main job: SmolLM2-135M fine-tuned on fictitious facts (cached), then unlearned with SOUL",
        description="Fine-tunes (or loads from the cache) SmolLM2-135M on generated fictitious facts, and on the "
                    "retain split alone (the gold standard), unlearns the forget split with SOUL and prints the "
                    "metrics before and after; writes JSON and a PNG plot.")
    _add_run_options(demo)
    _add_soul_options(demo)
    demo.set_defaults(func=cmd_demo)

    soul = sub.add_parser("soul", help="SOUL: second-order (Sophia) unlearning of the fine-tuned model's forget split")
    _add_run_options(soul)
    _add_soul_options(soul)
    soul.set_defaults(func=cmd_soul)

    finetune = sub.add_parser("finetune", help="fine-tune a model on the fictitious facts (cached on disk)")
    _add_run_options(finetune)
    finetune.set_defaults(func=cmd_finetune)

    evaluate = sub.add_parser("evaluate", help="forget/retain/utility metrics of the base and fine-tuned models")
    _add_run_options(evaluate)
    evaluate.add_argument("--finetuned-only", action="store_true", help="skip the base model")
    evaluate.set_defaults(func=cmd_evaluate)

    score = sub.add_parser("score", help="per-token log-probabilities and perplexity of texts")
    score.add_argument("texts", nargs="+", help="texts to score")
    score.add_argument("--model", default="smollm2", help="'smollm2' (default, offline) or a local model directory")
    score.add_argument("--json", help="also write the scores to this JSON file")
    score.set_defaults(func=cmd_score)

    backends = sub.add_parser("backends", help="which kernel backends can run here, and why not")
    backends.set_defaults(func=cmd_backends)
    return parser


def _check_settings(args: argparse.Namespace) -> None:
    """Build the data, fine-tuning and SOUL settings once up front, so that a bad value fails in
    a second with the library's message, not after minutes of fine-tuning."""
    if hasattr(args, "people"):
        _dataset(args)
        _finetune_config(args)
    if hasattr(args, "objective"):
        _soul(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_settings(args)
    except (ValueError, TypeError) as error:
        parser.error(str(error))  # usage error: exit status 2
    try:
        return args.func(args)
    except FileNotFoundError as error:  # a model directory or data file: the message says which
        parser.exit(1, f"unlearn-fast: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
