"""UOE: unlearning one expert of a Mixture-of-Experts model (Zhuang et al., 2024; later SEUF).

1. Attribution (:func:`attribute_experts`): for every MoE layer l and routed expert i, the
   affinity of the forget data, score_i^(l) = (1/Z) Σ_j (1/L_j) Σ_t g_{i,t}^(l), the mean over
   the Z forget sequences of their per-token mean routing weight g (what the family's router
   gives expert i: top-k masked, renormalised or scaled as that family does) over the L_j tokens
   in scope: by default (``token_scope="answer"``) the positions whose next token is scored
   (labels[t+1] != -100), not the prompt or chat template; ``"all"``: every attended token. One
   fused pass per layer (:func:`unlearn_fast.ops.expert_attribution`); shared experts are never
   candidates.
2. The top-1 expert e* over all layers fixes the target layer l*; with ``num_experts=M`` the M
   best experts of l* train (:meth:`ExpertAttribution.top_experts`).
3. Only those experts and the router of l* train (:func:`unlearn_fast.models.expert_training.train_experts`:
   no gradient is formed for the other experts' slices of the fused expert weights). The layers
   below l* are frozen, so their outputs on the forget and retain batches are computed once
   (:func:`unlearn_fast.models.prefix_cache.prefix_cached`) and each step runs layers l*..L only.
4. Loss: objective(D_f, D_r) + α · L_anchor, with the router anchor
   L_anchor = mean over the forget tokens in scope of ‖s_t^(l*) − a‖², s_t the router's scores
   before top-k (softmax or sigmoid) and a the mass on the trained experts, which keeps the forget
   tokens routed to the experts being unlearned and pulls back those that left them
   (:func:`unlearn_fast.ops.router_score_anchor_loss`, which says why not the top-k gates).
   The router's input at l* does not depend on anything that trains, so it is cached per forget
   batch too and the anchor costs one [tokens, H] x [H, E] product per step.

    uoe = UOE(objective="ga", steps=20)
    result = uoe.unlearn(moe_model, forget_examples, retain_examples, tokenizer=tokenizer)
    result.model, result.target, result.attribution.table()

The caller's model is never modified unless ``inplace=True``; a loss that turns NaN or infinite
stops the run with an error naming the step, and an in-place model is restored.

Checkpoints, as SOUL's: ``unlearn(..., checkpoint_dir=d, checkpoint_every=k)`` saves, every k steps
and at the end, the trained slices of e* and the router weight of l*, the AdamW state, the step,
the random generator, the data order, the history and the target (l*, e*) with its attribution
to ``d/uoe_checkpoint.pt``, atomically (:class:`unlearn_fast.checkpoint.CheckpointedRun`). The same
call again resumes from it, with the checkpoint's target (no new attribution), and ends with
bitwise the parameters of an uninterrupted run; a checkpoint of other settings, another model (its
trained parameters' initial values) or other data is an error. Under torch.distributed rank 0
writes it and every rank reads it.

A model too large for one device: :func:`attribute_experts` runs on a model sharded with
:func:`unlearn_fast.distributed.shard_layers`; UOE then needs the target layer whole
(``shard_layers(model, skip=[l*])``, the other layers sharded) and ``inplace=True``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from unlearn_fast import checkpoint, distributed, training
from unlearn_fast.config import Config
from unlearn_fast.data import as_batches
from unlearn_fast.methods.base import UnlearnResult
from unlearn_fast.models.expert_training import train_experts
from unlearn_fast.models.moe import attribution_forward, moe_family, moe_layers, routing_spec
from unlearn_fast.models.prefix_cache import input_key, prefix_cached
from unlearn_fast.models.structure import decoder_layers
from unlearn_fast.objectives import RMU, Objective, make_objective, resolve_objective
from unlearn_fast.ops.moe_routing import expert_attribution, router_score_anchor_loss

Batch = Mapping[str, Tensor]
UOE_OBJECTIVES = ("ga", "gdiff", "npo", "rmu")  # the objectives UOE supports (refusal PO is not one of them)
CHECKPOINT_FILE = "uoe_checkpoint.pt"
TOKEN_SCOPES = ("answer", "all")


# --- attribution ------------------------------------------------------------------------------


@dataclass
class ExpertAttribution:
    """The affinity of the forget data to every routed expert, per MoE layer."""

    scores: dict[int, Tensor]  # layer -> [E] float64
    sequences: int
    tokens: int

    def ranked(self) -> list[tuple[int, int, float]]:
        """(layer, expert, score) of every routed expert, highest score first (ties: lower layer, expert)."""
        rows = [(layer, e, float(s)) for layer, scores in self.scores.items() for e, s in enumerate(scores.tolist())]
        return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))

    def top(self) -> tuple[int, int]:
        """(l*, e*): the expert with the highest affinity over all layers."""
        layer, expert, _ = self.ranked()[0]
        return layer, expert

    def top_experts(self, m: int = 1) -> tuple[int, tuple[int, ...]]:
        """(l*, the m best experts of l*, best first; ties to the lower index). All from the top-1
        expert's layer: UOE trains one layer, whose router the anchor holds and below which the
        prefix cache skips; the experts the forget data reaches there are the candidates."""
        layer, _ = self.top()
        scores = self.scores[layer].tolist()
        if not 1 <= m <= len(scores):
            raise ValueError(f"top_experts: m must lie in [1, {len(scores)}] (the experts of layer {layer}), got {m}")
        return layer, tuple(sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:m])

    def table(self, rows: int = 10) -> str:
        """The ``rows`` best experts, with each one's share of its layer's total score."""
        lines = [
            f"expert attribution over {self.sequences} sequences ({self.tokens} tokens)",
            "rank  layer  expert   score  share of layer",
        ]
        for rank, (layer, expert, score) in enumerate(self.ranked()[:rows], 1):
            share = score / max(float(self.scores[layer].sum()), 1e-300)
            lines.append(f"{rank:>4}  {layer:>5}  {expert:>6}  {score:.4f}  {share:>13.1%}")
        return "\n".join(lines)


@torch.no_grad()
def attribute_experts(
    model: torch.nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    max_length: int = 256,
    tokens: Literal["answer", "all"] = "answer",
) -> ExpertAttribution:
    """The UOE affinity score of ``data`` (examples, with ``tokenizer``, or collated batches) for
    every routed expert of every MoE layer of ``model``, over the ``tokens`` in scope (the positions
    that predict answer tokens, or all attended ones); see the module docstring."""
    if tokens not in TOKEN_SCOPES:
        raise ValueError(f"attribute_experts: tokens must be one of {TOKEN_SCOPES}, got {tokens!r}")
    model = distributed.unwrap_ddp(model)
    layers = [layer for layer, _ in moe_layers(model)]  # raises for a dense model
    specs = {layer: routing_spec(model, layer) for layer in layers}
    batches = as_batches(
        data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, what="attribution data"
    )
    if not batches:
        raise ValueError("attribute_experts: no data (an empty forget set)")
    totals = {layer: torch.zeros(_num_experts(model, block), dtype=torch.float64) for layer, block in moe_layers(model)}
    counts = torch.zeros(2, dtype=torch.float64)  # sequences, tokens
    restore_modes = _keep_modes(model)
    model.eval()
    try:
        for batch in distributed.shard(batches):  # under torch.distributed, whole batches per rank, then summed
            scope = _scoped(batch, tokens)
            lengths = scope.sum(1)
            if bool((lengths == 0).any()):
                raise ValueError(
                    f"attribute_experts: a sequence with no tokens in scope (tokens={tokens!r})"
                    + (
                        ": no scored answer label after its first position; check its labels, or pass tokens='all'"
                        if tokens == "answer"
                        else ": no attended tokens"
                    )
                )
            # Each token in scope weighs 1/L_j of its sequence; the sum over sequences is divided by Z at the end.
            weights = (1.0 / lengths.double())[:, None].expand_as(scope)[scope]
            logits = attribution_forward(model, batch["input_ids"], batch.get("attention_mask"))
            keep = scope[_attended(batch)]  # the attended tokens (the rows of logits) that are in scope
            for layer in layers:
                routing, bias = specs[layer]
                rows = logits[layer][keep.to(logits[layer].device)]
                totals[layer] += expert_attribution(rows, weights.to(rows.device), routing, bias).double().cpu()
            counts += torch.tensor([scope.shape[0], scope.sum()], dtype=torch.float64)
    finally:
        restore_modes()
    flat = distributed.global_sum(torch.cat([counts, *totals.values()]))
    sequences, tokens = int(flat[0]), int(flat[1])
    scores = dict(zip(totals, flat[2:].split([t.numel() for t in totals.values()])))
    return ExpertAttribution({layer: t / sequences for layer, t in scores.items()}, sequences, tokens)


# --- unlearning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UOEConfig(Config):
    """UOE's settings. Defaults: the paper's lr 1e-4 with Adam (Zhuang et al., 2024, arXiv 2411.18797;
    the "Reference settings" of the project's METHODS.md spec); 20 steps of batch 4 (CPU-sized; the
    paper used batch 16); anchor weight α = 1; one expert (M = 1, the paper's best).

    objective: an objective instance (``GradientAscent()``, ``GradDiff()``, ``NPO()``, ``RMU()``) or
        its name (``"ga" | "gdiff" | "npo" | "rmu"``); RMU by name reads the target layer l*.
    anchor_weight: α of the router anchor loss. lr, weight_decay, max_grad_norm: AdamW's step.
    steps, batch_size, gradient_accumulation_steps: as SOUL's.
    target: (layer, expert) to train instead of the attributed top-1 (with num_experts=1 only).
    token_scope: the forget tokens attribution and anchor read: ``"answer"`` (the positions whose
        next token is scored, labels[t+1] != -100: the outputs the objective's loss reads) or ``"all"``
        (every attended token, chat template included).
    num_experts: M, how many experts of l* train: the attributed top-1 layer's M best.
    prefix_cache: run the frozen layers below l* once per batch instead of every step.
    attribution_batch_size: sequences per attribution pass. max_length, seed: as SOUL's.
    """

    objective: Objective | str = "ga"
    anchor_weight: float = 1.0
    lr: float = 1e-4
    steps: int = 20
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    target: tuple[int, int] | None = None
    token_scope: Literal["answer", "all"] = "answer"
    num_experts: int = 1
    prefix_cache: bool = True
    attribution_batch_size: int = 16
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        try:
            if resolve_objective(self.objective).name not in UOE_OBJECTIVES:
                problems.append(
                    f"objective must be one of {UOE_OBJECTIVES} (or such an instance), got {self.objective!r}"
                )
        except (TypeError, ValueError) as error:
            problems.append(str(error))
        for name in ("lr", "anchor_weight", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            problems.append("lr must be > 0")
        for name in (
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "attribution_batch_size",
            "max_length",
            "num_experts",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0
        ):
            problems.append(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.target is not None and (len(self.target) != 2 or not all(isinstance(v, int) for v in self.target)):
            problems.append(f"target must be (layer, expert) integers or None, got {self.target!r}")
        if self.target is not None and self.num_experts != 1:
            problems.append(
                f"target names one expert but num_experts={self.num_experts!r}; leave target unset to "
                "train the attributed top-M, or set num_experts=1"
            )
        if self.token_scope not in TOKEN_SCOPES:
            problems.append(f"token_scope must be one of {TOKEN_SCOPES}, got {self.token_scope!r}")
        if problems:
            raise ValueError("UOEConfig: " + "; ".join(problems))


@dataclass
class UOEResult(UnlearnResult):
    """:class:`~unlearn_fast.methods.base.UnlearnResult` of a UOE run (``method="uoe"``), plus the
    expert it trained and why."""

    target: tuple[int, int] = (0, 0)  # (l*, e*)
    experts: tuple[int, ...] = ()  # every expert of l* that trained, e* first (M of them)
    attribution: ExpertAttribution | None = None  # None when config.target was given
    trained_parameters: int = 0  # scalars: the trained experts' slices and the router of l*

    def _extra(self) -> dict[str, Any]:
        scores = (
            None if self.attribution is None else {layer: s.tolist() for layer, s in self.attribution.scores.items()}
        )
        return {
            "target": list(self.target),
            "experts": list(self.experts),
            "trained_parameters": self.trained_parameters,
            "attribution": scores,
        }


class UOE:
    """The UOE unlearner; ``UOE(config)`` or ``UOE(**fields of UOEConfig)``."""

    def __init__(self, config: UOEConfig | None = None, **overrides: Any):
        self.config = dataclasses.replace(config or UOEConfig(), **overrides)

    def unlearn(
        self,
        model: torch.nn.Module,
        forget: Any,
        retain: Any = (),
        *,
        tokenizer: Any = None,
        inplace: bool = False,
        progress: bool = True,
        callback: training.Callback | Sequence[training.Callback] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
    ) -> UOEResult:
        """Unlearn ``forget`` from the MoE ``model`` by training one expert and its router.

        ``forget`` / ``retain``: any form :func:`unlearn_fast.data.as_batches` accepts (then
        ``tokenizer`` is needed for rows) or collated batches. ``callback(step, model, record)`` runs
        after every step; returning True stops the run there. ``checkpoint_dir``: save a checkpoint
        there every ``checkpoint_every`` steps and at the end, and resume from the one it holds
        (module docstring).
        """
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"UOE.unlearn: model must be a torch.nn.Module, got {type(model).__name__}")
        model = distributed.unwrap_ddp(model)
        checkpoint.check_every(checkpoint_every, "UOE.unlearn")
        moe_family(model)  # a dense model is an error here, before any work
        forget_batches = as_batches(
            forget, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, what="forget"
        )
        if not forget_batches:
            raise ValueError("UOE.unlearn: the forget set is empty")
        start = time.perf_counter()
        run = None
        if checkpoint_dir is not None:
            run = checkpoint.CheckpointedRun(Path(checkpoint_dir) / CHECKPOINT_FILE, cfg)
            run.check()  # the settings (target included) match before the checkpoint's target is used
        target, attribution = self._target(model, forget_batches, run)  # (l*, (e*, ...))
        objective = self._objective(target[0])
        retain_batches = (
            as_batches(retain, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, what="retain")
            if objective.needs_retain
            else []
        )
        if objective.needs_retain and not retain_batches:
            raise ValueError(f"objective {objective.name!r} needs retain data; pass retain examples or batches")
        if run is not None:
            _record_target(run, target, attribution, (forget_batches, retain_batches))
        _check_target(model, target, run, inplace)
        out = model if inplace else copy.deepcopy(model)
        callbacks = [callback] if callable(callback) else list(callback or ())
        history, trained, names = self._train(
            out, target, objective, forget_batches, retain_batches, progress, callbacks, run, checkpoint_every, inplace
        )
        metrics, elapsed = {**(history[-1] if history else {}), "steps_run": len(history)}, time.perf_counter() - start
        chosen = {"target": (target[0], target[1][0]), "experts": target[1], "attribution": attribution}
        return UOEResult("uoe", out, cfg, history, metrics, elapsed, names, **chosen, trained_parameters=trained)

    # ------------------------------------------------------------------------------------------

    def _target(self, model, forget_batches, run) -> tuple[tuple[int, tuple[int, ...]], ExpertAttribution | None]:
        """(l*, the experts to train) and the attribution that chose them: the checkpoint's, the config's, or
        attributed."""
        if run is not None and run.saved is not None:
            # The saved parameters are that expert's: a new attribution could pick another (a tie,
            # other rounding) and costs a pass. The model's fingerprint is checked in _run.
            saved = run.saved_extra
            attribution = ExpertAttribution(**saved["attribution"]) if saved["attribution"] is not None else None
            layer, experts = saved["target"]
            return (layer, tuple(experts)), attribution
        cfg = self.config
        if cfg.target is None:
            attribution = attribute_experts(
                model, forget_batches, batch_size=cfg.attribution_batch_size, tokens=cfg.token_scope
            )
            return attribution.top_experts(cfg.num_experts), attribution
        return (cfg.target[0], (cfg.target[1],)), None

    def _objective(self, layer: int) -> Objective:
        objective = self.config.objective
        if objective == "rmu":  # by name: RMU's activations at the target layer
            objective = make_objective("rmu", layer=layer)
        objective = resolve_objective(objective)
        # RMU's activations must come from a layer that runs (at or above l*) and that the trained expert moves.
        if isinstance(objective, RMU) and objective.layer < layer:
            raise ValueError(
                f"UOE with RMU: the RMU layer {objective.layer} lies below the target layer {layer}, "
                "whose expert is the only thing that trains; use layer >= l*"
            )
        return objective

    def _train(
        self,
        out,
        target,
        objective,
        forget_batches,
        retain_batches,
        progress,
        callbacks,
        run,
        checkpoint_every,
        inplace,
    ):
        """Train the target experts and their router on ``out``, restoring the router (in place) on any error."""
        layer, _ = target
        flags = {p: p.requires_grad for p in out.parameters()}
        router = getattr(dict(moe_layers(out))[layer], moe_family(out).router)
        try:  # the expert's slices are only written back on success: the router is all to restore
            with training.restore_on_error([router.weight] if inplace else []):
                for p in out.parameters():
                    p.requires_grad_(False)
                return self._run(
                    out, target, objective, forget_batches, retain_batches, progress, callbacks, run, checkpoint_every
                )
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None

    def _run(
        self, model, target, objective, forget_batches, retain_batches, progress, callbacks, run, checkpoint_every
    ):
        cfg = self.config
        layer, experts = target
        generator = torch.Generator().manual_seed(cfg.seed)
        # Under torch.distributed each rank takes every world_size-th row of each batch; losses are
        # normalised by counts over the whole batch and the gradients summed (as SOUL does).
        forget_local = training.rows_of_this_rank(forget_batches, "UOE")
        retain_local = training.rows_of_this_rank(retain_batches, "UOE")
        with ExitStack() as stack:
            stack.callback(_keep_modes(model))  # the model comes back in the modes it came in
            model.eval()  # no dropout: steps are deterministic given the seed
            trained = stack.enter_context(train_experts(model, layer, experts))
            weight = trained[0].router.weight
            params = [*(p for se in trained for p in se.parameters()), weight]
            for p in params:  # every rank starts from rank 0's values (as DDP does)
                distributed.broadcast(p.data)
            cache = stack.enter_context(
                prefix_cached(model, layer if cfg.prefix_cache else 0, [*forget_local, *retain_local])
            )
            router_inputs = _router_inputs(model, trained[0].router, forget_batches, forget_local, cfg.token_scope)
            weight.requires_grad_(True)
            objective.prepare(model, forget_local, retain_local)
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
            streams = [training.BatchStream(forget_local, generator)]
            if retain_local:
                streams.append(training.BatchStream(retain_local, generator))
            named = [
                *(
                    (f"expert{se.expert}.{name}", p)
                    for se in trained
                    for name, p in (("gate_up", se.gate_up), ("down", se.down))
                ),
                ("router", weight),
            ]
            if run is not None:
                # After objective.prepare and the caches, which belong to the model before unlearning.
                run.check(model=checkpoint.tensor_fingerprint(named))
            history = training.train_loop(
                model,
                named,
                optimizer,
                self._loss_fn(model, objective, experts, router_inputs, weight, routing_spec(model, layer)[0]),
                training.pair_streams(streams[0], streams[1] if len(streams) > 1 else None),
                name=f"UOE {objective.name} (layer {layer}, experts {list(experts)})",
                steps=cfg.steps,
                max_grad_norm=cfg.max_grad_norm,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                callbacks=[_paused(cache, c) for c in callbacks],
                checkpoint=run,
                checkpoint_every=checkpoint_every,
                generator=generator,
                streams=streams,
                progress=progress,
                hint="lower lr",
            )
            changed = {id(t) for t in (trained[0].experts.gate_up_proj, trained[0].experts.down_proj, weight)}
            names = [n for n, p in model.named_parameters() if id(p) in changed]  # the fused tensors and the router
        return history, sum(p.numel() for p in params), names

    def _loss_fn(self, model, objective, experts, router_inputs, weight, routing):
        """The step's loss: the objective plus α times the anchor on the forget batch's cached router inputs."""

        def loss_fn(item):
            forget_batch, retain_batch = item
            loss, logs = objective.loss(model, forget_batch, retain_batch)
            x, w = router_inputs[input_key(forget_batch["input_ids"], forget_batch.get("attention_mask"))]
            anchor = router_score_anchor_loss(x @ weight.T, experts, w, routing)
            return loss + self.config.anchor_weight * anchor, {
                **logs,
                "objective": loss.item(),
                "anchor": anchor.item(),
            }

        return loss_fn


def _record_target(run, target, attribution, batches) -> None:
    """Check the run's data against its checkpoint and record what a resume needs to rebuild it:
    the trained experts and the attribution that chose them."""
    run.check(data=[checkpoint.batches_fingerprint(b) for b in batches])
    scores = None
    if attribution is not None:
        scores = {"scores": attribution.scores, "sequences": attribution.sequences, "tokens": attribution.tokens}
    run.extra = {"target": [target[0], list(target[1])], "attribution": scores}


def _check_target(model: torch.nn.Module, target: tuple[int, tuple[int, ...]], run, inplace: bool) -> None:
    """An error unless every (layer, expert) of the target is a routed expert that can train in this model."""
    layer, experts = target
    blocks = dict(moe_layers(model))
    for expert in experts:
        if layer not in blocks or not 0 <= expert < _num_experts(model, blocks[layer]):
            whose = f"{run.path}'s target" if run is not None and run.saved is not None else "target"
            raise ValueError(
                f"UOE: {whose} (layer {layer}, expert {expert}) is not a routed expert; MoE layers: {sorted(blocks)}"
            )
    if distributed.check_sharded_model(model, "UOE.unlearn", inplace) and any(
        distributed.is_sharded(p) for p in decoder_layers(model)[layer].parameters()
    ):
        raise ValueError(
            f"UOE.unlearn: the target layer {layer} is FSDP-sharded, but its expert trains from whole "
            f"slices; keep it whole: unlearn_fast.distributed.shard_layers(model, skip=[{layer}]) "
            "(attribute_experts runs on any sharding and names the layer)"
        )


def _num_experts(model: torch.nn.Module, block: torch.nn.Module) -> int:
    return getattr(block, moe_family(model).experts).gate_up_proj.shape[0]


def _attended(batch: Batch) -> Tensor:
    mask = batch.get("attention_mask")
    return (mask if mask is not None else torch.ones_like(batch["input_ids"])).bool()


def _scoped(batch: Batch, tokens: str) -> Tensor:
    """[B, S] bool: the positions whose routing attribution and anchor read. ``"answer"``: the attended
    positions t whose next token is scored (labels[t + 1] != -100). A causal LM predicts token t+1 at
    position t, so these are exactly the outputs the objective's loss reads: the expert serving them
    is the one its gradient reaches (the answer tokens' own positions would drop the last prompt
    token, which predicts the first answer token, and add the last answer token, which predicts
    nothing scored). ``"all"``: every attended position."""
    attended = _attended(batch)
    if tokens == "all":
        return attended
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "UOE: the answer token scope needs batches with labels (-100 outside the answers): pass "
            "examples with a tokenizer, or token_scope='all' (attribute_experts: tokens='all')"
        )
    scored = torch.zeros_like(attended)
    scored[:, :-1] = labels[:, 1:].to(attended.device) != -100
    return attended & scored


def _keep_modes(model: torch.nn.Module):
    """A callable that gives every submodule back its train/eval mode as of now (``model.train(flag)``
    would force one mode on all of them, e.g. on a submodule the caller had in eval)."""
    modes = [(m, m.training) for m in model.modules()]

    def restore() -> None:
        for module, training_mode in modes:
            module.training = training_mode

    return restore


def _paused(cache, callback):
    """``callback`` run with the prefix cache paused: it may run the model on any data."""

    def call(step, model, record):
        with cache.paused():
            return callback(step, model, record)

    return call


def _router_inputs(
    model, router, whole: list[Batch], local: list[Batch], tokens: str
) -> dict[bytes, tuple[Tensor, Tensor]]:
    """Per forget batch (this rank's rows of it): the router's input rows of the tokens in scope
    [T, H] and their anchor weights 1/T_whole (a mean over the whole batch's tokens in scope)."""
    captured: list[Tensor] = []
    handle = router.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    out = {}
    try:
        with torch.no_grad():
            for batch, rows in zip(whole, local):
                captured.clear()
                model(input_ids=rows["input_ids"], attention_mask=rows.get("attention_mask"), use_cache=False)
                hidden = captured[-1].reshape(-1, captured[-1].shape[-1])
                x = hidden[_scoped(rows, tokens).reshape(-1).to(hidden.device)]
                count = int(_scoped(batch, tokens).sum())
                if count == 0:
                    raise ValueError(
                        f"UOE: a forget batch has no tokens in scope (token_scope={tokens!r}) for the "
                        "anchor; check its labels, or use token_scope='all'"
                    )
                out[input_key(rows["input_ids"], rows.get("attention_mask"))] = (
                    x,
                    torch.full((x.shape[0],), 1.0 / count, dtype=x.dtype, device=x.device),
                )
    finally:
        handle.remove()
    return out
