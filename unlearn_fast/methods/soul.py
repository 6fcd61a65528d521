"""SOUL: second-order unlearning with the Sophia optimizer (Jia et al., 2024).

Influence unlearning is one Newton step; SOUL makes it iterative: any unlearning objective of
:mod:`unlearn_fast.objectives` (GA, GradDiff, NPO, refusal PO, RMU), minimised with Sophia's
clipped, diagonally preconditioned update instead of AdamW. Only the parameters that require
gradients train (the LoRA adapters of a PEFT model, or the whole model).

    soul = SOUL(SOULConfig(objective=NPO(beta=0.1), lr=1e-4, steps=20))   # or SOUL(objective="npo", ...)
    result = soul.unlearn(model, forget, retain, tokenizer=tokenizer)      # rows, files, datasets, batches
    result.model, result.history, result.save("runs/soul")

The steps run in the library's one loop (:func:`unlearn_fast.training.train_loop`); a callback
returning True stops the run early.

The caller's model is never modified unless ``inplace=True``; a run whose loss or gradient
turns NaN or infinite stops with an error naming the step, and any error or interrupt leaves the
model as it was.

Checkpoints: ``unlearn(..., checkpoint_dir=d, checkpoint_every=k)`` saves, every k steps and at
the end, the trainable parameters, the optimizer state, the step, the random generator and the
data order to ``d/soul_checkpoint.pt``, atomically (:mod:`unlearn_fast.checkpoint`). Calling
``unlearn`` again with the same ``d``, model, data and settings resumes from it and ends with
bitwise the parameters of an uninterrupted run; ``steps`` may be raised to continue a finished run.

Distributed (``torchrun``; gloo on CPUs, NCCL on GPUs): when a ``torch.distributed`` process group
is initialised, every rank runs ``unlearn`` with the same model and data; each takes every
``world_size``-th row of each step's batch, the objective normalises by the counts summed over
the ranks, and the gradients (and Hessian estimates) are summed, so the run is the
single-process one up to rounding, on ``world_size`` times less compute per rank. Every batch
needs at least ``world_size`` rows. Rank 0 writes the checkpoints; every rank reads them.
A model too large for one device: shard its decoder layers first
(:func:`unlearn_fast.distributed.shard_layers`, FSDP) and pass ``inplace=True``; the sharded
parameters' gradients are summed by FSDP, and each rank checkpoints its own shards.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from unlearn_fast import checkpoint, distributed, training
from unlearn_fast.backend import use_backend
from unlearn_fast.config import Config
from unlearn_fast.data import as_batches
from unlearn_fast.distributed import local
from unlearn_fast.methods.base import UnlearnResult
from unlearn_fast.models.checks import check_finite_weights
from unlearn_fast.objectives import Objective, resolve_objective
from unlearn_fast.optim import Sophia
from unlearn_fast.optim.sophia import ESTIMATORS

Batch = Mapping[str, torch.Tensor]
OPTIMIZERS = ("sophia", "adamw", "soul_reference")
CHECKPOINT_FILE = "soul_checkpoint.pt"


@dataclass(frozen=True)
class SOULConfig(Config):
    """Settings of a SOUL run (defaults chosen on SmolLM2-135M + LoRA, see docs/RESULTS.md).

    objective: an objective instance (``GradDiff()``, ``NPO(beta=0.1)``, ``Refusal()``, ``RMU(layer=7)``
        from :mod:`unlearn_fast.objectives`) or its name (``"ga" | "gdiff" | "npo" | "po" | "rmu"``,
        default hyperparameters). A refusal objective without a tokenizer gets the run's.
    optimizer: ``"sophia"`` (SOUL), ``"adamw"`` (the first-order baseline) or
        ``"soul_reference"`` (the SOUL reference code's exact Sophia variant, empirical estimator).
    lr: learning rate. The paper uses 5e-6 / 1e-5 for full fine-tuning of LLaMA2-7B; LoRA
        adapters of a small model need larger steps.
    steps: optimizer steps; ``batch_size``: forget (and retain) examples per batch;
        ``gradient_accumulation_steps``: batches whose gradients are summed into one step.
    estimator: Sophia's diagonal Hessian estimator, ``"gnb"`` (Gauss-Newton-Bartlett, sampled
        labels), ``"hutchinson"`` (u * Hu) or ``"empirical"`` (g * g every step).
    hessian_interval: k, steps between Hessian refreshes (gnb / hutchinson).
    hessian_warmup: estimate h on the first forget/retain batch before step 1 and start from it
        (h <- ĥ, not an EMA from 0): without it the first k steps run on h = 0 (clipped sign
        momentum) and h stays at ~(1 - beta2) x its scale for a run of tens of steps.
    betas, rho: Sophia's (beta1, beta2) and clipping scale; ``hutchinson_probes``: probes per refresh.
    target_win_rate: set rho at the first step so that this share of the coordinates is not
        clipped (Sophia's authors tune rho for 0.1 to 0.5); None, the empirical estimator or no
        warm-up: use ``rho`` as given. With the
        paper's rho 0.04 the clip is active on ~99.7% of the demo's coordinates even with h
        warmed (docs/RESULTS.md): the update is then sign momentum, not a second-order step.
    weight_decay: decoupled decay. Default 0: decaying LoRA weights undoes the fine-tuning of
        the retain facts as well, which would blur the optimizer comparison.
    max_grad_norm: clip the unlearning gradient's norm (None: no clipping).
    max_length: tokens per question + answer; seed: data order and the estimators' random draws.
    stop_at_forget_prob: stop at the first evaluation whose forget answer probability is at or
        below this (``unlearn(gold_model=...)`` sets it to the retrained model's level).
    utility_floor: keep the evaluated step with the lowest forget answer probability among those
        whose retain answer probability is >= utility_floor x its initial value.
    eval_every: steps between the stopping rule's evaluations. Without a rule: ``steps`` steps.

    Sophia's ``bs`` (the tokens its loss averages over, see :mod:`unlearn_fast.optim.sophia`) is
    resolved once: a preset's own value wins (``soul_reference``: 5120); otherwise the answer
    tokens of the step's batches for ``gnb`` and ``empirical``, and 1 for ``hutchinson`` (whose
    u * (Hu) of the mean loss is already the curvature the step divides by). Every step records
    it (``bs``), with Sophia's win rate (the share of unclipped coordinates) and the lr.
    """

    objective: Objective | str = "gdiff"
    optimizer: Literal["sophia", "adamw", "soul_reference"] = "sophia"
    lr: float = 1e-4
    steps: int = 20
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    estimator: Literal["gnb", "hutchinson", "empirical"] = "gnb"
    hessian_interval: int = 10
    hessian_warmup: bool = True
    betas: tuple[float, float] = (0.965, 0.99)
    rho: float = 0.04
    target_win_rate: float | None = 0.3
    hutchinson_probes: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    seed: int = 0
    stop_at_forget_prob: float | None = None
    utility_floor: float | None = None
    eval_every: int = 1

    def __post_init__(self) -> None:
        problems = []
        try:
            resolve_objective(self.objective)
        except (TypeError, ValueError) as error:
            problems.append(str(error))
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.estimator not in ESTIMATORS:
            problems.append(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in (
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "hessian_interval",
            "hutchinson_probes",
            "max_length",
            "eval_every",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if not (self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            problems.append(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.stop_at_forget_prob is not None and not 0 <= self.stop_at_forget_prob <= 1:
            problems.append(f"stop_at_forget_prob must be in [0, 1] or None, got {self.stop_at_forget_prob!r}")
        if self.target_win_rate is not None and not 0 < self.target_win_rate < 1:
            problems.append(f"target_win_rate must be in (0, 1) or None, got {self.target_win_rate!r}")
        if self.utility_floor is not None and not 0 < self.utility_floor <= 1:
            problems.append(f"utility_floor must be in (0, 1] or None, got {self.utility_floor!r}")
        if problems:
            raise ValueError("SOULConfig: " + "; ".join(problems))


class _RunOptions(NamedTuple):
    """How a run reports and saves itself (the arguments of ``unlearn`` beside the data)."""

    progress: bool
    callbacks: list
    checkpoint_dir: str | os.PathLike | None
    checkpoint_every: int
    sharded: bool


@dataclass
class SOULResult(UnlearnResult):
    """:class:`~unlearn_fast.methods.base.UnlearnResult` of a SOUL run (``method="soul"``)."""


class SOUL:
    """The SOUL unlearner; ``SOUL(config)`` or ``SOUL(**fields of SOULConfig)``."""

    def __init__(self, config: SOULConfig | None = None, **overrides: Any):
        self.config = dataclasses.replace(config or SOULConfig(), **overrides)

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
        gold_model: torch.nn.Module | None = None,
    ) -> SOULResult:
        """Unlearn ``forget`` from ``model`` while keeping ``retain``.

        ``forget`` / ``retain``: any form :func:`unlearn_fast.data.as_batches` accepts (examples,
        pairs, dict rows, a ``datasets.Dataset``, a JSON/JSONL/CSV path; then ``tokenizer`` is
        needed) or collated batches (dicts of ``input_ids``, ``attention_mask``, ``labels``).
        ``callback(step, model, record)`` runs after every step (e.g. to evaluate); returning True
        stops the run there. ``checkpoint_dir``: save a checkpoint there every
        ``checkpoint_every`` steps and at the end, and resume from the one it holds (module docstring).
        ``gold_model``: a model retrained without the forget set; unless ``stop_at_forget_prob`` is
        set, the run stops once the forget answer probability falls to the gold model's.
        """
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"SOUL.unlearn: model must be a torch.nn.Module, got {type(model).__name__}")
        model = distributed.unwrap_ddp(model)
        checkpoint.check_every(checkpoint_every, "SOUL.unlearn")
        objective = self._objective(tokenizer)
        forget_batches, retain_all = self._batches(forget, retain, tokenizer, objective)
        retain_batches = retain_all if objective.needs_retain else []
        check_finite_weights(model, "SOUL.unlearn")

        sharded = _check_sharding(model, cfg, inplace)
        target = model if inplace else copy.deepcopy(model)
        named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("SOUL.unlearn: the model has no trainable parameters (requires_grad=False everywhere)")
        params = [p for _, p in named]
        was_training = target.training
        callbacks = [callback] if callable(callback) else list(callback or ())
        start = time.perf_counter()
        rule = self._stop_rule(params, forget_batches, retain_all, gold_model)
        options = _RunOptions(progress, callbacks + ([rule] if rule else []), checkpoint_dir, checkpoint_every, sharded)
        try:
            with training.restore_on_error(params if inplace else []), distributed.summed_gradients(target):
                initial = rule.start(target) if rule is not None else {}
                history = self._run(target, named, objective, forget_batches, retain_batches, options)
                if rule is not None:
                    rule.finish(len(history))
        finally:
            target.train(was_training)
            for p in params:
                p.grad = None
        metrics, elapsed = _final_metrics(history, initial, rule), time.perf_counter() - start
        trained = [n for n, _ in named]
        return SOULResult("soul", target, cfg, history, metrics, wall_time_s=elapsed, trained=trained)

    # ------------------------------------------------------------------------------------------

    def _batches(self, forget, retain, tokenizer, objective) -> tuple[list[Batch], list[Batch]]:
        """The forget and retain batches, and clear errors for what the run cannot do without."""
        cfg = self.config
        forget_batches, retain_batches = (
            as_batches(data, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, what=what)
            for data, what in ((forget, "forget"), (retain, "retain"))
        )
        if not forget_batches:
            raise ValueError("SOUL.unlearn: the forget set is empty; pass the examples (or batches) to unlearn")
        if objective.needs_retain and not retain_batches:
            raise ValueError(f"objective {objective.name!r} needs retain data; pass retain examples or batches")
        if cfg.utility_floor is not None and not retain_batches:
            raise ValueError("SOUL.unlearn: utility_floor is measured on the retain data; pass retain examples")
        return forget_batches, retain_batches

    def _objective(self, tokenizer: Any) -> Objective:
        objective = resolve_objective(self.config.objective, tokenizer=tokenizer)
        if getattr(objective, "tokenizer", "absent") is None:
            raise ValueError("the refusal objective 'po' needs tokenizer= to build its refusal answers")
        return objective

    def _stop_rule(self, params, forget_batches, retain_batches, gold_model) -> training.StopRule | None:
        cfg = self.config
        target = cfg.stop_at_forget_prob
        if target is None and gold_model is not None:
            target = training.answer_probability(distributed.unwrap_ddp(gold_model), forget_batches)
        if target is None and cfg.utility_floor is None:
            return None
        return training.StopRule(
            params, forget_batches, retain_batches, target=target, utility_floor=cfg.utility_floor, every=cfg.eval_every
        )

    def _optimizer(self, model, named) -> tuple[torch.optim.Optimizer, Any]:
        """The optimizer and its learning-rate schedule (None: constant)."""
        cfg = self.config
        params = [p for _, p in named]
        if cfg.optimizer == "adamw":
            # torch's foreach kernels cannot mix FSDP-sharded (DTensor) and plain tensors: two groups.
            groups = [[p for p in params if distributed.is_sharded(p) == sharded] for sharded in (True, False)]
            return torch.optim.AdamW(
                [{"params": g} for g in groups if g], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True
            ), None
        if cfg.optimizer == "soul_reference":
            # As the reference's Trainer: no decay for biases and norm weights; linear warm-up over
            # the first 10% of the steps, then linear decay to 0.
            decay = training.decayed_parameter_names(model)
            groups = [
                {"params": [p for n, p in named if n in decay]},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            optimizer = Sophia.soul_reference([g for g in groups if g["params"]], lr=cfg.lr)
            optimizer.track_win_rate = True  # every step's record carries it
            return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, training.linear_warmup_decay(cfg.steps))
        return Sophia(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            rho=cfg.rho,
            weight_decay=cfg.weight_decay,
            estimator=cfg.estimator,
            hessian_interval=cfg.hessian_interval,
            track_win_rate=True,
        ), None

    def _run(self, model, named, objective, forget_batches, retain_batches, options: _RunOptions):
        cfg = self.config
        params = [p for _, p in named]
        generator = torch.Generator().manual_seed(cfg.seed)
        model.eval()  # no dropout: unlearning steps should be deterministic given the seed
        for p in params:  # every rank starts from rank 0's parameters (as DDP does); shards are shards
            if not distributed.is_sharded(p):
                distributed.broadcast(p.data)
        forget_local = training.rows_of_this_rank(forget_batches, "SOUL")
        retain_local = training.rows_of_this_rank(retain_batches, "SOUL")
        # With the initial model, on a resume too: the objective's caches (NPO's reference
        # log-probs, RMU's activations) belong to the model before unlearning.
        objective.prepare(model, forget_local, retain_local)
        optimizer, schedule = self._optimizer(model, named)
        # (whole batch, this rank's rows): the whole one gives Sophia's bs and the sampling order.
        streams = [training.BatchStream(list(zip(forget_batches, forget_local)), generator)]
        if retain_batches:
            streams.append(training.BatchStream(list(zip(retain_batches, retain_local)), generator))
        run = None
        if options.checkpoint_dir is not None:
            run = checkpoint.CheckpointedRun(
                Path(options.checkpoint_dir) / CHECKPOINT_FILE, cfg, sharded=options.sharded
            )
            data = [checkpoint.batches_fingerprint(b) for b in (forget_batches, retain_batches)]
            run.check(model=checkpoint.tensor_fingerprint(named), data=data)

        def loss_fn(item):
            (_, forget_rows), (_, retain_rows) = item[0], item[1] or (None, None)
            return objective.loss(model, forget_rows, retain_rows)

        first = ([s.batches[0] for s in streams] + [(None, None)])[:2]
        resuming = run is not None and run.saved is not None
        optimizer_step = self._stepper(model, params, optimizer, schedule, objective, generator, first, resuming)
        return training.train_loop(
            model,
            named,
            optimizer,
            loss_fn,
            training.pair_streams(*streams, *[None] * (2 - len(streams))),
            name=f"SOUL {objective.name}/{cfg.optimizer}",
            steps=cfg.steps,
            max_grad_norm=cfg.max_grad_norm,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            optimizer_step=optimizer_step,
            callbacks=options.callbacks,
            checkpoint=run,
            checkpoint_every=options.checkpoint_every,
            generator=generator,
            streams=streams + ([schedule] if schedule else []),  # the schedule: checkpointed
            progress=options.progress,
            hint="lower lr or enable max_grad_norm",
        )

    def _stepper(self, model, params, optimizer, schedule, objective, generator, first, resuming: bool):
        """The loop's optimizer step: AdamW's, or Sophia's with its bs, rho, schedule and Hessian
        refreshes; before it, Sophia's initial h on the ``first`` (forget, retain) pair."""
        cfg = self.config
        if (
            isinstance(optimizer, Sophia)
            and cfg.hessian_warmup
            and not resuming
            and cfg.optimizer == "sophia"
            and cfg.estimator != "empirical"
        ):
            self._refresh_hessian(model, params, optimizer, objective, *first, generator, reset=True)
        bs_rule = _bs_rule(optimizer)
        # rho from the first step's gradient and h (a resume restores the rho it chose).
        # Needs h before the first step: the warmed gnb/hutchinson estimate (empirical h starts at 0).
        calibrate_rho = (
            isinstance(optimizer, Sophia)
            and cfg.optimizer == "sophia"
            and cfg.target_win_rate is not None
            and cfg.hessian_warmup
            and cfg.estimator != "empirical"
        )

        def optimizer_step(drawn):
            lr = optimizer.param_groups[0]["lr"]
            if not isinstance(optimizer, Sophia):
                optimizer.step()
                return {"lr": lr}
            bs = None if bs_rule is None else sum(bs_rule(f[0], r[0] if r else None) for f, r in drawn)
            if calibrate_rho and optimizer.param_groups[0]["step"] == 0:
                _calibrate_rho(optimizer, bs or optimizer.param_groups[0]["bs"] or 1.0, cfg.target_win_rate)
            optimizer.step(bs=bs)
            counts = training.sum_over_ranks(dict(zip(("unclipped", "all"), optimizer.win_counts.tolist())))
            if schedule is not None:
                schedule.step()
            if optimizer.hessian_due():
                forget, retain = drawn[-1]
                self._refresh_hessian(model, params, optimizer, objective, forget, retain or (None, None), generator)
            resolved = bs if bs is not None else optimizer.param_groups[0]["bs"] or 1.0
            return {
                "lr": lr,
                "bs": float(resolved),
                "rho": optimizer.param_groups[0]["rho"],
                "win_rate": counts["unclipped"] / max(counts["all"], 1),
            }

        return optimizer_step

    def _refresh_hessian(self, model, params, optimizer, objective, forget, retain, generator, reset=False):
        """Sophia's diagonal Hessian estimate on the step's data (every k steps; with ``reset``,
        the initial estimate that h starts from). ``forget`` and ``retain`` are (whole batch, this
        rank's rows) pairs; the retain pair may be (None, None)."""
        pairs = [pair for pair in (forget, retain) if pair[0] is not None]
        optimizer.zero_grad(set_to_none=True)
        if self.config.estimator == "gnb":
            # Gauss-Newton-Bartlett: the gradient of the mean CE on labels sampled from the
            # model's own predictions; its square estimates the Gauss-Newton diagonal.
            for batch, rows in pairs:
                training.sampled_label_cross_entropy(model, batch, rows, generator, 1.0 / len(pairs)).backward()
            training.sum_gradients_over_ranks(params)
            optimizer.update_hessian(reset=reset)
        else:  # hutchinson: u * (H u) of the unlearning loss itself, Rademacher u
            from unlearn_fast.hvp import hutchinson_diagonal
            from unlearn_fast.models import hvp_safe

            names = [n for n, p in model.named_parameters() if p.requires_grad]
            loss_module = _ObjectiveLoss(model, objective, forget[1], retain[1])

            def loss_fn(values: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.functional_call(loss_module, {"model." + n: v for n, v in values.items()}, ())

            # The fused kernels have first-order gradients only: second order runs on the reference
            # ops, by double backward (objectives look their caches up by the batch's token ids,
            # which torch.func's forward-mode transforms do not let them read). Every rank draws
            # the same probes; u * (H u) is linear in this rank's share of the loss: summed.
            with hvp_safe(model), use_backend("reference"):
                estimates = hutchinson_diagonal(
                    loss_fn,
                    {n: p.detach() for n, p in zip(names, params)},
                    method="double_backward",
                    num_probes=self.config.hutchinson_probes,
                    generator=generator,
                )
            optimizer.update_hessian(training.sum_tensors_over_ranks([estimates[n] for n in names]), reset=reset)
        optimizer.zero_grad(set_to_none=True)


class _ObjectiveLoss(torch.nn.Module):
    """The objective's loss on fixed batches as a module, so that ``torch.func.functional_call``
    can evaluate it at other parameter values (Hessian-vector products)."""

    def __init__(self, model, objective, forget_batch, retain_batch):
        super().__init__()
        self.model, self.objective = model, objective
        self.forget_batch, self.retain_batch = forget_batch, retain_batch

    def forward(self) -> torch.Tensor:
        return self.objective.loss(self.model, self.forget_batch, self.retain_batch)[0]


def _final_metrics(history, initial, rule) -> dict[str, Any]:
    """The last step's record, the stopping rule's verdict and what it measured before step 1."""
    metrics = {
        **(history[-1] if history else {}),
        "steps_run": len(history),
        **{f"initial_{k}": v for k, v in initial.items()},
    }
    if rule is not None:
        metrics.update(kept_step=rule.kept_step, stop_reason=rule.reason, target_forget_prob=rule.target)
    return metrics


@torch.no_grad()
def _calibrate_rho(optimizer: Sophia, bs: float, target: float, iterations: int = 100) -> None:
    """Set every group's rho so that ``target`` of the moving coordinates go unclipped at the
    first step: there m = (1 - beta1) g, and a coordinate is unclipped iff |m| / (bs h) < rho, so
    rho is that ratio's ``target`` quantile (h <= 0: always clipped). Found by bisection on the
    count below a trial rho (log scale), over every coordinate: under FSDP the counts of the
    sharded parameters are summed over the ranks (the replicated ones count once), so a sharded
    run sets the rho a single process does, up to rounding."""
    ratios, sharded = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g, h = local(p.grad).reshape(-1), local(optimizer._state_for(p)["hessian"]).reshape(-1)
            m = (1 - group["betas"][0]) * g.to(h.dtype).abs()
            moving = m > 0
            ratios.append(torch.where(h[moving] > 0, m[moving] / (bs * h[moving]).clamp(min=1e-300), torch.inf))
            sharded.append(distributed.is_sharded(p))

    def count(rho: float) -> tuple[float, float]:  # (coordinates below rho, all moving ones)
        local_counts = torch.zeros(2, 2, dtype=torch.float64)
        for ratio, split in zip(ratios, sharded):
            local_counts[int(split)] += torch.tensor([float((ratio < rho).sum()), float(ratio.numel())])
        if any(sharded):
            local_counts[1] = distributed.global_sum(local_counts[1])
        return tuple(local_counts.sum(0).tolist())

    lo, hi = -700.0, 700.0  # log(rho): far beyond any ratio of finite float64 values
    if count(math.exp(hi))[0] < target * count(math.exp(hi))[1]:  # too few finite ratios: h is 0 there
        warnings.warn(
            f"SOUL: no rho gives a win rate of {target} (h is 0 where the gradient is); rho stays "
            f"{optimizer.param_groups[0]['rho']:g}",
            stacklevel=2,
        )
        return
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below, total = count(math.exp(mid))
        lo, hi = (mid, hi) if below < target * total else (lo, mid)
    for group in optimizer.param_groups:
        group["rho"] = math.exp(hi)


def _bs_rule(optimizer: torch.optim.Optimizer):
    """How each step's Sophia bs is found (see SOULConfig): None when the groups carry it (a
    preset's value) or the estimator needs none (hutchinson), else the answer tokens."""
    if not isinstance(optimizer, Sophia):
        return None
    groups = optimizer.param_groups
    if any(g["bs"] is not None for g in groups) or all(g["estimator"] == "hutchinson" for g in groups):
        return None
    return training.answer_tokens


def _check_sharding(model: torch.nn.Module, cfg: SOULConfig, inplace: bool) -> bool:
    """Whether ``model`` has FSDP-sharded parameters, and an error for what SOUL cannot do with them."""
    sharded = distributed.check_sharded_model(model, "SOUL.unlearn", inplace)
    if sharded and cfg.estimator == "hutchinson" and cfg.optimizer == "sophia":
        raise ValueError(
            "SOUL.unlearn: estimator='hutchinson' needs double backward, which FSDP-sharded layers do "
            "not support; use estimator='gnb' (the default) or 'empirical'"
        )
    return sharded
