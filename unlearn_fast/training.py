"""The one training loop of the library: SOUL, UOE and fine-tuning run :func:`train_loop`.

A step draws ``gradient_accumulation_steps`` items from an iterator (a forget/retain pair of
batches for unlearning, a batch of training examples for fine-tuning), sums the gradients of
``loss_fn(item)`` over them (each scaled by 1/k), sums the gradients over the ranks of a
``torch.distributed`` group, clips them, and calls the optimizer step. It stops after ``steps``
steps, or earlier when a callback returns ``True`` (a stopping rule). Every step appends a record
(step, loss and its terms, gradient norm, seconds since the start) to the history, shows it on a
progress bar, hands it to the callbacks and, every ``checkpoint_every`` steps, to a
:class:`~unlearn_fast.checkpoint.CheckpointedRun`, from which the same call resumes bitwise.

A NaN or infinite loss or gradient norm stops the run with a ``FloatingPointError`` naming the
step; the methods restore the caller's model on any error.

Also here, shared by the methods: :class:`BatchStream` (endless reshuffled passes over batches,
checkpointable), :func:`pair_streams` (a forget batch with a retain batch each step), the
per-rank row split and sums of data-parallel runs, gradient clipping over sharded parameters,
and :func:`sampled_label_cross_entropy` (the loss whose gradient Sophia-G squares).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from unlearn_fast import distributed
from unlearn_fast.data import IGNORE_INDEX
from unlearn_fast.models.causal_lm import head_inputs
from unlearn_fast.ops import token_logprob_sum
from unlearn_fast.ops.token_logprobs import sample_labels

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
T = TypeVar("T")
# callback(step, model, record) -> True to stop the run after this step.
Callback = Callable[[int, torch.nn.Module, dict[str, float]], "bool | None"]


def train_loop(
    model: torch.nn.Module,
    named_params: Sequence[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[T], tuple[torch.Tensor, dict[str, float]]],
    items: Iterator[T],
    *,
    name: str,
    steps: int,
    max_grad_norm: float | None,
    gradient_accumulation_steps: int = 1,
    optimizer_step: Callable[[list[T]], dict[str, float] | None] | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint: Any = None,
    checkpoint_every: int = 10,
    generator: torch.Generator | None = None,
    streams: Sequence[Any] = (),
    progress: bool = True,
    where: Callable[[int], str] = lambda step: "",
    hint: str = "lower lr or enable max_grad_norm",
) -> list[dict[str, float]]:
    """Run up to ``steps`` optimizer steps and return the history (module docstring).

    ``optimizer_step(items)``: the update after the gradients are ready (default
    ``optimizer.step()``); SOUL passes Sophia's token count and refreshes its Hessian there. It may
    return metrics of the step (Sophia's win rate, the learning rate) for the record.
    ``checkpoint``: a :class:`~unlearn_fast.checkpoint.CheckpointedRun` already checked against
    the run; it saves ``named_params``, the optimizer, ``generator`` and the ``streams``' positions
    (any objects with ``state_dict`` / ``load_state_dict``: data streams, an lr schedule).
    ``where(step)`` adds context to a divergence message (e.g. the epoch); ``hint`` says what to do.
    """
    params = [p for _, p in named_params]
    history: list[dict[str, float]] = []
    done = 0
    if checkpoint is not None:
        done = checkpoint.resume(named_params, optimizer, generator or torch.Generator(), streams, history)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=done, desc=name, leave=False)
    start = time.perf_counter()
    try:
        for step in range(done + 1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            drawn = [next(items) for _ in range(gradient_accumulation_steps)]
            logs = _accumulate(loss_fn, drawn, name, step, where, hint)
            sum_gradients_over_ranks(params)
            grad_norm = clip_gradients(params, max_grad_norm)
            if not math.isfinite(grad_norm):
                raise FloatingPointError(
                    f"{name} diverged: the gradient norm is {grad_norm} at step {step}{where(step)} (the loss, "
                    f"{logs['loss']:.4g}, is finite); {hint}. The model was left as it was."
                )
            extra = optimizer.step() if optimizer_step is None else optimizer_step(drawn)
            record = {
                "step": step,
                "grad_norm": grad_norm,
                **logs,
                **(extra or {}),
                "time_s": time.perf_counter() - start,
            }
            history.append(record)
            if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
                checkpoint.save(step, history)
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if any([callback(step, model, record) for callback in callbacks]):  # every callback sees every step
                logger.info("%s: a callback stopped the run after step %d", name, step)
                break
    finally:
        if bar is not None:
            bar.close()
    return history


@contextmanager
def restore_on_error(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """On any error or interrupt inside the block, copy the ``tensors`` back to their values at
    its start: a method training the caller's model in place never leaves it half-unlearned."""
    snapshot = [t.detach().clone() for t in tensors]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, saved in zip(tensors, snapshot):
                t.copy_(saved)
        raise


def _accumulate(loss_fn, drawn, name: str, step: int, where, hint: str) -> dict[str, float]:
    """Backward of each item's loss / k; the logs averaged over the k items and summed over ranks."""
    totals: dict[str, float] = {}
    for item in drawn:
        loss, logs = loss_fn(item)
        # Each rank's loss and terms are its share of the batch's; the loss as differentiated.
        logs = sum_over_ranks({**logs, "loss": loss.item()})
        if not math.isfinite(logs["loss"]):  # the same verdict on every rank
            raise FloatingPointError(
                f"{name} diverged: the loss is {logs['loss']} at step {step}{where(step)}; "
                f"{hint}. The model was left as it was."
            )
        (loss / len(drawn) if len(drawn) > 1 else loss).backward()
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + value / len(drawn)
    return totals


# --- data order ---------------------------------------------------------------------------------


class BatchStream:
    """Endless passes over ``batches``, each pass in a new order drawn from ``generator``; its
    position is part of a checkpoint (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, batches: Sequence[T], generator: torch.Generator):
        self.batches, self.generator = list(batches), generator
        self.order: list[int] = []
        self.position = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> T:
        if self.position == len(self.order):
            self.order = torch.randperm(len(self.batches), generator=self.generator).tolist()
            self.position = 0
        self.position += 1
        return self.batches[self.order[self.position - 1]]

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order, self.position = [int(i) for i in state["order"]], int(state["position"])


def pair_streams(forget: BatchStream, retain: BatchStream | None) -> Iterator[tuple[Any, Any]]:
    """(forget item, retain item or None) every step: the unlearning loop's items."""
    while True:
        yield next(forget), (next(retain) if retain is not None else None)


# --- data-parallel helpers ----------------------------------------------------------------------


def rows_of_this_rank(batches: list[Batch], who: str) -> list[Batch]:
    """Every ``world_size``-th row of each batch, from this rank's (all rows in one process)."""
    rank, world_size = distributed.rank_and_world_size()
    if world_size == 1:
        return batches
    small = [len(b["input_ids"]) for b in batches if len(b["input_ids"]) < world_size]
    if small:
        raise ValueError(
            f"{who} under torch.distributed: a batch of {small[0]} rows cannot be split across "
            f"{world_size} ranks; use batch_size >= {world_size} (rows per batch)"
        )
    return [{k: v[rank::world_size] if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def sum_over_ranks(logs: dict[str, float]) -> dict[str, float]:
    """Each rank's loss terms summed over the ranks (one all-reduce); ``logs`` without a group."""
    if not distributed.is_distributed():
        return logs
    total = distributed.global_sum(torch.tensor(list(logs.values()), dtype=torch.float64))
    return dict(zip(logs, total.tolist()))


def sum_tensors_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors summed over the ranks, in one all-reduce of a flat buffer."""
    if not distributed.is_distributed() or not tensors:
        return tensors
    flat = distributed.global_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def sum_gradients_over_ranks(params: Sequence[torch.Tensor]) -> None:
    """p.grad <- the sum over the ranks of p.grad (every rank has the same parameters with gradients);
    FSDP has already summed (reduce-scattered) the gradients of sharded parameters."""
    with_grad = [p for p in params if p.grad is not None and not distributed.is_sharded(p)]
    for p, total in zip(with_grad, sum_tensors_over_ranks([p.grad for p in with_grad])):
        p.grad = total


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float | None) -> float:
    """Clip the gradients' global norm to ``max_norm`` (None: only measure it); returns the norm before."""
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


# --- losses the loop's users share --------------------------------------------------------------


def answer_tokens(*batches: Batch | None) -> int:
    """Scored answer tokens of the batches (label t is predicted at position t-1); at least 1."""
    return max(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches if b is not None), 1)


def sampled_label_cross_entropy(
    model: torch.nn.Module, batch: Batch, rows: Batch, generator: torch.Generator, weight: float = 1.0
) -> torch.Tensor:
    """``weight`` x the mean cross-entropy on answer tokens resampled from the model's softmax,
    over this rank's ``rows`` of ``batch`` (``rows = batch`` in one process). The square of its
    gradient estimates the Gauss-Newton diagonal (Sophia-G's Gauss-Newton-Bartlett estimator).

    Sampling by inverse CDF from one uniform per answer token of the *whole* batch, in its order:
    every rank draws all of them and takes those of its rows, so the labels do not depend on how
    the batch is split (one process samples exactly what several do).
    """
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    total = max(int(scored.sum()), 1)
    uniforms = torch.rand(int(scored.sum()), generator=generator, dtype=torch.float64)
    rank, world_size = distributed.rank_and_world_size()
    token_ids = torch.zeros(scored.shape, dtype=torch.long)
    token_ids[scored.cpu()] = torch.arange(int(scored.sum()))
    mine = token_ids[rank::world_size][scored[rank::world_size].cpu()]  # row-major, as head_inputs
    x = head_inputs(model, rows)
    with torch.no_grad():  # the answer positions only, in row chunks: never [tokens, V] in float64
        sampled = sample_labels(
            x.hidden.detach(), x.weight.detach(), None if x.bias is None else x.bias.detach(), uniforms[mine]
        )
    weights = torch.full(sampled.shape, -weight / total, dtype=torch.float64, device=x.hidden.device)
    return token_logprob_sum(x.hidden, x.weight, sampled, weights, x.bias).total


# --- stopping rules ----------------------------------------------------------------------------


@torch.no_grad()
def answer_probability(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """TOFU's answer probability of collated batches: the mean over sequences of exp(mean log p)
    over each one's answer tokens (sequences without answer tokens are skipped)."""
    from unlearn_fast.evaluate import sequence_logprobs

    was_training = model.training
    model.eval()
    try:
        probs = []
        for batch in batches:
            scores = sequence_logprobs(model, batch)
            scored = scores.n_tokens > 0
            probs.append(torch.exp(scores.sum_logp[scored] / scores.n_tokens[scored]).double().cpu())
    finally:
        model.train(was_training)
    return float(torch.cat(probs).mean()) if probs else math.nan


class StopRule:
    """A callback that evaluates the forget (and retain) answer probability every ``every`` steps
    and decides when to stop and which step to keep:

    * ``target``: stop at the first evaluation at or below it (e.g. the forget answer probability
      of a model retrained without the forget set: unlearn as far as retraining would, no further);
    * ``utility_floor``: keep the evaluated step with the lowest forget probability among those
      whose retain probability is at least ``utility_floor`` x its initial value; the run goes on
      to its last step and :meth:`finish` puts the kept step's parameters back.

    :attr:`kept_step` and :attr:`reason` say what was kept and why (step 0: the model as given).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        forget: Sequence[Batch],
        retain: Sequence[Batch],
        *,
        target: float | None,
        utility_floor: float | None,
        every: int,
    ):
        self.params, self.forget, self.retain = list(params), list(forget), list(retain)
        self.target, self.utility_floor, self.every = target, utility_floor, every
        self.kept_step, self.reason, self.stopped = 0, "no evaluation yet", False
        self.initial: dict[str, float] = {}
        self._best: tuple[float, list[torch.Tensor]] | None = None

    def start(self, model: torch.nn.Module) -> dict[str, float]:
        """Evaluate the model before the first step (the floor is relative to it)."""
        self.initial = self._evaluate(model)
        self._best = (self.initial["forget_prob"], [p.detach().clone() for p in self.params])
        return self.initial

    def _evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        out = {"forget_prob": answer_probability(model, self.forget)}
        if self.utility_floor is not None:
            out["retain_prob"] = answer_probability(model, self.retain)
        return out

    def __call__(self, step: int, model: torch.nn.Module, record: dict[str, float]) -> bool:
        if step % self.every:
            return False
        values = self._evaluate(model)
        record.update(values)
        forget = values["forget_prob"]
        if self.target is not None and forget <= self.target:
            self.kept_step, self.reason = step, f"forget answer probability {forget:.4g} <= target {self.target:.4g}"
            self._best = None
            self.stopped = True
            return True
        if self.utility_floor is not None:
            floor = self.utility_floor * self.initial["retain_prob"]
            if values["retain_prob"] >= floor and forget < self._best[0]:
                self._best = (forget, [p.detach().clone() for p in self.params])
                self.kept_step = step
                self.reason = (
                    f"lowest forget answer probability ({forget:.4g}) with the retain answer probability "
                    f"above {self.utility_floor:g} x its initial {self.initial['retain_prob']:.4g}"
                )
        return False

    def finish(self, last_step: int) -> None:
        """After the run: put the kept step's parameters back (utility floor), or record that the
        target was never reached (the last step is kept)."""
        if self.stopped:
            return
        if self.utility_floor is None:
            self.kept_step = last_step
            self.reason = f"the forget answer probability stayed above the target {self.target:.4g}: the last step"
            return
        if self._best is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, self._best[1]):
                    p.copy_(saved)
            if self.kept_step == 0:
                self.reason = "no step kept the retain answer probability above the floor: the model as given"


# --- optimizer settings -------------------------------------------------------------------------


def decayed_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that weight decay applies to, as Hugging Face's Trainer groups them:
    every one but biases and the weights of normalisation layers (LayerNorm, RMSNorm, ...)."""
    skipped = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for name, _ in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or name.endswith(".bias"):
                skipped.add(f"{module_name}.{name}" if module_name else name)
    return {name for name, _ in model.named_parameters()} - skipped


def linear_warmup_decay(total_steps: int, warmup_ratio: float = 0.1) -> Callable[[int], float]:
    """The lr factor of Hugging Face's linear schedule with ``ceil(warmup_ratio x total_steps)``
    warm-up steps: 0 -> 1 over the warm-up, then linearly to 0 at ``total_steps`` (the factor
    of the k-th step is f(k - 1): the first step of a warm-up runs at lr 0, as there)."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor
