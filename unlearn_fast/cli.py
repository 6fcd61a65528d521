"""The ``unlearn-fast`` command.

    unlearn-fast demo                 the main job on the embedded default (SmolLM2-135M)
    unlearn-fast soul                 SOUL unlearning (your --model and --forget/--retain files, or the demo's)
    unlearn-fast uoe                  UOE: unlearn one expert of an MoE
    unlearn-fast erase                LLMEraser: remove, re-query or correct training examples of a LoRA
    unlearn-fast finetune             teach a model the fictitious facts (cached on disk)
    unlearn-fast build-moe            build the specialised MoE (SmolLM2 -> Qwen2-MoE, experts per domain; cached)
    unlearn-fast evaluate             unlearning metrics of a model on the fictitious facts
    unlearn-fast score "some text"    per-token log-probs and perplexity of texts
    unlearn-fast backends             which kernel backends run here, and why not

The method commands get one flag per field of the method's config (:func:`add_config_flags`):
``--lr`` for ``lr``, ``--batch-size`` for ``batch_size``, ``--no-prefix-cache`` for a boolean,
``--betas B1 B2`` for a pair, ``--max-grad-norm none`` for an optional number. A flag that is
not given leaves the field alone, so the settings are, from weakest to strongest: the config's
defaults (the Python API's), then a ``--config FILE.yaml|json`` file, then the flags. The
objective is ``--objective NAME`` and its hyperparameters ``--objective-arg KEY=VALUE``
(repeatable; the value is read as JSON, else taken as a string: ``--objective npo
--objective-arg beta=0.2 --objective-arg gamma=2``). The fine-tuning step of the demo's data
has its own flags, ``--finetune-<field>`` of :class:`~unlearn_fast.finetune.FinetuneConfig`.

With ``--forget``/``--retain`` (soul, uoe) or ``--train`` (erase), the model at ``--model`` (with
``--adapter``, a LoRA) is unlearned directly: no facts are generated and nothing is fine-tuned.
Every method command saves its result to ``--out`` (:meth:`UnlearnResult.save`, reloaded with
``UnlearnResult.load(dir, model)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import re
import sys
import time
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("unlearn_fast.cli")

DEMO_TEXTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Machine unlearning removes the influence of specific training data from a model.",
)

# --------------------------------------------------------------------------------------------
# Flags generated from a config dataclass
# --------------------------------------------------------------------------------------------

_METAVARS = {"target": ("LAYER", "EXPERT"), "betas": ("BETA1", "BETA2")}


def _dest(cls: type, name: str) -> str:
    return f"{cls.__name__}.{name}"


def _optional(kind: type) -> Any:
    """An argparse type reading ``kind`` or ``none`` (for the fields whose default may be None)."""

    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = f"{kind.__name__} or none"
    convert.accepts_none = True
    return convert


def _json_value(text: str) -> Any:
    """A JSON value (number, true/false, null, list...), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _json_value(value)


_key_value.__name__ = "KEY=VALUE"


_NAME = r"(?:``)?[a-z_][a-z0-9_]*(?:``)?"
# A docstring label: "name:" or "a, b: ..." at the start of a line (after "* " in a list) or after "; ".
_LABEL = re.compile(rf"(?:^[ \t]*(?:[*-][ \t]+)?|[;.]\s+)({_NAME}(?:,\s*{_NAME})*)\s*:\s", re.MULTILINE)


def _field_help(cls: type, name: str) -> str:
    """The first sentence the class docstring says about ``name`` (``name: text``, ``a, name: text``)."""
    doc = cls.__doc__ or ""
    labels = list(_LABEL.finditer(doc))
    for label, following in zip(labels, labels[1:] + [None]):
        if name in [n.strip().strip("`") for n in label.group(1).split(",")]:
            text = " ".join(doc[label.end() : following.start() if following else len(doc)].split())
            return re.split(r"(?<=[^.])\.(?:\s|$)", text, maxsplit=1)[0].replace("``", "").strip(" ;")
    return ""


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) or "none"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else str(value)


def _flag_spec(name: str, hint: Any) -> dict[str, Any]:
    """argparse keywords (type, choices, nargs, action, metavar) for a field annotated ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        optional = len(inner) < len(args)
        if len(inner) == 1:
            hint = inner[0]
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        else:  # e.g. Objective | str: given by name
            return {"type": str}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if origin is tuple:
        kind = args[0] if args else str
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": kind, "nargs": "+"}
        return {"type": kind, "nargs": len(args), "metavar": _METAVARS.get(name, (name.upper(),) * len(args))}
    if origin in (dict, Mapping) or hint in (dict, Mapping) or origin is typing.Mapping:
        return {"type": _key_value, "nargs": "+", "metavar": "KEY=VALUE"}
    if hint in (int, float, str):
        return {"type": _optional(hint) if optional else hint}
    return {"type": str}


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    prefix: str = "",
    title: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of the dataclass ``cls``: ``--{prefix}{name with dashes}``, with its type and
    choices from the annotation and help from the docstring. No flag has a default
    (``argparse.SUPPRESS``): :func:`given_fields` returns the fields given on the command line, so
    that the config's own defaults (``defaults`` where a command changes one) fill in the rest."""
    group = parser.add_argument_group(title or f"{cls.__name__} (defaults as in the Python API)")
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        spec = _flag_spec(f.name, hints[f.name])
        if f.name == "objective":
            from unlearn_fast.objectives import OBJECTIVES, objective_spec

            spec["choices"] = sorted(OBJECTIVES)
            default = objective_spec(default)["name"] if default is not None else None
        if "choices" not in spec and "action" not in spec:
            spec.setdefault("metavar", f.name.upper())
        none = "; none: None" if getattr(spec.get("type"), "accepts_none", False) else ""
        text = _field_help(cls, f.name)
        help_text = f"{text + ' ' if text else ''}(default {_default_text(default)}{none})"
        group.add_argument(
            f"--{prefix}{f.name.replace('_', '-')}",
            dest=_dest(cls, f.name),
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
            **spec,
        )
        if f.name == "objective":
            group.add_argument(
                f"--{prefix}objective-arg",
                dest=_dest(cls, "objective") + ":args",
                metavar="KEY=VALUE",
                type=_key_value,
                action="append",
                default=argparse.SUPPRESS,
                help="a hyperparameter of the objective, repeatable: gamma=2 (gdiff, npo, po), beta=0.1 (npo), "
                "layer=7, steering_coeff=6.5, alpha=100, seed=0 (rmu); values are read as JSON",
            )


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given as flags (see :func:`add_config_flags`), as the config takes them."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        dest = _dest(cls, f.name)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if isinstance(value, list) and value and isinstance(value[0], tuple) and "Mapping" in str(hints[f.name]):
            value = dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return values


def build_config(args: argparse.Namespace, cls: type, base: Mapping[str, Any] | None = None):
    """``cls`` from, weakest first: its defaults, ``base`` (a command's own settings, e.g. the demo's),
    the ``--config`` file, the flags; then ``--objective-arg`` applied to the objective."""
    given = given_fields(args, cls)
    path = getattr(args, "config", None)
    config = cls.from_file(path, **{**(base or {}), **given}) if path else cls.from_dict({**(base or {}), **given})
    objective_args = getattr(args, _dest(cls, "objective") + ":args", None)
    if objective_args:
        from unlearn_fast.objectives import make_objective, objective_spec

        spec = objective_spec(config.objective)
        spec.update(objective_args)
        config = dataclasses.replace(config, objective=make_objective(spec.pop("name"), **spec))
    return config


# --------------------------------------------------------------------------------------------
# score, backends
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The demo's data: generated facts, a fine-tuned model, evaluation
# --------------------------------------------------------------------------------------------


def _dataset(args: argparse.Namespace):
    from unlearn_fast.data import make_facts_dataset

    return make_facts_dataset(
        num_people=args.people,
        questions_per_person=args.questions_per_person,
        forget_percent=args.forget_percent,
        seed=args.data_seed,
    )


def _finetune_config(args: argparse.Namespace):
    from unlearn_fast.finetune import FinetuneConfig

    return FinetuneConfig(**{**getattr(args, "finetune_defaults", {}), **given_fields(args, FinetuneConfig)})


def _finetuned(args: argparse.Namespace, dataset, *, retain_only: bool = False):
    """The model fine-tuned on all the facts (forget and retain), from the cache when it can.

    ``retain_only``: fine-tuned on the retain split alone, the gold standard that unlearning
    imitates (its forget-split truth ratios are the reference of forget quality).
    """
    from unlearn_fast.finetune import finetune_cached

    config = _finetune_config(args)
    examples = dataset.retain if retain_only else dataset.forget + dataset.retain
    start = time.perf_counter()
    model, tokenizer, report, hit = finetune_cached(
        args.model, examples, config, cache_dir=args.cache_dir, progress=True
    )
    what = "retain-only model" if retain_only else "fine-tuned model"
    source = "loaded from the cache" if hit else f"trained for {len(report.loss_per_epoch)} epochs"
    print(
        f"{what}: {source} in {time.perf_counter() - start:.1f} s "
        f"(training-set answer probability {report.answer_prob_per_epoch[-1]:.3f})"
    )
    return model, tokenizer, report


def _evaluate(model, tokenizer, dataset, args: argparse.Namespace, label: str, reference=None) -> dict:
    import random

    from unlearn_fast.evaluate import evaluate

    if 0 < args.eval_retain_size < len(dataset.retain):
        # As TOFU does, utility is measured on a fixed sample of the retain split: generation
        # dominates evaluation time on a CPU.
        sample = random.Random(args.data_seed).sample(dataset.retain, args.eval_retain_size)
        dataset = dataclasses.replace(dataset, retain=sample)
    start = time.perf_counter()
    results = evaluate(
        model,
        tokenizer,
        dataset,
        reference_truth_ratios=reference,
        generate=not args.no_generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch_size,
    )
    print(f"evaluated the {label} model in {time.perf_counter() - start:.1f} s")
    return results


def _plot(results_by_stage: dict, path: Path) -> Path | None:
    """The answer-probability plot, or None (and a note) when matplotlib is not installed."""
    from unlearn_fast.plots import plot_answer_probs

    try:
        return plot_answer_probs(results_by_stage, path)
    except ImportError as error:
        logger.warning("no plot: %s", error)
        return None


def _save_results(results_by_stage: dict, out_dir: str | Path, extra: dict | None = None) -> None:
    """Prints the stages side by side; writes them (and ``extra``, e.g. a method's report) as JSON, and a plot."""
    from unlearn_fast.evaluate import format_comparison
    from unlearn_fast.io import atomic_path

    print()
    print(format_comparison(results_by_stage))
    out = Path(out_dir)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({**results_by_stage, **(extra or {})}, indent=1, default=str))
    png = _plot(results_by_stage, out / "answer_probs.png")
    print(f"\nresults: {out / 'results.json'}" + (f"\nplot:    {png}" if png else ""))


def cmd_finetune(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    _, _, report = _finetuned(args, dataset)
    print(json.dumps(dataclasses.asdict(report), indent=1, default=str))
    return 0


def cmd_build_moe(args: argparse.Namespace) -> int:
    """The specialised MoE (unlearn_fast.specialised_moe), built or loaded from the cache; its pre-checks."""
    from unlearn_fast.specialised_moe import SpecialisationError, SpecialisedMoEConfig, specialised_moe_cached

    config = build_config(args, SpecialisedMoEConfig)
    start = time.perf_counter()
    try:
        _, _, report, hit, entry = specialised_moe_cached(args.model, config, cache_dir=args.cache_dir)
    except SpecialisationError as error:  # nothing was cached; the message holds the numbers
        print(f"unlearn-fast build-moe: {error}", file=sys.stderr)
        return 1
    source = "loaded from the cache" if hit else f"built in {report.wall_time_s / 60:.1f} min"
    print(f"specialised MoE {source} ({time.perf_counter() - start:.1f} s): {entry}")
    if hit:
        print(report.table)
    for name, stage in report.stages.items():
        losses = f", loss {stage['first_loss']:.3f} -> {stage['last_loss']:.3f}" if "first_loss" in stage else ""
        print(f"  {name:<20} {stage['seconds']:7.1f} s{losses}")
    print(f"use it: unlearn-fast uoe --model {entry} --forget ... (or from Python: models.load_model)")
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


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def _user_data(args: argparse.Namespace) -> bool:
    """Whether the command runs on the user's files (no generated facts, no fine-tuning)."""
    return any(getattr(args, name, None) for name in ("forget", "retain", "train"))


def _load_model(args: argparse.Namespace):
    """The model at --model (and its tokenizer), with the LoRA adapter at --adapter on it, trainable."""
    from unlearn_fast.models import load

    model, tokenizer = load(args.model)
    if getattr(args, "adapter", None):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
        print(f"adapter loaded from {args.adapter}")
    return model, tokenizer


def _examples(path: str | None, what: str) -> list:
    from unlearn_fast.data import as_examples

    return [] if path is None else as_examples(path, what)


def _save_result(result, args: argparse.Namespace) -> Path:
    path = result.save(args.out, overwrite=args.overwrite)
    print(f"result saved to {path} (reload: UnlearnResult.load(dir, model))")
    return path


def _unlearn(method_cls, config, model, tokenizer, forget, retain, args: argparse.Namespace, **options):
    return method_cls(config).unlearn(
        model, forget, retain, tokenizer=tokenizer, progress=True, checkpoint_dir=args.checkpoint_dir, **options
    )


def _run_on_user_data(args: argparse.Namespace, method_cls, config):
    """SOUL or UOE on --forget/--retain with the model at --model: unlearn, save, print the last step."""
    if not args.forget:
        raise SystemExit(f"{args.command}: --retain needs --forget (the examples to unlearn)")
    forget, retain = _examples(args.forget, "forget"), _examples(args.retain, "retain")
    model, tokenizer = _load_model(args)
    print(f"{method_cls.__name__}: {len(forget)} forget and {len(retain)} retain examples, {args.model}")
    result = _unlearn(method_cls, config, model, tokenizer, forget, retain, args)
    last = result.history[-1] if result.history else {}
    print(
        f"unlearned in {result.wall_time_s:.1f} s ({len(result.history)} steps, final loss "
        f"{last.get('loss', float('nan')):.4g})"
    )
    _save_result(result, args)
    return result


def cmd_soul(args: argparse.Namespace, config=None) -> int:
    """SOUL on the user's data, or: fine-tuned model -> SOUL -> metrics, against the retain-only gold standard."""
    from unlearn_fast import SOUL, SOULConfig

    config = config or build_config(args, SOULConfig)
    if _user_data(args):
        _run_on_user_data(args, SOUL, config)
        return 0
    dataset = _dataset(args)
    print(
        f"fictitious facts: {len(dataset.forget)} forget, {len(dataset.retain)} retain, "
        f"{len(dataset.world_facts)} world-knowledge questions"
    )
    gold, tokenizer, _ = _finetuned(args, dataset, retain_only=True)
    results = {"retain-only (gold)": _evaluate(gold, tokenizer, dataset, args, "retain-only")}
    reference = results["retain-only (gold)"]["forget_truth_ratios"]
    model, tokenizer, _ = _finetuned(args, dataset)
    results["fine-tuned"] = _evaluate(model, tokenizer, dataset, args, "fine-tuned", reference)
    name = _objective_name(config)
    print(f"SOUL: {name} with {config.optimizer} ({config.estimator}), lr {config.lr}, {config.steps} steps")
    # The gold-level rule: stop once the forget answers are as unlikely as under retraining,
    # unless the config sets its own stopping rule.
    gold_rule = config.stop_at_forget_prob is None and config.utility_floor is None
    result = _unlearn(
        SOUL, config, model, tokenizer, dataset.forget, dataset.retain, args, gold_model=gold if gold_rule else None
    )
    del gold
    rates = [r["win_rate"] for r in result.history if "win_rate" in r]
    print(
        f"unlearned in {result.wall_time_s:.1f} s, {len(result.history)} steps (final loss "
        f"{result.history[-1]['loss']:.3f})" + (f", Sophia win rate {rates[0]:.3f} -> {rates[-1]:.3f}" if rates else "")
    )
    if "stop_reason" in result.metrics:
        print(f"kept step {result.metrics['kept_step']}: {result.metrics['stop_reason']}")
    _save_result(result, args)
    results[f"SOUL {name}/{config.optimizer}"] = _evaluate(
        result.model, tokenizer, dataset, args, "unlearned", reference
    )
    _save_results(results, args.out)
    return 0


def _objective_name(config) -> str:
    from unlearn_fast.objectives import objective_spec

    return objective_spec(config.objective)["name"]


def _print_uoe(result, model) -> None:
    if getattr(result, "attribution", None) is not None:
        print(result.attribution.table())
    layer, expert = result.target
    print(f"UOE: trained expert {expert} of layer {layer} and its router")


def cmd_uoe(args: argparse.Namespace, config=None) -> int:
    """UOE on the user's data, or: fine-tuned MoE (cached) -> expert attribution -> UOE -> metrics."""
    from unlearn_fast import UOE, UOEConfig

    config = config or build_config(args, UOEConfig)
    if _user_data(args):
        result = _run_on_user_data(args, UOE, config)
        _print_uoe(result, result.model)
        return 0
    dataset = _dataset(args)
    print(f"fictitious facts: {len(dataset.forget)} forget, {len(dataset.retain)} retain")
    model, tokenizer, domains = _specialised_moe(args)

    def evaluated(m, label: str) -> dict:
        # In-domain metrics, then the other domains' held-out perplexity (out-of-domain utility).
        from unlearn_fast.evaluate import perplexity

        out = _evaluate(m, tokenizer, dataset, args, label)
        return out | {f"perplexity {d}": perplexity(m, tokenizer, ev) for d, (_, ev) in domains.texts.items()}

    results = {"specialised MoE": evaluated(model, "specialised MoE")}
    result = _unlearn(UOE, config, model, tokenizer, dataset.forget, dataset.retain, args)
    _print_uoe(result, model)
    print(f"UOE {_objective_name(config)}: {config.steps} steps in {result.wall_time_s:.1f} s")
    _save_result(result, args)
    results[f"UOE {_objective_name(config)}"] = evaluated(result.model, "unlearned")
    _save_results(results, args.out)
    return 0


def _specialised_moe(args: argparse.Namespace):
    """The specialised MoE (:mod:`unlearn_fast.specialised_moe`) branched from --model on the command's facts:
    loaded from the cache, or built (once, minutes) when its settings are new. Returns (model, tokenizer, domains)."""
    from unlearn_fast.specialised_moe import SpecialisedMoEConfig, default_domains, specialised_moe_cached

    config = SpecialisedMoEConfig(people=args.people, questions_per_person=args.questions_per_person,
                                  forget_percent=args.forget_percent, data_seed=args.data_seed)  # fmt: skip
    start = time.perf_counter()
    model, tokenizer, report, hit, entry = specialised_moe_cached(args.model, config, cache_dir=args.cache_dir)
    source = "loaded from the cache" if hit else "built"
    print(f"specialised MoE {source} in {time.perf_counter() - start:.1f} s: {entry}\n{report.table}")
    return model, tokenizer, default_domains(config)


REFUSAL = "I'm not sure about that."
REQUERY_PREFIX = "Quick question: "


def _erase_edits(
    args: argparse.Namespace, train: list, default_count: int | None
) -> tuple[list[int], dict[int, str] | None]:
    """The chosen training indices and, for modify/correct, their new questions/answers (from
    --edits, else a fixed rewording of the question / a refusal as the new answer). Without
    --indices or --edits, the first ``default_count`` examples (the demo's forget split)."""
    if args.edits:
        field = "question" if args.task == "modify" else "answer"
        with open(args.edits) as f:
            records = [json.loads(line) for line in f if line.strip()]
        bad = [
            r
            for r in records
            if not isinstance(r.get("index"), int) or (args.task != "remove" and not isinstance(r.get(field), str))
        ]
        if not records or bad:
            need = '{"index": i}' if args.task == "remove" else f'{{"index": i, "{field}": "..."}}'
            raise SystemExit(f"erase: --edits needs one JSON object per line like {need}; bad lines: {bad[:3]}")
        indices = [r["index"] for r in records]
        new = None if args.task == "remove" else {r["index"]: r[field] for r in records}
        return indices, new
    if args.indices is None and default_count is None:
        raise SystemExit("erase: with --train, say which training examples to edit: --indices or --edits")
    indices = args.indices if args.indices is not None else list(range(default_count))
    if args.task == "remove":
        return indices, None
    if args.task == "modify":
        return indices, {i: REQUERY_PREFIX + _question(train[i]) for i in indices if 0 <= i < len(train)}
    return indices, {i: REFUSAL for i in indices if 0 <= i < len(train)}


def _question(example) -> str:
    return example.question if hasattr(example, "question") else example[0]


def _edit(eraser, args: argparse.Namespace, indices: list[int], new: dict[int, str] | None):
    resume = {"checkpoint_dir": args.checkpoint_dir, "progress": True}
    if args.task == "remove":
        return eraser.remove(indices, **resume)
    if args.task == "modify":
        return eraser.modify_queries(new, **resume)
    return eraser.correct_responses(new, **resume)


def cmd_erase(args: argparse.Namespace, config=None) -> int:
    """A LoRA (--adapter on --model, trained on --train) or the demo's fine-tuned one -> one LLMEraser
    edit -> report (and, on the demo's data, the metrics before and after)."""
    from unlearn_fast import LLMEraser
    from unlearn_fast.methods.llmeraser import LLMEraserConfig

    config = config or build_config(args, LLMEraserConfig)
    if args.train:
        if not args.adapter:
            raise SystemExit("erase: --train needs --adapter, the LoRA adapter directory fine-tuned on it")
        train, dataset = _examples(args.train, "train"), None
        indices, new = _erase_edits(args, train, None)
        model, tokenizer = _load_model(args)
    else:
        dataset = _dataset(args)
        train = dataset.forget + dataset.retain  # what the LoRA is fine-tuned on; the forget split first
        indices, new = _erase_edits(args, train, len(dataset.forget))  # before loading: a bad file fails fast
        if args.adapter:
            model, tokenizer = _load_model(args)
        else:
            model, tokenizer, _ = _finetuned(args, dataset)

    eraser = LLMEraser(model, train, config, tokenizer=tokenizer)
    if args.calibrate:
        if dataset is None or args.adapter or args.task != "remove":
            raise SystemExit(
                "erase: --calibrate retrains held-out removals with the demo's fine-tuning recipe, so it needs "
                "the demo's data (no --train or --adapter) and --task remove; with your own LoRA, call "
                "unlearn_fast.methods.llmeraser.calibrate with a function that retrains it"
            )
        eraser = _calibrated(eraser, args, indices)
        config = eraser.config
    print(
        f"LLMEraser {args.task}: {len(indices)} of {len(train)} training examples, {eraser.dim:,} adapter "
        f"parameters, solver {config.solver}, {config.curvature}, λ {config.damping:g}"
    )
    result = _edit(eraser, args, indices, new)
    report = result.report
    print(
        f"edited in {report.wall_time_s:.1f} s (gradients {report.gradient_time_s:.1f} s, solve "
        f"{report.solve_time_s:.1f} s): residual {report.residual:.3g} after {report.iterations} iterations, "
        f"{report.hvps} HVPs, ‖ΔΘ‖ {report.delta_norm:.3g}"
    )
    _save_result(result, args)
    if dataset is None:
        return 0

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
    _save_results(
        results, args.out, {"erase_report": {k: v for k, v in dataclasses.asdict(report).items() if k != "solver_info"}}
    )
    return 0


def _calibrated(eraser, args: argparse.Namespace, indices: list[int]):
    """``eraser`` at the λ of --calibrate-dampings that matches retraining best on --calibrate removals of as many
    examples, drawn outside ``indices`` (so λ is never tuned on the removal reported), each retrained with the
    demo's fine-tuning recipe (cached)."""
    from unlearn_fast.finetune import finetune_cached
    from unlearn_fast.methods.llmeraser import calibrate

    def retrain(removed: list[int]):
        model, _, report, hit = finetune_cached(
            args.model, eraser.train_data, _finetune_config(args), args.cache_dir, exclude=removed, progress=True
        )
        print(f"calibration: retrained without {removed} ({'cached' if hit else f'{report.train_time_s:.0f} s'})")
        return model

    start = time.perf_counter()
    found = calibrate(eraser, indices, retrain, args.calibrate_dampings, count=args.calibrate)
    errors = ", ".join(f"{lam:g}: {err:.3f}" for lam, err in found.errors.items())
    print(
        f"calibrated λ = {found.damping:g} on {len(found.sets)} other removals in {time.perf_counter() - start:.1f} s "
        f"(error per λ, 0 = as retraining, 1 = as not erasing: {errors})"
    )
    return eraser.with_damping(found.damping)


# The demo's settings of LLMEraser (docs/RESULTS.md): an EK-FAC curvature fitted once, and λ calibrated on two
# other removals of as many retain examples, each retrained (cached), never on the forget split it reports.
# UOE runs with its (the paper's) defaults.
DEMO_ERASE = {"curvature_method": "ekfac"}
DEMO_CALIBRATE = 2


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the embedded default model and data, end to end."""
    from unlearn_fast import available_backends

    cpu = available_backends()["cpu"]
    print("unlearn_fast backends on CPU:", ", ".join(b for b, r in cpu.items() if r is None))
    for method in args.methods:
        print(f"\n=== {method} ===")
        out = f"{args.out}/{method}"
        if method == "soul":
            cmd_soul(argparse.Namespace(**{**vars(args), "out": out, "overwrite": True}))
            continue
        # LLMEraser and UOE with their commands' data and fine-tuning, and the demo's settings.
        sub = [
            method,
            "--data-seed",
            str(args.data_seed),
            "--out",
            out,
            "--overwrite",
            "--eval-retain-size",
            str(args.eval_retain_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--eval-batch-size",
            str(args.eval_batch_size),
        ]
        if args.no_generate:
            sub.append("--no-generate")
        if args.cache_dir:
            sub += ["--cache-dir", args.cache_dir]
        if method == "erase":
            sub += ["--calibrate", str(DEMO_CALIBRATE)]
        sub_args = build_parser().parse_args(sub)
        if method == "erase":
            from unlearn_fast.methods.llmeraser import LLMEraserConfig

            cmd_erase(sub_args, build_config(sub_args, LLMEraserConfig, DEMO_ERASE))
        else:
            cmd_uoe(sub_args)
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def _add_method_io(parser: argparse.ArgumentParser, command: str, *, model: str) -> None:
    io = parser.add_argument_group("model, data and output")
    io.add_argument(
        "--model",
        default=model,
        help=f"a local model directory, a .gguf file, a Hub id, or 'smollm2' / 'smollm2-moe' (the "
        f"embedded SmolLM2-135M, upcycled to 4 experts) (default {model})",
    )
    if command == "erase":
        io.add_argument(
            "--train",
            default=None,
            metavar="FILE",
            help="the LoRA's training set (JSONL/JSON/CSV of question/answer rows); with --adapter and "
            "--indices or --edits, edits that LoRA (default: the demo's generated facts and "
            "fine-tuned LoRA)",
        )
    else:
        io.add_argument(
            "--forget",
            default=None,
            metavar="FILE",
            help="the examples to unlearn (JSONL/JSON/CSV of question/answer rows); the model at --model "
            "is unlearned directly (default: the demo's generated facts, after fine-tuning on them)",
        )
        io.add_argument("--retain", default=None, metavar="FILE", help="the examples to keep (same formats)")
    if command in ("soul", "erase", "demo"):
        io.add_argument(
            "--adapter",
            default=None,
            metavar="DIR",
            help="a saved peft LoRA adapter directory to load on --model (trainable)",
        )
    io.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="settings of the method as YAML or JSON (field: value); flags override them",
    )
    io.add_argument(
        "--out",
        default=f"runs/{command}",
        metavar="DIR",
        help=f"the result is saved there (weights of what changed, config, metrics; with the demo's "
        f"data also results.json and a PNG plot) (default runs/{command})",
    )
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    io.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="checkpoint the run there and resume from it when run again (default: none)",
    )


def _add_facts_options(
    parser: argparse.ArgumentParser, *, evaluation: bool = True, out: bool = False, finetune: bool = True
) -> None:
    """The demo's data (generated facts), (``finetune``) its fine-tuning and (``evaluation``) its evaluation."""
    from unlearn_fast.finetune import FinetuneConfig

    data = parser.add_argument_group(
        "the demo's data (generated fictitious facts, TOFU-style; not with --forget / --train)"
    )
    data.add_argument("--people", type=int, default=20, help="fictitious people (default %(default)s)")
    data.add_argument("--questions-per-person", type=int, default=10, help="questions per person (default %(default)s)")
    data.add_argument(
        "--forget-percent", type=float, default=10, help="share of examples to forget (default %(default)s)"
    )
    data.add_argument("--data-seed", type=int, default=0, help="seed of the generated facts (default %(default)s)")
    if finetune:
        add_config_flags(
            parser,
            FinetuneConfig,
            prefix="finetune-",
            title="fine-tuning on the facts (cached on disk, keyed by these settings)",
            defaults=parser.get_default("finetune_defaults"),
        )
    parser.add_argument_group("fine-tuning cache").add_argument(
        "--cache-dir", default=None, help="default ~/.cache/unlearn_fast/finetune ($UNLEARN_FAST_CACHE)"
    )
    if not evaluation:
        return
    ev = parser.add_argument_group("evaluation on the facts")
    ev.add_argument("--no-generate", action="store_true", help="skip greedy generation (no ROUGE-L; faster)")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="generation length for ROUGE-L (default 32)")
    ev.add_argument(
        "--eval-retain-size",
        type=int,
        default=40,
        help="evaluate on this many retain examples, a fixed sample (default 40; 0 = all)",
    )
    ev.add_argument("--eval-batch-size", type=int, default=16, help="default 16")
    if out:
        ev.add_argument("--out", default="runs/evaluate", help="folder for results.json and the PNG plot")


def _add_erase_options(parser: argparse.ArgumentParser) -> None:
    erase = parser.add_argument_group("the edit")
    erase.add_argument(
        "--task",
        choices=("remove", "modify", "correct"),
        default="remove",
        help="remove examples (default), modify their questions, or correct their answers",
    )
    erase.add_argument(
        "--indices",
        type=int,
        nargs="+",
        default=None,
        help="training examples to edit (default with the demo's data: the forget split)",
    )
    erase.add_argument(
        "--edits",
        default=None,
        help='JSONL of edits: {"index": i} to remove, {"index": i, "question": ...} to modify, '
        '{"index": i, "answer": ...} to correct (default: a reworded question / a refusal)',
    )
    erase.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="K",
        help="choose λ among --calibrate-dampings first, on K other removals of as many examples, each retrained "
        "with the demo's fine-tuning recipe (cached); with the demo's data only (default 0: use --damping)",
    )
    erase.add_argument(
        "--calibrate-dampings",
        type=float,
        nargs="+",
        default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0],
        metavar="λ",
        help="the grid --calibrate chooses from (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    from unlearn_fast import SOULConfig, UOEConfig
    from unlearn_fast.methods.llmeraser import LLMEraserConfig
    from unlearn_fast.specialised_moe import SpecialisedMoEConfig

    parser = argparse.ArgumentParser(
        prog="unlearn-fast",
        description="Fast machine unlearning for large language models (SOUL, LLMEraser, UOE).",
        epilog="Method flags: one per config field, defaults as in the Python API; --config FILE.yaml|json under "
        "the flags; --objective NAME --objective-arg KEY=VALUE for the objective.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the main job: SmolLM2-135M fine-tuned on fictitious facts (cached), then unlearned with "
        "SOUL, LLMEraser and UOE",
        description="Fine-tunes (or loads from the cache) SmolLM2-135M on generated fictitious facts, and on the "
        "retain split alone (the gold standard), then unlearns the forget split with SOUL (the LoRA), "
        "LLMEraser (removing the forget split from the LoRA's training set) and UOE (SmolLM2 upcycled "
        "to a 4-expert MoE and fine-tuned the same way), printing the metrics before and after each; "
        "writes the results, JSON and PNG plots under --out/<method>. The SOUL options apply to SOUL; "
        "erase and uoe run with the settings of docs/RESULTS.md.",
    )
    demo.set_defaults(
        func=cmd_demo,
        model="smollm2",
        forget=None,
        retain=None,
        train=None,
        adapter=None,
        checkpoint_dir=None,
        config=None,
    )
    _add_facts_options(demo)
    add_config_flags(demo, SOULConfig, title="SOUL (defaults as in the Python API)")
    demo.add_argument("--config", default=None, metavar="FILE", help="SOUL's settings as YAML or JSON")
    demo.add_argument("--out", default="runs/demo", help="results go to OUT/<method> (default runs/demo)")
    demo.add_argument(
        "--methods",
        nargs="+",
        choices=("soul", "erase", "uoe"),
        default=["soul", "erase", "uoe"],
        help="which methods to run, in order (default all three)",
    )

    soul = sub.add_parser(
        "soul",
        help="SOUL: second-order (Sophia) unlearning of --forget from --model, or of the demo's facts",
        description="Unlearns the --forget examples from the model at --model (keeping --retain) with SOUL and "
        "saves the result to --out. Without --forget: the demo's generated facts, a LoRA fine-tuned "
        "on them (cached), and the metrics before and after against the retain-only gold standard.",
    )
    _add_method_io(soul, "soul", model="smollm2")
    add_config_flags(soul, SOULConfig, title="SOUL (defaults as in the Python API)")
    _add_facts_options(soul)
    soul.set_defaults(func=cmd_soul)

    uoe = sub.add_parser(
        "uoe",
        help="UOE: unlearn --forget from one expert of an MoE (default: the specialised MoE of build-moe)",
        description="Attributes the --forget examples to one expert of the MoE at --model, unlearns them there with "
        "UOE and saves the result to --out. Without --forget: the specialised MoE branched from --model (default "
        "SmolLM2-135M) with experts trained on the demo's facts, Python and prose (unlearn-fast build-moe; cached), "
        "and the metrics before and after, the other domains' perplexity included.",
    )
    _add_method_io(uoe, "uoe", model="smollm2")
    add_config_flags(uoe, UOEConfig, title="UOE (defaults as in the Python API)")
    _add_facts_options(uoe, finetune=False)
    # After the options: set_defaults overrides their defaults (the facts the specialised MoE is built on).
    uoe.set_defaults(func=cmd_uoe, people=5, forget_percent=20)

    erase = sub.add_parser(
        "erase",
        help="LLMEraser: influence-function removal/modification/correction of a LoRA's training examples",
        description="Edits training examples of a LoRA adapter (--adapter on --model, fine-tuned on --train) with one "
        "influence-function step of LLMEraser, prints the solver report and saves the result to --out. "
        "Without --train: a LoRA fine-tuned on the demo's facts (cached), and the metrics before and "
        "after.",
    )
    _add_method_io(erase, "erase", model="smollm2")
    _add_erase_options(erase)
    add_config_flags(erase, LLMEraserConfig, title="LLMEraser (defaults as in the Python API)")
    _add_facts_options(erase)
    erase.set_defaults(func=cmd_erase)

    finetune = sub.add_parser("finetune", help="fine-tune a model on the fictitious facts (cached on disk)")
    finetune.add_argument("--model", default="smollm2", help="'smollm2' (default), 'smollm2-moe' or a model path")
    _add_facts_options(finetune, evaluation=False)
    finetune.set_defaults(func=cmd_finetune)

    build_moe = sub.add_parser(
        "build-moe",
        help="build the specialised MoE UOE is tested on (Branch-Train-MiX style; cached on disk)",
        description="SmolLM2-135M -> a Qwen2-MoE whose top layers hold experts fine-tuned on the fictitious facts, "
        "Python source and English prose, and routers trained to send each domain to its expert; fails with the "
        "numbers unless its pre-checks pass. Cached under --cache-dir, keyed by the settings and the data.",
    )
    build_moe.add_argument("--model", default="smollm2", help="the dense Llama to branch from (default smollm2)")
    build_moe.add_argument("--config", default=None, metavar="FILE", help="the build's settings as YAML or JSON")
    build_moe.add_argument(
        "--cache-dir", default=None, help="default ~/.cache/unlearn_fast/finetune ($UNLEARN_FAST_CACHE)"
    )
    add_config_flags(build_moe, SpecialisedMoEConfig, title="the build (unlearn_fast.specialised_moe)")
    build_moe.set_defaults(func=cmd_build_moe)

    evaluate = sub.add_parser("evaluate", help="forget/retain/utility metrics of the base and fine-tuned models")
    evaluate.add_argument("--model", default="smollm2", help="'smollm2' (default), 'smollm2-moe' or a model path")
    _add_facts_options(evaluate, out=True)
    evaluate.add_argument("--finetuned-only", action="store_true", help="skip the base model")
    evaluate.set_defaults(func=cmd_evaluate)

    score = sub.add_parser("score", help="per-token log-probabilities and perplexity of texts")
    score.add_argument("texts", nargs="+", help="texts to score")
    score.add_argument("--model", default="smollm2", help="'smollm2' (default, offline) or a model path")
    score.add_argument("--json", help="also write the scores to this JSON file")
    score.set_defaults(func=cmd_score)

    backends = sub.add_parser("backends", help="which kernel backends can run here, and why not")
    backends.set_defaults(func=cmd_backends)
    return parser


_CONFIGS = {
    "soul": "SOULConfig",
    "demo": "SOULConfig",
    "uoe": "UOEConfig",
    "erase": "LLMEraserConfig",
    "build-moe": "SpecialisedMoEConfig",
}


def _check_settings(args: argparse.Namespace) -> None:
    """Build the data, fine-tuning and method settings once up front, so that a bad value fails in a
    second with the library's message, not after minutes of fine-tuning."""
    if hasattr(args, "people") and not _user_data(args):
        _dataset(args)
        _finetune_config(args)
        if not getattr(args, "no_generate", True) and importlib.util.find_spec("rouge_score") is None:
            raise ValueError(
                "the evaluation's ROUGE-L needs rouge-score: pip install 'unlearn-fast[eval]', or pass --no-generate"
            )
    if args.command in _CONFIGS:
        import unlearn_fast
        from unlearn_fast import specialised_moe
        from unlearn_fast.methods import llmeraser

        name = _CONFIGS[args.command]
        cls = getattr(unlearn_fast, name, None) or getattr(llmeraser, name, None) or getattr(specialised_moe, name)
        build_config(args, cls)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_settings(args)
    except (ValueError, TypeError) as error:
        parser.error(str(error))  # usage error: exit status 2
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError) as error:  # a model, data or output path: the message says which
        parser.exit(1, f"unlearn-fast: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
