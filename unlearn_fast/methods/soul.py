"""SOUL: second-order unlearning with the Sophia optimizer (Jia et al., 2024).

Influence unlearning is one Newton step; SOUL makes it iterative: any unlearning objective of
:mod:`unlearn_fast.objectives` (GA, GradDiff, NPO, refusal PO, RMU), minimised with Sophia's
clipped, diagonally preconditioned update instead of AdamW. Only the parameters that require
gradients train (the LoRA adapters of a PEFT model, or the whole model).

    soul = SOUL(objective="gdiff", lr=1e-4, steps=20)
    result = soul.unlearn(model, forget_examples, retain_examples, tokenizer=tokenizer)
    result.model, result.history

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from unlearn_fast import _backend, checkpoint, distributed
from unlearn_fast.data import QAExample, QADataset, check_examples
from unlearn_fast.evaluate import _head_inputs
from unlearn_fast.models.checks import check_finite_weights
from unlearn_fast.objectives import Objective, make_objective
from unlearn_fast.ops import token_logprob_sum
from unlearn_fast.optim import Sophia

Batch = Mapping[str, torch.Tensor]
OPTIMIZERS = ("sophia", "adamw", "soul_reference")
ESTIMATORS = ("gnb", "hutchinson", "empirical")
CHECKPOINT_FILE = "soul_checkpoint.pt"


@dataclass(frozen=True)
class SOULConfig:
    """Settings of a SOUL run (defaults chosen on SmolLM2-135M + LoRA, see docs/RESULTS.md).

    objective: ``"ga" | "gdiff" | "npo" | "po" | "rmu"``; ``objective_kwargs`` its hyperparameters
        (e.g. ``{"gamma": 2.0}``; PO gets the tokenizer automatically).
    optimizer: ``"sophia"`` (SOUL), ``"adamw"`` (the first-order baseline) or
        ``"soul_reference"`` (the SOUL reference code's exact Sophia variant, empirical estimator).
    lr: learning rate. The paper uses 5e-6 / 1e-5 for full fine-tuning of LLaMA2-7B; LoRA
        adapters of a small model need larger steps.
    steps: optimizer steps; ``batch_size``: forget (and retain) examples per step.
    estimator: Sophia's diagonal Hessian estimator, ``"gnb"`` (Gauss-Newton-Bartlett, sampled
        labels), ``"hutchinson"`` (u * Hu) or ``"empirical"`` (g * g every step).
    hessian_interval: k, steps between Hessian refreshes (gnb / hutchinson).
    betas, rho: Sophia's (beta1, beta2) and clipping scale; ``hutchinson_probes``: probes per refresh.
    weight_decay: decoupled decay. Default 0: decaying LoRA weights undoes the fine-tuning of
        the retain facts as well, which would blur the optimizer comparison.
    max_grad_norm: clip the unlearning gradient's norm (None: no clipping).
    seed: data order and the estimators' random draws.
    """

    objective: str = "gdiff"
    objective_kwargs: Mapping[str, Any] = field(default_factory=dict)
    optimizer: Literal["sophia", "adamw", "soul_reference"] = "sophia"
    lr: float = 1e-4
    steps: int = 20
    batch_size: int = 4
    estimator: Literal["gnb", "hutchinson", "empirical"] = "gnb"
    hessian_interval: int = 10
    betas: tuple[float, float] = (0.965, 0.99)
    rho: float = 0.04
    hutchinson_probes: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.estimator not in ESTIMATORS:
            problems.append(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("steps", "batch_size", "hessian_interval", "hutchinson_probes", "max_length"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if not (self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            problems.append(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if problems:
            raise ValueError("SOULConfig: " + "; ".join(problems))


@dataclass
class SOULResult:
    model: torch.nn.Module  # the unlearned model (a copy unless inplace=True)
    history: list[dict[str, float]]  # one entry per step: loss, its terms, grad norm, time
    wall_time_s: float = 0.0


class SOUL:
    """The SOUL unlearner; ``SOUL(config)`` or ``SOUL(**fields of SOULConfig)``."""

    def __init__(self, config: SOULConfig | None = None, **overrides: Any):
        self.config = dataclasses.replace(config or SOULConfig(), **overrides)

    def unlearn(
        self,
        model: torch.nn.Module,
        forget: Sequence[QAExample] | Sequence[Batch],
        retain: Sequence[QAExample] | Sequence[Batch] = (),
        *,
        tokenizer: Any = None,
        inplace: bool = False,
        progress: bool = True,
        callback: Callable[[int, torch.nn.Module, dict[str, float]], None] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
    ) -> SOULResult:
        """Unlearn ``forget`` from ``model`` while keeping ``retain``.

        ``forget`` / ``retain``: question/answer examples (then ``tokenizer`` is needed) or
        collated batches (dicts of ``input_ids``, ``attention_mask``, ``labels``).
        ``callback(step, model, record)`` runs after every step (e.g. to evaluate).
        ``checkpoint_dir``: save a checkpoint there every ``checkpoint_every`` steps and at the end,
        and resume from the one it holds, if any (module docstring).
        """
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"SOUL.unlearn: model must be a torch.nn.Module, got {type(model).__name__}")
        model = distributed.unwrap_ddp(model)
        checkpoint.check_every(checkpoint_every, "SOUL.unlearn")
        objective = self._objective(tokenizer)
        forget_batches = _as_batches(forget, tokenizer, cfg, "forget")
        if not forget_batches:
            raise ValueError("SOUL.unlearn: the forget set is empty; pass the examples (or batches) to unlearn")
        retain_batches = _as_batches(retain, tokenizer, cfg, "retain") if objective.needs_retain else []
        if objective.needs_retain and not retain_batches:
            raise ValueError(f"objective {cfg.objective!r} needs retain data; pass retain examples or batches")
        check_finite_weights(model, "SOUL.unlearn")

        sharded = _check_sharding(model, cfg, inplace)
        target = model if inplace else copy.deepcopy(model)
        named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("SOUL.unlearn: the model has no trainable parameters (requires_grad=False everywhere)")
        params = [p for _, p in named]
        snapshot = [p.detach().clone() for p in params] if inplace else None
        was_training = target.training
        start = time.perf_counter()
        try:
            with distributed.summed_gradients(target):
                history = self._run(target, named, objective, forget_batches, retain_batches, progress, callback,
                                    checkpoint_dir, checkpoint_every, sharded)
        except BaseException:
            if snapshot is not None:  # never leave the user's model half-unlearned (an interrupt included)
                with torch.no_grad():
                    for p, saved in zip(params, snapshot):
                        p.copy_(saved)
            raise
        finally:
            target.train(was_training)
            for p in params:
                p.grad = None
        return SOULResult(target, history, time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------

    def _objective(self, tokenizer: Any) -> Objective:
        kwargs = dict(self.config.objective_kwargs)
        if self.config.objective == "po":
            if tokenizer is None:
                raise ValueError("the refusal objective 'po' needs tokenizer= to build its refusal answers")
            kwargs.setdefault("tokenizer", tokenizer)
        return make_objective(self.config.objective, **kwargs)

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adamw":
            # torch's foreach kernels cannot mix FSDP-sharded (DTensor) and plain tensors: two groups.
            groups = [[p for p in params if distributed.is_sharded(p) == sharded] for sharded in (True, False)]
            return torch.optim.AdamW([{"params": g} for g in groups if g], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     foreach=True)
        if cfg.optimizer == "soul_reference":
            return Sophia.soul_reference(params, lr=cfg.lr)
        return Sophia(params, lr=cfg.lr, betas=cfg.betas, rho=cfg.rho, weight_decay=cfg.weight_decay,
                      estimator=cfg.estimator, hessian_interval=cfg.hessian_interval)

    def _run(self, model, named, objective, forget_batches, retain_batches, progress, callback,
             checkpoint_dir, checkpoint_every, sharded):
        cfg = self.config
        params = [p for _, p in named]
        generator = torch.Generator().manual_seed(cfg.seed)
        model.eval()  # no dropout: unlearning steps should be deterministic given the seed
        for p in params:  # every rank starts from rank 0's parameters (as DDP does); shards are shards
            if not distributed.is_sharded(p):
                distributed.broadcast(p.data)
        forget_local, retain_local = _rows_of_this_rank(forget_batches), _rows_of_this_rank(retain_batches)
        # With the initial model, on a resume too: the objective's caches (NPO's reference
        # log-probs, RMU's activations) belong to the model before unlearning.
        objective.prepare(model, forget_local, retain_local)
        optimizer = self._optimizer(params)
        sophia = isinstance(optimizer, Sophia)
        # (whole batch, this rank's rows): the whole one gives Sophia's bs and the sampling order.
        forget_stream = _Cycle(list(zip(forget_batches, forget_local)), generator)
        retain_stream = _Cycle(list(zip(retain_batches, retain_local)), generator) if retain_batches else None
        history: list[dict[str, float]] = []
        run = None
        done = 0
        if checkpoint_dir is not None:
            run = checkpoint.CheckpointedRun(Path(checkpoint_dir) / CHECKPOINT_FILE, cfg, sharded=sharded)
            run.check(model=checkpoint.tensor_fingerprint(named),
                      data=[checkpoint.batches_fingerprint(b) for b in (forget_batches, retain_batches)])
            done = run.resume(named, optimizer, generator, [s for s in (forget_stream, retain_stream) if s is not None],
                              history)
        steps = range(done + 1, cfg.steps + 1)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(steps, desc=f"SOUL {cfg.objective}/{cfg.optimizer}", leave=False, initial=done, total=cfg.steps)
            steps = bar
        for step in steps:
            forget_batch, forget_rows = next(forget_stream)
            retain_batch, retain_rows = next(retain_stream) if retain_stream is not None else (None, None)
            optimizer.zero_grad(set_to_none=True)
            loss, logs = objective.loss(model, forget_rows, retain_rows)
            # Each rank's loss and terms are its share of the batch's; the loss as differentiated.
            logs = _sum_over_ranks({**logs, "loss": loss.item()})
            if not math.isfinite(logs["loss"]):  # the same verdict on every rank
                raise FloatingPointError(
                    f"SOUL diverged: the {cfg.objective} loss is {logs['loss']} at step {step}; "
                    "lower lr or enable max_grad_norm. The model was left as it was.")
            loss.backward()
            _sum_gradients_over_ranks(params)
            grad_norm = _clip(params, cfg.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise FloatingPointError(
                    f"SOUL diverged: the gradient norm is {grad_norm} at step {step} (the loss, {logs['loss']:.4g}, "
                    "is finite); lower lr or use float32. The model was left as it was.")
            if sophia:
                optimizer.step(bs=_tokens(forget_batch, retain_batch))
                if optimizer.hessian_due():
                    self._refresh_hessian(model, params, optimizer, objective, (forget_batch, forget_rows),
                                          (retain_batch, retain_rows), generator)
            else:
                optimizer.step()
            record = {"step": step, "grad_norm": grad_norm, **logs, "time_s": time.perf_counter()}
            history.append(record)
            if run is not None and (step % checkpoint_every == 0 or step == cfg.steps):
                run.save(step, history)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if callback is not None:
                callback(step, model, record)
        return history

    def _refresh_hessian(self, model, params, optimizer, objective, forget, retain, generator):
        """Sophia's diagonal Hessian estimate on the step's data (every k steps). ``forget`` and
        ``retain`` are (whole batch, this rank's rows) pairs; the retain pair may be (None, None)."""
        pairs = [pair for pair in (forget, retain) if pair[0] is not None]
        optimizer.zero_grad(set_to_none=True)
        if self.config.estimator == "gnb":
            # Gauss-Newton-Bartlett: the gradient of the mean CE on labels sampled from the
            # model's own predictions; its square estimates the Gauss-Newton diagonal.
            for batch, rows in pairs:
                _sampled_label_ce(model, batch, rows, generator, 1.0 / len(pairs)).backward()
            _sum_gradients_over_ranks(params)
            optimizer.update_hessian()
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
            with hvp_safe(model), _backend.use_backend("reference"):
                estimates = hutchinson_diagonal(
                    loss_fn, {n: p.detach() for n, p in zip(names, params)}, method="double_backward",
                    num_probes=self.config.hutchinson_probes, generator=generator)
            optimizer.update_hessian(_sum_over_ranks_flat([estimates[n] for n in names]))
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


def _sampled_label_ce(model: torch.nn.Module, batch: Batch, rows: Batch, generator: torch.Generator,
                      weight: float) -> torch.Tensor:
    """Mean cross-entropy on answer tokens resampled from the model's softmax (Sophia-G), over
    this rank's ``rows`` of ``batch``.

    Sampling by inverse CDF from one uniform per answer token of the *whole* batch, in its order:
    every rank draws all of them and takes those of its rows, so the labels do not depend on how
    the batch is split (one process samples exactly what several do).
    """
    scored = batch["labels"][:, 1:] != -100
    total = max(int(scored.sum()), 1)
    uniforms = torch.rand(int(scored.sum()), generator=generator, dtype=torch.float64)
    rank, world_size = distributed.rank_and_world_size()
    token_ids = torch.zeros(scored.shape, dtype=torch.long)
    token_ids[scored.cpu()] = torch.arange(int(scored.sum()))
    mine = token_ids[rank::world_size][scored[rank::world_size].cpu()]  # row-major, as _head_inputs
    x = _head_inputs(model, rows)
    with torch.no_grad():
        # Only the answer positions' logits: [answer tokens, V] is small next to [B, S, V].
        logits = torch.nn.functional.linear(x.hidden, x.weight, x.bias).double()
        cdf = torch.softmax(logits, -1).cumsum(-1)
        sampled = torch.searchsorted(cdf, uniforms[mine].to(cdf.device).unsqueeze(1), right=True).squeeze(1)
        sampled = sampled.clamp_(max=logits.shape[-1] - 1)  # a uniform above a rounded-down cdf[-1]
    weights = torch.full(sampled.shape, -weight / total, dtype=torch.float64, device=x.hidden.device)
    return token_logprob_sum(x.hidden, x.weight, sampled, weights, x.bias).total


def _rows_of_this_rank(batches: list[Batch]) -> list[Batch]:
    """Every ``world_size``-th row of each batch, from this rank's (all rows in one process)."""
    rank, world_size = distributed.rank_and_world_size()
    if world_size == 1:
        return batches
    small = [len(b["input_ids"]) for b in batches if len(b["input_ids"]) < world_size]
    if small:
        raise ValueError(f"SOUL under torch.distributed: a batch of {small[0]} rows cannot be split across "
                         f"{world_size} ranks; use batch_size >= {world_size} (rows per batch)")
    return [{k: v[rank::world_size] if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def _sum_over_ranks(logs: dict[str, float]) -> dict[str, float]:
    """Each rank's loss terms summed over the ranks (one all-reduce); ``logs`` without a group."""
    if not distributed.is_distributed():
        return logs
    total = distributed.global_sum(torch.tensor(list(logs.values()), dtype=torch.float64))
    return dict(zip(logs, total.tolist()))


def _sum_over_ranks_flat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors summed over the ranks, in one all-reduce of a flat buffer."""
    if not distributed.is_distributed() or not tensors:
        return tensors
    flat = distributed.global_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _sum_gradients_over_ranks(params: list[torch.nn.Parameter]) -> None:
    """p.grad <- the sum over the ranks of p.grad (every rank has the same parameters with gradients);
    FSDP has already summed (reduce-scattered) the gradients of sharded parameters."""
    with_grad = [p for p in params if p.grad is not None and not distributed.is_sharded(p)]
    for p, total in zip(with_grad, _sum_over_ranks_flat([p.grad for p in with_grad])):
        p.grad = total


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(distributed.is_sharded(p) for p in grads):  # the norm of all shards, as torch would clip
        norm = distributed.global_norm([p.grad for p in grads])
        if max_norm is not None and math.isfinite(norm):
            torch._foreach_mul_([distributed.local(p.grad) for p in grads], min(max_norm / (norm + 1e-6), 1.0))
        return norm
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _check_sharding(model: torch.nn.Module, cfg: SOULConfig, inplace: bool) -> bool:
    """Whether ``model`` has FSDP-sharded parameters, and an error for what SOUL cannot do with them."""
    sharded = distributed.check_sharded_model(model, "SOUL.unlearn", inplace)
    if sharded and cfg.estimator == "hutchinson" and cfg.optimizer == "sophia":
        raise ValueError("SOUL.unlearn: estimator='hutchinson' needs double backward, which FSDP-sharded layers do "
                         "not support; use estimator='gnb' (the default) or 'empirical'")
    return sharded


def _tokens(*batches: Batch | None) -> int:
    """Answer tokens of the step (Sophia's bs)."""
    return max(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches if b is not None), 1)


def _as_batches(data, tokenizer, cfg: SOULConfig, what: str) -> list[Batch]:
    if isinstance(data, (str, bytes, Mapping)):
        raise TypeError(f"{what} must be a list of examples or of batches, got a {type(data).__name__}")
    data = list(data)
    if not data:
        return []
    kinds = {isinstance(d, Mapping) for d in data}
    if kinds == {True}:
        for d in data:
            if "input_ids" not in d or "labels" not in d:
                raise ValueError(f"{what} batches need 'input_ids' and 'labels' (from unlearn_fast.data.collate)")
            if d["input_ids"].shape != d["labels"].shape:
                raise ValueError(f"{what} batch: input_ids {tuple(d['input_ids'].shape)} and labels "
                                 f"{tuple(d['labels'].shape)} must have one shape [batch, sequence]")
        return data
    if len(kinds) > 1:
        raise TypeError(f"{what} mixes collated batches (dicts) and question/answer examples; pass one kind")
    data = check_examples(data, what)
    if tokenizer is None:
        raise ValueError(f"{what} holds question/answer examples: pass tokenizer= to encode them")
    dataset = QADataset(tokenizer, data, max_length=cfg.max_length)
    order = list(range(len(dataset)))
    return [dataset.collate([dataset[i] for i in order[s:s + cfg.batch_size]])
            for s in range(0, len(order), cfg.batch_size)]


class _Cycle:
    """Endless passes over the batches, each pass in a new order drawn from ``generator``; its
    position is part of a checkpoint."""

    def __init__(self, batches: list[Batch], generator: torch.Generator):
        self.batches, self.generator = batches, generator
        self.order: list[int] = []
        self.position = 0

    def __next__(self) -> Batch:
        if self.position == len(self.order):
            self.order = torch.randperm(len(self.batches), generator=self.generator).tolist()
            self.position = 0
        self.position += 1
        return self.batches[self.order[self.position - 1]]

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order, self.position = [int(i) for i in state["order"]], int(state["position"])
