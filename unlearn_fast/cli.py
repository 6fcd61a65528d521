"""The ``unlearn-fast`` command.

    unlearn-fast demo                 the main job on the embedded default (SmolLM2-135M)
    unlearn-fast soul                 SOUL unlearning of the fine-tuned model, metrics before/after
    unlearn-fast uoe                  UOE: unlearn one expert of an MoE (SmolLM2 upcycled, fine-tuned)
    unlearn-fast erase                LLMEraser: remove, re-query or correct training examples of a LoRA
    unlearn-fast finetune             teach a model the fictitious facts (cached on disk)
    unlearn-fast evaluate             unlearning metrics of a model on the fictitious facts
    unlearn-fast score "some text"    per-token log-probs and perplexity of texts
    unlearn-fast backends             which kernel backends run here, and why not
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _save_results(results_by_stage: dict, out_dir: str, extra: dict | None = None) -> None:
    """Prints the stages side by side; writes them (and ``extra``, e.g. a method's report) as JSON, and a plot."""
    from pathlib import Path

    from unlearn_fast.evaluate import format_comparison
    from unlearn_fast.plots import plot_answer_probs

    print()
    print(format_comparison(results_by_stage))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**results_by_stage, **(extra or {})}, indent=1, default=str))
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


def _objective_kwargs(args: argparse.Namespace) -> dict[str, float]:
    """--gamma and --beta, for the objectives that take them."""
    objective_kwargs = {k: v for k, v in (("gamma", args.gamma), ("beta", args.beta)) if v is not None}
    if args.objective in ("ga", "rmu"):
        objective_kwargs.pop("gamma", None)
    if args.objective != "npo":
        objective_kwargs.pop("beta", None)
    return objective_kwargs


def _soul(args: argparse.Namespace):
    from unlearn_fast import SOUL

    return SOUL(objective=args.objective, objective_kwargs=_objective_kwargs(args), optimizer=args.optimizer,
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


REFUSAL = "I'm not sure about that."
REQUERY_PREFIX = "Quick question: "


def _erase_edits(args: argparse.Namespace, train: list) -> tuple[list[int], dict[int, str] | None]:
    """The chosen training indices and, for modify/correct, their new questions/answers (from
    --edits, else a fixed rewording of the question / a refusal as the new answer)."""
    if args.edits:
        field = "question" if args.task == "modify" else "answer"
        with open(args.edits) as f:
            records = [json.loads(line) for line in f if line.strip()]
        bad = [r for r in records if not isinstance(r.get("index"), int) or
               (args.task != "remove" and not isinstance(r.get(field), str))]
        if not records or bad:
            need = '{"index": i}' if args.task == "remove" else f'{{"index": i, "{field}": "..."}}'
            raise SystemExit(f"erase: --edits needs one JSON object per line like {need}; bad lines: {bad[:3]}")
        indices = [r["index"] for r in records]
        new = None if args.task == "remove" else {r["index"]: r[field] for r in records}
        return indices, new
    indices = args.indices if args.indices is not None else list(range(args.forget_count))
    if args.task == "remove":
        return indices, None
    if args.task == "modify":
        return indices, {i: REQUERY_PREFIX + train[i].question for i in indices if 0 <= i < len(train)}
    return indices, {i: REFUSAL for i in indices if 0 <= i < len(train)}


def cmd_erase(args: argparse.Namespace) -> int:
    """Fine-tuned LoRA (cached) or a saved adapter -> one LLMEraser edit -> report and metrics."""
    from unlearn_fast import LLMEraser
    from unlearn_fast.solvers import IterationInfo

    dataset = _dataset(args)
    train = dataset.forget + dataset.retain  # what the LoRA is fine-tuned on; the forget split first
    args.forget_count = len(dataset.forget)
    indices, new = _erase_edits(args, train)  # before any loading: a bad --edits file fails fast
    if args.adapter:
        from peft import PeftModel

        from unlearn_fast.models import load

        base, tokenizer = load(args.model)
        model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
        print(f"adapter loaded from {args.adapter}")
    else:
        model, tokenizer, _ = _finetuned(args, dataset)

    def progress(info: IterationInfo) -> None:
        print(f"  solver iteration {info.iteration}: relative residual {info.relative_residual:.3g}, "
              f"{info.hvps_used} HVPs", flush=True)

    eraser = LLMEraser(model, train, tokenizer=tokenizer, solver=args.solver, damping=args.damping,
                       curvature=args.curvature, curvature_data=args.curvature_data,
                       curvature_sample=args.curvature_sample or None, check_fit=not args.no_fit_check,
                       tol=args.tol, max_hvps=args.max_hvps, seed=args.seed, solver_options={"callback": progress})
    print(f"LLMEraser {args.task}: {len(indices)} of {len(train)} training examples, {eraser.dim:,} adapter "
          f"parameters, solver {args.solver}, {args.curvature}, λ {args.damping:g}")
    resume = {"checkpoint_dir": args.checkpoint_dir}
    if args.task == "remove":
        result = eraser.remove(indices, **resume)
    elif args.task == "modify":
        result = eraser.modify_queries(new, **resume)
    else:
        result = eraser.correct_responses(new, **resume)
    report = result.report
    print(f"edited in {report.wall_time_s:.1f} s (gradients {report.gradient_time_s:.1f} s, solve "
          f"{report.solve_time_s:.1f} s): residual {report.residual:.3g} after {report.iterations} iterations, "
          f"{report.hvps} HVPs, ‖ΔΘ‖ {report.delta_norm:.3g}")
    if args.save:
        print(f"adapter saved to {eraser.save(result.model, args.save, overwrite=args.overwrite)}")

    results: dict = {}
    if args.task == "remove" and args.indices is None and not args.edits:
        gold, gold_tokenizer, _ = _finetuned(args, dataset, retain_only=True)
        results["retain-only (gold)"] = _evaluate(gold, gold_tokenizer, dataset, args, "retain-only")
        reference = results["retain-only (gold)"]["forget_truth_ratios"]
        del gold
    else:  # the forget/retain metrics only mean something when the forget split is what was edited
        reference = None
    results["fine-tuned"] = _evaluate(model, tokenizer, dataset, args, "fine-tuned", reference)
    results[f"LLMEraser {args.task}"] = _evaluate(result.model, tokenizer, dataset, args, "edited", reference)
    _save_results(results, args.out, {"erase_report": {k: v for k, v in dataclasses.asdict(report).items()
                                                       if k != "solver_info"}})
    return 0


def _uoe(args: argparse.Namespace):
    from unlearn_fast import UOE

    return UOE(objective=args.objective, objective_kwargs=_objective_kwargs(args), anchor_weight=args.anchor_weight,
               lr=args.unlearn_lr, steps=args.steps, batch_size=args.unlearn_batch_size,
               target=tuple(args.target) if args.target else None, prefix_cache=not args.no_prefix_cache,
               seed=args.seed)


def cmd_uoe(args: argparse.Namespace) -> int:
    """Fine-tuned MoE (cached) -> expert attribution -> UOE -> metrics before and after."""
    dataset = _dataset(args)
    print(f"fictitious facts: {len(dataset.forget)} forget, {len(dataset.retain)} retain")
    model, tokenizer, _ = _finetuned(args, dataset)
    results = {"fine-tuned": _evaluate(model, tokenizer, dataset, args, "fine-tuned")}
    uoe = _uoe(args)
    result = uoe.unlearn(model, dataset.forget, dataset.retain, tokenizer=tokenizer, checkpoint_dir=args.checkpoint_dir)
    if result.attribution is not None:
        print(result.attribution.table())
    total = sum(p.numel() for p in model.parameters())
    layer, expert = result.target
    print(f"UOE {args.objective}: trained expert {expert} of layer {layer} and its router, "
          f"{result.trained_parameters:,} parameters ({100 * result.trained_parameters / total:.3f}% of the model), "
          f"{args.steps} steps in {result.wall_time_s:.1f} s")
    results[f"UOE {args.objective}"] = _evaluate(result.model, tokenizer, dataset, args, "unlearned")
    _save_results(results, args.out, {"uoe": {"target": result.target, "history": result.history,
                                              "trained_parameters": result.trained_parameters,
                                              "wall_time_s": result.wall_time_s}})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the embedded default model and data, end to end."""
    from unlearn_fast import available_backends

    cpu = available_backends()["cpu"]
    print("unlearn_fast backends on CPU:", ", ".join(b for b, r in cpu.items() if r is None))
    base_out = args.out
    for method in args.methods:
        print(f"\n=== {method} ===")
        if method == "soul":
            args.out = f"{base_out}/soul"
            cmd_soul(args)
            continue
        # LLMEraser and UOE with their commands' defaults (their own model and data settings).
        sub = [method, "--seed", str(args.seed), "--out", f"{base_out}/{method}",
               "--eval-retain-size", str(args.eval_retain_size), "--max-new-tokens", str(args.max_new_tokens)]
        if args.no_generate:
            sub.append("--no-generate")
        if args.cache_dir:
            sub += ["--cache-dir", args.cache_dir]
        # The settings measured in docs/RESULTS.md (UOE: the paper's lr 1e-4 barely moves in 20 steps).
        if method == "erase":
            sub += ["--damping", "1e-2", "--max-hvps", "320"]
        else:
            sub += ["--unlearn-lr", "1e-3"]
        sub_args = build_parser().parse_args(sub)
        sub_args.func(sub_args)
    return 0


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
    tune.add_argument("--model", default="smollm2",
                      help="'smollm2' (default, offline), 'smollm2-moe' (upcycled to 4 experts) or a local model directory")
    tune.add_argument("--method", choices=("lora", "full", "experts"), default="lora",
                      help="lora (default), full, or experts (an MoE's routers and experts)")
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


def _add_erase_options(parser: argparse.ArgumentParser) -> None:
    erase = parser.add_argument_group("LLMEraser")
    erase.add_argument("--task", choices=("remove", "modify", "correct"), default="remove",
                       help="remove examples (default), modify their questions, or correct their answers")
    erase.add_argument("--indices", type=int, nargs="+", default=None,
                       help="training examples to edit (default: the forget split, indices 0..F-1)")
    erase.add_argument("--edits", default=None,
                       help='JSONL of edits: {"index": i} to remove, {"index": i, "question": ...} to modify, '
                            '{"index": i, "answer": ...} to correct (default: a reworded question / a refusal)')
    erase.add_argument("--adapter", default=None, help="a saved LoRA adapter directory to edit instead of fine-tuning")
    erase.add_argument("--solver", choices=("qp", "cg", "lissa", "reference_adam"), default="cg",
                       help="inverse-HVP solver (default cg on the sampled curvature)")
    erase.add_argument("--damping", type=float, default=1e-3, help="λ of (H + λI) (default 1e-3)")
    erase.add_argument("--curvature", choices=("gauss_newton", "hessian"), default="gauss_newton")
    erase.add_argument("--curvature-data", choices=("train", "edited"), default="train",
                       help="H over the training set (default) or over the edited training set")
    erase.add_argument("--curvature-sample", type=int, default=32,
                       help="estimate H on this many training examples (default 32; 0 = all)")
    erase.add_argument("--tol", type=float, default=1e-3, help="relative residual to stop at (default 1e-3)")
    erase.add_argument("--max-hvps", type=int, default=None, help="budget of single-example HVPs")
    erase.add_argument("--no-fit-check", action="store_true", help="skip the gradient pass checking the fit")
    erase.add_argument("--save", default=None, help="save the edited adapter here (safetensors, atomic)")
    erase.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    erase.add_argument("--checkpoint-dir", default=None,
                       help="save the solver's iterate there every 10 iterations and resume from it when run again "
                            "(qp and cg; default: none)")


def _add_uoe_options(parser: argparse.ArgumentParser) -> None:
    uoe = parser.add_argument_group("UOE unlearning")
    uoe.add_argument("--objective", choices=("ga", "gdiff", "npo", "rmu"), default="ga",
                     help="base unlearning objective (default ga)")
    uoe.add_argument("--anchor-weight", type=float, default=1.0, help="α of the router anchor loss (default 1)")
    uoe.add_argument("--unlearn-lr", type=float, default=1e-4, help="learning rate (default 1e-4, Adam)")
    uoe.add_argument("--steps", type=int, default=20, help="unlearning steps (default 20)")
    uoe.add_argument("--unlearn-batch-size", type=int, default=4, help="default 4")
    uoe.add_argument("--target", type=int, nargs=2, metavar=("LAYER", "EXPERT"), default=None,
                     help="train this expert instead of the attributed one")
    uoe.add_argument("--no-prefix-cache", action="store_true", help="run every layer at every step")
    uoe.add_argument("--gamma", type=float, default=None, help="retain-loss weight (objective's default 1)")
    uoe.add_argument("--beta", type=float, default=None, help="NPO's beta (default 0.1)")
    uoe.add_argument("--checkpoint-dir", default=None,
                     help="save a checkpoint there every 10 steps and resume from it when run again (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearn-fast",
        description="Fast machine unlearning for large language models (SOUL, LLMEraser, UOE).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="the main job: SmolLM2-135M fine-tuned on fictitious facts (cached), then unlearned with "
                     "SOUL, LLMEraser and UOE",
        description="Fine-tunes (or loads from the cache) SmolLM2-135M on generated fictitious facts, and on the "
                    "retain split alone (the gold standard), then unlearns the forget split with SOUL (the LoRA), "
                    "LLMEraser (removing the forget split from the LoRA's training set) and UOE (SmolLM2 upcycled "
                    "to a 4-expert MoE and fine-tuned the same way), printing the metrics before and after each; "
                    "writes JSON and PNG plots under --out. The run options apply to SOUL; erase and uoe use their "
                    "commands' defaults.")
    _add_run_options(demo)
    _add_soul_options(demo)
    demo.add_argument("--methods", nargs="+", choices=("soul", "erase", "uoe"), default=["soul", "erase", "uoe"],
                      help="which methods to run, in order (default all three)")
    demo.set_defaults(func=cmd_demo)

    soul = sub.add_parser("soul", help="SOUL: second-order (Sophia) unlearning of the fine-tuned model's forget split")
    _add_run_options(soul)
    _add_soul_options(soul)
    soul.set_defaults(func=cmd_soul)

    uoe = sub.add_parser(
        "uoe", help="UOE: unlearn the forget split from one expert of an MoE (default: SmolLM2 upcycled to 4 experts)",
        description="Fine-tunes (or loads from the cache) SmolLM2-135M upcycled into a 4-expert Mixtral on the "
                    "fictitious facts (routers and experts train), attributes the forget split to one expert, "
                    "unlearns with UOE and prints the attribution and the metrics before and after.")
    _add_run_options(uoe)
    _add_uoe_options(uoe)
    uoe.set_defaults(func=cmd_uoe, model="smollm2-moe", method="experts", people=5, forget_percent=20, lr=3e-4,
                     max_epochs=8, target_answer_prob=0.8)

    erase = sub.add_parser(
        "erase", help="LLMEraser: influence-function removal/modification/correction of a LoRA's training examples",
        description="Fine-tunes (or loads from the cache, or --adapter) a LoRA on the fictitious facts, then edits "
                    "training examples with one influence-function step of LLMEraser and prints the solver report and "
                    "the metrics before and after; --save writes the edited adapter.")
    _add_run_options(erase)
    _add_erase_options(erase)
    erase.set_defaults(func=cmd_erase)

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
    """Build the data, fine-tuning and unlearning (SOUL or UOE) settings once up front, so that a
    bad value fails in a second with the library's message, not after minutes of fine-tuning."""
    if hasattr(args, "people"):
        _dataset(args)
        _finetune_config(args)
    if hasattr(args, "objective"):  # the uoe command has no SOUL-only options (--optimizer, ...)
        (_uoe if args.func is cmd_uoe else _soul)(args)


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
