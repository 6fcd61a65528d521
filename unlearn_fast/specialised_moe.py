"""A genuinely specialised MoE built offline from a dense model, Branch-Train-MiX style (Sukhbaatar et al., 2024).

UOE's claim (knowledge of the forget data sits in one expert) can only be tested on an MoE whose experts differ:
upcycled copies route every domain alike. :func:`build_specialised_moe` makes one from SmolLM2-135M (or any
bias-free Llama) in three stages:

1. **Branch and train.** For each domain, a copy of the dense model trains the MLPs of its top ``moe_layers``
   layers (everything else frozen) on that domain's text: expert 0 on the fictitious facts (the uoe command's
   forget + retain split, answer tokens), expert 1 on Python source from the standard library, expert 2 on English
   prose from installed packages' documentation (:func:`unlearn_fast.data.domain_texts`). Further experts stay
   copies of the dense MLP (the general fallback). The layers below are frozen, so their output is computed once
   per batch (:func:`unlearn_fast.models.prefix_cache.prefix_cached`).
2. **Mix.** The dense model becomes a Qwen2-MoE (:func:`unlearn_fast.models.upcycle_llama_to_qwen2_moe`) whose top
   layers hold the trained MLPs as experts.
3. **Route.** Router-only training with a supervised loss: cross-entropy of each router's softmax against the
   token's domain expert (every attended token of a sequence is labelled with the sequence's domain). BTX learns
   the router from the LM loss on the mixed data; a supervised warm start on domain labels is the documented
   shortcut used here (cheaper on CPU, and it makes the routing the pre-checks ask for a training target).

Why Qwen2-MoE, top-2 of 4 experts in the top 6 of 30 layers:

* CPU cost: ``mlp_only_layers`` keeps 24 layers dense, so a forward costs the dense model plus one extra MLP in
  6 layers (Mixtral would make every layer an MoE: 30 layers x top-2, 4x the MLP parameters of all layers);
* exactness: the dense layers are the Llama's own MLP weights (no routing at all), attention has its q/k/v biases
  off, the shared expert has width 0 (adds exactly 0) and the top-k weights are renormalised, so the MoE computes
  SmolLM2's logits at build start (tested to 1e-5);
* UOE: ``qwen2_moe`` is in :data:`unlearn_fast.models.moe.MOE_FAMILIES` (dense layers from ``mlp_only_layers``);
* top-2, not top-1: with top-1 renormalised the gate is always 1, so the router never gets a gradient from the
  LM loss and UOE's anchor weight could not matter; top-2 keeps the router a lever (as in BTX and the papers'
  models) while one expert carries most of a token's mass after routing.

The build must pass :func:`specialisation_report`'s pre-checks, or it fails with the numbers.
:func:`specialised_moe_cached` keeps the result on disk (a Hugging Face model directory, keyed by the config and
the data; written atomically): ``unlearn-fast build-moe``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearn_fast import __version__, models, training
from unlearn_fast.config import Config
from unlearn_fast.data import (
    QADataset,
    QAExample,
    collate,
    domain_texts,
    make_facts_dataset,
    pad_token_id_of,
    world_facts,
)
from unlearn_fast.evaluate import answer_probability, perplexity
from unlearn_fast.finetune import answer_loss, default_cache_dir
from unlearn_fast.io import atomic_path
from unlearn_fast.methods.uoe import attribute_experts
from unlearn_fast.models.moe import masked_expert, moe_layers
from unlearn_fast.models.prefix_cache import prefix_cached
from unlearn_fast.models.structure import decoder_layers

logger = logging.getLogger(__name__)
DOMAINS = ("facts", "python", "prose")  # domain i trains expert i
FACTS_EXPERT = 0
_REPORT_FILE = "build_report.json"


@dataclass(frozen=True)
class SpecialisedMoEConfig(Config):
    """How to build the specialised MoE. Defaults: SmolLM2-135M, sized for <= 30 minutes on two CPU cores.

    moe_layers: how many top decoder layers become MoE layers (the others keep the dense MLP).
    num_experts: experts per MoE layer; experts 0, 1, 2 train on facts, Python, prose, the rest stay dense copies.
    top_k: experts per token (2: see the module docstring).
    people, questions_per_person, forget_percent, data_seed: the fictitious facts (the uoe command's).
    texts_per_domain: Python / prose chunks each expert trains on. eval_texts: held-out chunks per domain.
    text_chars: characters per chunk. max_length: tokens per sequence, every stage.
    facts_steps: AdamW steps of the facts expert's branch. facts_lr: its learning rate.
    text_steps: AdamW steps of the Python and prose branches. text_lr: their learning rate.
    router_steps: steps of the supervised router training (one batch per domain a step). router_lr: its lr.
    batch_size: sequences per batch, every stage. seed: the data order.
    min_facts_share: the facts expert's least share of the forget answers' routing mass, every MoE layer.
    max_other_share: its largest share of another domain's routing mass, every MoE layer.
    min_forget_drop: the least relative drop of the forget answer probability with the facts expert masked.
    max_perplexity_change: the largest relative change of another domain's perplexity with it masked.
    """

    moe_layers: int = 6
    num_experts: int = 4
    top_k: int = 2
    people: int = 5
    questions_per_person: int = 10
    forget_percent: float = 20
    data_seed: int = 0
    texts_per_domain: int = 256
    eval_texts: int = 32
    text_chars: int = 300
    max_length: int = 96
    facts_steps: int = 120
    facts_lr: float = 1e-3
    text_steps: int = 64
    text_lr: float = 3e-4
    router_steps: int = 60
    router_lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0
    min_facts_share: float = 0.6
    max_other_share: float = 0.15
    min_forget_drop: float = 0.5
    max_perplexity_change: float = 0.05

    def __post_init__(self) -> None:
        counts = ("moe_layers", "num_experts", "top_k", "people", "questions_per_person", "texts_per_domain")
        counts += ("eval_texts", "batch_size")
        problems = [f"{n} must be an integer >= 1, got {getattr(self, n)!r}" for n in counts if getattr(self, n) < 1]
        problems += [
            f"{n} must be an integer >= 0, got {getattr(self, n)!r}"
            for n in ("facts_steps", "text_steps", "router_steps")
            if getattr(self, n) < 0
        ]
        problems += [f"{n} must be > 0" for n in ("facts_lr", "text_lr", "router_lr") if not getattr(self, n) > 0]
        if self.num_experts < len(DOMAINS):
            problems.append(f"num_experts must be >= {len(DOMAINS)} (one per domain: {DOMAINS})")
        if self.top_k > self.num_experts - 1:
            problems.append("top_k must be < num_experts (masking one expert must leave top_k to choose from)")
        if self.max_length < 8 or self.text_chars < 20:
            problems.append("max_length must be >= 8 and text_chars >= 20")
        if problems:
            raise ValueError("SpecialisedMoEConfig: " + "; ".join(problems))


@dataclass
class MoEDomains:
    """The build's data: the facts (forget + retain train expert 0; the forget split is what the checks read)
    and per text domain its training and held-out chunks."""

    forget: list[QAExample]
    retain: list[QAExample]
    texts: dict[str, tuple[list[str], list[str]]]  # domain -> (train, eval)


def default_domains(config: SpecialisedMoEConfig = SpecialisedMoEConfig()) -> MoEDomains:
    """The fictitious facts of the uoe command and the offline Python / prose chunks (train first, eval after)."""
    facts = make_facts_dataset(config.people, config.questions_per_person, config.forget_percent, seed=config.data_seed)
    texts = {}
    for domain in DOMAINS[1:]:
        chunks = domain_texts(domain, config.texts_per_domain + config.eval_texts, chars=config.text_chars)
        texts[domain] = (chunks[: config.texts_per_domain], chunks[config.texts_per_domain :])
    return MoEDomains(facts.forget, facts.retain, texts)


# --- pre-checks -------------------------------------------------------------------------------


class SpecialisationError(ValueError):
    """The built MoE failed its pre-checks; ``report`` holds the numbers."""

    def __init__(self, message: str, report: SpecialisationReport):
        super().__init__(message)
        self.report = report


@dataclass
class SpecialisationReport:
    """What the pre-checks measure on an MoE (shares per MoE layer; other domains by name)."""

    expert: int
    facts_share: dict[int, float]  # the expert's share of the forget answers' routing mass, per layer
    other_share: dict[str, dict[int, float]]  # ... of each other domain's tokens, per layer
    forget_prob: float  # mean answer probability of the forget split
    forget_prob_masked: float  # ... with the expert masked
    perplexity: dict[str, float]  # per other domain
    perplexity_masked: dict[str, float]
    world_share: dict[int, float] = field(default_factory=dict)  # ... of the world facts' answers (not checked)

    @property
    def forget_drop(self) -> float:
        return 1.0 - self.forget_prob_masked / self.forget_prob

    @property
    def perplexity_change(self) -> dict[str, float]:
        return {d: self.perplexity_masked[d] / p - 1.0 for d, p in self.perplexity.items()}

    def failures(self, config: SpecialisedMoEConfig) -> list[str]:
        """The checks not met, each with its numbers ([] when all pass)."""
        out = [
            f"layer {layer}: facts expert gets {s:.1%} of the forget answers' routing mass (< {config.min_facts_share:.0%})"
            for layer, s in self.facts_share.items()
            if s < config.min_facts_share
        ]
        out += [
            f"layer {layer}: facts expert gets {s:.1%} of {d}'s routing mass (> {config.max_other_share:.0%})"
            for d, shares in self.other_share.items()
            for layer, s in shares.items()
            if s > config.max_other_share
        ]
        if not self.forget_drop >= config.min_forget_drop:
            out.append(
                f"masking the facts expert drops the forget answer probability by {self.forget_drop:.1%} "
                f"({self.forget_prob:.3f} -> {self.forget_prob_masked:.3f}; < {config.min_forget_drop:.0%})"
            )
        out += [
            f"masking the facts expert changes {d}'s perplexity by {c:+.1%} (|change| >= {config.max_perplexity_change:.0%})"
            for d, c in self.perplexity_change.items()
            if not abs(c) < config.max_perplexity_change
        ]
        return out

    def table(self) -> str:
        layers = list(self.facts_share)
        lines = [
            f"routing mass on expert {self.expert}, per MoE layer " + " ".join(f"{f'L{x}':>6}" for x in layers),
            f"  {'forget answers':<44}" + " ".join(f"{self.facts_share[x]:>6.1%}" for x in layers),
        ]
        for d, shares in self.other_share.items():
            lines.append(f"  {d:<44}" + " ".join(f"{shares[x]:>6.1%}" for x in layers))
        if self.world_share:
            lines.append(f"  {'world facts answers (not checked)':<44}" + " ".join(
                f"{self.world_share[x]:>6.1%}" for x in layers))  # fmt: skip
        lines.append(
            f"forget answer probability {self.forget_prob:.3f} -> {self.forget_prob_masked:.3f} with expert "
            f"{self.expert} masked (drop {self.forget_drop:.1%})"
        )
        for d, p in self.perplexity.items():
            lines.append(
                f"{d} perplexity {p:.3f} -> {self.perplexity_masked[d]:.3f} ({self.perplexity_change[d]:+.2%})"
            )
        return "\n".join(lines)

    def check(self, config: SpecialisedMoEConfig) -> None:
        """Raise :class:`SpecialisationError` with the failed checks and the whole table unless all pass."""
        if failures := self.failures(config):
            raise SpecialisationError(
                "the specialised MoE failed its pre-checks:\n  " + "\n  ".join(failures) + "\n" + self.table(), self
            )


def _shares(model, data, expert: int, tokens: str, **options) -> dict[int, float]:
    """Per MoE layer, ``expert``'s share of the routing mass (UOE's attribution scores, normalised per layer)."""
    scores = attribute_experts(model, data, tokens=tokens, **options).scores
    return {layer: float(s[expert] / s.sum()) for layer, s in scores.items()}


@torch.no_grad()
def specialisation_report(
    model: torch.nn.Module,
    tokenizer: Any,
    forget: Sequence[QAExample],
    other_texts: Mapping[str, Sequence[str]],
    *,
    expert: int = FACTS_EXPERT,
    max_length: int = 96,
    batch_size: int = 8,
) -> SpecialisationReport:
    """The pre-check numbers of ``model``: ``expert``'s share of the routing mass of the forget answers (the
    positions UOE's answer scope reads) and of each other domain's tokens, per MoE layer; and the forget answer
    probability and the other domains' perplexity with ``expert`` masked (:func:`unlearn_fast.models.masked_expert`:
    its tokens go to their next choices) and without. Also, unchecked, its share of the real-world facts' answers
    (:func:`unlearn_fast.data.world_facts`, the utility set UOE is judged on)."""
    other = {d: _text_batches(tokenizer, list(t), max_length, batch_size) for d, t in other_texts.items()}
    share = {"batch_size": batch_size, "max_length": max_length}
    measured = {}
    for masked in (False, True):
        with masked_expert(model, expert) if masked else contextlib.nullcontext():
            prob = sum(answer_probability(model, tokenizer, forget, max_length=max_length)) / len(forget)
            ppl = {d: perplexity(model, tokenizer, list(t), max_length=max_length) for d, t in other_texts.items()}
        measured[masked] = (prob, ppl)
    return SpecialisationReport(
        expert=expert,
        facts_share=_shares(model, forget, expert, "answer", tokenizer=tokenizer, **share),
        other_share={d: _shares(model, b, expert, "all", **share) for d, b in other.items()},
        world_share=_shares(model, world_facts(), expert, "answer", tokenizer=tokenizer, **share),
        forget_prob=measured[False][0],
        forget_prob_masked=measured[True][0],
        perplexity=measured[False][1],
        perplexity_masked=measured[True][1],
    )


# --- the build --------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What a build did: per stage its steps, first and last loss and seconds; the pre-check numbers."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    table: str = ""  # the pre-checks as printed (SpecialisationReport.table)
    wall_time_s: float = 0.0


def _text_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Whole-text LM batches: every token after the first is predicted (as :func:`evaluate.perplexity` scores)."""
    encoded = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=True)[:max_length]
        encoded.append({"input_ids": ids, "labels": ids})
    pad = pad_token_id_of(tokenizer)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def _domain_batches(tokenizer, domains: MoEDomains, cfg: SpecialisedMoEConfig) -> dict[str, list[dict]]:
    facts = QADataset(tokenizer, domains.forget + domains.retain, cfg.max_length)
    batches = {
        "facts": [facts.collate(facts.encoded[i : i + cfg.batch_size]) for i in range(0, len(facts), cfg.batch_size)]
    }
    for domain, (train, _) in domains.texts.items():
        batches[domain] = _text_batches(tokenizer, train, cfg.max_length, cfg.batch_size)
    return batches


def _cycle(batches: list, seed: int) -> Iterator:
    """Batches in a fresh seeded order every pass."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(batches)))
        rng.shuffle(order)
        yield from (batches[i] for i in order)


@contextlib.contextmanager
def _branches(dense, batches: dict[str, list[dict]], first: int) -> Iterator[tuple[torch.nn.Module, Any]]:
    """One trainable copy of ``dense`` (MLPs of layers ``first..`` trainable, all else frozen; eval mode: no
    dropout) under a prefix cache of every domain's batches: the frozen layers run once per batch for the whole
    build (the MoE's layers below ``first`` compute the same function, so the router stage reuses the states)."""
    branch = copy.deepcopy(dense).eval().requires_grad_(False)
    for layer in decoder_layers(branch)[first:]:
        layer.mlp.requires_grad_(True)
    with prefix_cached(branch, first, [b for bs in batches.values() for b in bs]) as cache:
        yield branch, cache


def _train_branch(branch, dense, batches, first: int, steps: int, lr: float, name: str, seed: int, progress: bool):
    """Train ``branch``'s MLPs of layers ``first..``, reset to ``dense``'s, on ``batches``: their weights per layer
    as (gate_up [2I, H], down [H, I]), and the run's history."""
    layers = decoder_layers(branch)[first:]
    with torch.no_grad():
        for mine, theirs in zip(layers, decoder_layers(dense)[first:]):
            mine.mlp.load_state_dict(theirs.mlp.state_dict())
    named = [(f"{first + i}.{n}", p) for i, layer in enumerate(layers) for n, p in layer.mlp.named_parameters()]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    history = training.train_loop(
        branch,
        named,
        optimizer,
        lambda batch: (answer_loss(branch, batch), {}),
        _cycle(batches, seed),
        name=name,
        steps=steps,
        max_grad_norm=1.0,
        progress=progress,
        hint=f"lower the learning rate (now {lr:g})",
    )
    weights = [
        (
            torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach().clone(),
            layer.mlp.down_proj.weight.detach().clone(),
        )
        for layer in layers
    ]
    return weights, history


def _train_routers(moe, batches: dict[str, list[dict]], states, cfg: SpecialisedMoEConfig, progress: bool) -> list:
    """Router-only training: each router's softmax against the token's domain expert (cross-entropy), on the
    router inputs of a no-grad forward of the decoder (no LM head; one batch per domain a step; the routers' inputs
    move as they train). ``states``: the prefix cache's hidden states entering the first MoE layer."""
    blocks = moe_layers(moe)
    routers = [block.gate for _, block in blocks]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        r.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, r in enumerate(routers)
    ]
    named = [(f"{layer}.gate.weight", r.weight) for (layer, _), r in zip(blocks, routers)]
    flags = {p: p.requires_grad for p in moe.parameters()}
    moe.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    streams = [(DOMAINS.index(d), _cycle(b, cfg.seed + i)) for i, (d, b) in enumerate(batches.items())]

    def loss_fn(_):
        loss = 0.0
        for expert, stream in streams:
            batch = next(stream)
            with torch.no_grad():
                moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            keep = batch["attention_mask"].reshape(-1).bool()
            for i, r in enumerate(routers):
                logits = inputs[i].reshape(keep.shape[0], -1)[keep] @ r.weight.T
                target = torch.full((logits.shape[0],), expert, dtype=torch.long)
                loss = loss + torch.nn.functional.cross_entropy(logits.float(), target)
        return loss / (len(streams) * len(routers)), {}

    optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.router_lr, weight_decay=0.0)
    first = blocks[0][0]
    try:
        with prefix_cached(moe, first, [b for bs in batches.values() for b in bs], states):
            return training.train_loop(
                moe, named, optimizer, loss_fn, iter(int, 1), name="routers", steps=cfg.router_steps,
                max_grad_norm=None, progress=progress,
            )  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _stage(history: list[dict], seconds: float, cpu_seconds: float) -> dict[str, float]:
    """A stage's record; ``per_step_s`` from the steps after the first (the first pays warm-up). ``cpu_s``: the
    process's CPU time in the stage (on a shared machine, with one thread, what the stage costs on its own)."""
    losses = [r["loss"] for r in history]
    times = [r["time_s"] for r in history]
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else (times[0] if times else 0.0)
    return {
        "steps": len(history),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "seconds": seconds,
        "cpu_s": cpu_seconds,
        "per_step_s": per_step,
    }


def build_specialised_moe(
    dense: torch.nn.Module,
    tokenizer: Any,
    config: SpecialisedMoEConfig = SpecialisedMoEConfig(),
    domains: MoEDomains | None = None,
    *,
    check: bool = True,
    progress: bool = True,
) -> tuple[torch.nn.Module, BuildReport]:
    """The specialised Qwen2-MoE built from the dense Llama ``dense`` (left unchanged): see the module docstring.

    ``domains``: the data (default :func:`default_domains`). With ``check`` the pre-checks must pass
    (:meth:`SpecialisationReport.check` raises :class:`SpecialisationError` with the numbers); their numbers are
    in the report either way. Deterministic given the config on a fixed thread count; the global RNG is left as
    it was. Returns the model in eval mode.
    """
    cfg = config
    domains = domains or default_domains(cfg)
    start = time.perf_counter()
    report = BuildReport()
    batches = _domain_batches(tokenizer, domains, cfg)
    first = dense.config.num_hidden_layers - cfg.moe_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        moe = models.upcycle_llama_to_qwen2_moe(dense, cfg.num_experts, cfg.top_k, cfg.moe_layers).eval()
        t0, c0 = time.perf_counter(), time.process_time()
        with _branches(dense, batches, first) as (branch, cache):
            report.stages["prefix"] = {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            logger.info("build-moe: prefix %s", report.stages["prefix"])
            for expert, domain in enumerate(DOMAINS):
                t0, c0 = time.perf_counter(), time.process_time()
                steps, lr = (cfg.facts_steps, cfg.facts_lr) if domain == "facts" else (cfg.text_steps, cfg.text_lr)
                name = f"expert {expert} ({domain})"
                weights, history = _train_branch(
                    branch, dense, batches[domain], first, steps, lr, name, cfg.seed, progress
                )
                with torch.no_grad():
                    for (_, block), (gate_up, down) in zip(moe_layers(moe), weights):
                        block.experts.gate_up_proj[expert].copy_(gate_up)
                        block.experts.down_proj[expert].copy_(down)
                report.stages[name] = _stage(history, time.perf_counter() - t0, time.process_time() - c0)
                logger.info("build-moe: %s %s", name, report.stages[name])
            states = cache.states
        del branch
        t0, c0 = time.perf_counter(), time.process_time()
        history = _train_routers(moe, batches, states, cfg, progress)
        report.stages["routers"] = _stage(history, time.perf_counter() - t0, time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    checks = specialisation_report(
        moe, tokenizer, domains.forget, {d: ev for d, (_, ev) in domains.texts.items()}, max_length=cfg.max_length
    )
    report.checks = {**asdict(checks), "forget_drop": checks.forget_drop, "perplexity_change": checks.perplexity_change}
    report.stages["checks"] = {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    report.wall_time_s = time.perf_counter() - start
    report.table = checks.table()
    print(report.table)
    if check:
        checks.check(cfg)
    return moe, report


# --- cache ------------------------------------------------------------------------------------


def build_key(model_name: str | os.PathLike, config: SpecialisedMoEConfig, domains: MoEDomains) -> str:
    """Hex digest naming a build: the base model's name, the config, every text and QA pair, the library version."""
    payload = {
        "model": os.fspath(model_name),
        "config": config.to_dict(),
        "facts": [[ex.question, ex.answer] for ex in domains.forget + domains.retain],
        "texts": domains.texts,
        "unlearn_fast": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def specialised_moe_cached(
    model_name: str | os.PathLike = "smollm2",
    config: SpecialisedMoEConfig = SpecialisedMoEConfig(),
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> tuple[torch.nn.Module, Any, BuildReport, bool, Path]:
    """:func:`build_specialised_moe` on ``models.load(model_name)``, through an on-disk cache.

    Returns ``(model, tokenizer, report, cache_hit, entry)``. The entry ``cache_dir/moe-<build_key>/`` (default
    :func:`unlearn_fast.finetune.default_cache_dir`) is a Hugging Face model directory (``save_pretrained`` of
    the model and tokenizer; ``unlearn-fast uoe --model ENTRY`` reads it) plus the build report, written
    atomically. A build that fails its pre-checks is not cached.
    """
    domains = default_domains(config)
    entry = Path(cache_dir or default_cache_dir()).expanduser() / f"moe-{build_key(model_name, config, domains)}"
    if entry.is_dir():
        model, tokenizer = models.load_model(entry)
        report = BuildReport(**json.loads((entry / _REPORT_FILE).read_text()))
        return model.eval(), tokenizer, report, True, entry
    dense, tokenizer = models.load(model_name)
    model, report = build_specialised_moe(dense, tokenizer, config, domains, progress=progress)
    with atomic_path(entry, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return model, tokenizer, report, False, entry
