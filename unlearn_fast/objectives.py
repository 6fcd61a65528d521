"""Unlearning objectives shared by SOUL and UOE: GA, GradDiff, NPO, PO (refusal) and RMU.

Protocol (:class:`Objective`): an objective is built with its hyperparameters, then

* ``prepare(model, forget_batches, retain_batches)`` once, with the *initial* model, before any
  update: it caches what the loss compares against (NPO's reference log-probs, RMU's frozen
  retain activations and its random direction), so no second copy of the model is kept;
* ``loss(model, forget_batch, retain_batch) -> (loss, logs)`` every step: a differentiable scalar
  to minimise and a dict of floats (its terms) for logging. ``retain_batch`` may be ``None`` when
  ``needs_retain`` is false (GA, or a retain weight of 0, which also skips the retain forward).

Batches are dicts from :func:`~unlearn_fast.data.collate`: ``input_ids``, ``attention_mask`` and
``labels`` [B, S] with -100 on the prompt and padding.

Batch identity: caches are kept per *sequence*, keyed by a hash of its attended ``input_ids`` and
``labels`` (:func:`sequence_keys`). Batches may therefore be reshuffled, regrouped or padded
differently between ``prepare`` and ``loss`` (a new data order every epoch); a sequence that
``prepare`` never saw is an error, never a silent recomputation with the current model.

Every likelihood goes through the fused LM-head op (linear terms through
:func:`~unlearn_fast.models.causal_lm.labelled_logprob_sum`, NPO's log-ratio through
:func:`~unlearn_fast.models.causal_lm.sequence_logprobs`), so the [tokens, vocab] logits are never held;
RMU never reaches the LM head at all.

Cross-entropy CE(D) is the mean of -log p over all answer tokens of the batch (token-level, as
the Hugging Face loss that TOFU and SOUL train with).

Under ``torch.distributed`` (a process group of several ranks) a batch is the union of the
ranks' shards: every mean divides by the count summed over the ranks
(:func:`unlearn_fast.distributed.global_sum`), so each rank's loss (and its logged terms) is its
share of the whole batch's, and the sum over the ranks of their gradients is the gradient of the
whole batch's loss, as a single process computes it. The trainer sums the gradients (SOUL does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from unlearn_fast import distributed
from unlearn_fast.data import IGNORE_INDEX, collate, encode_qa, pad_token_id_of
from unlearn_fast.models.causal_lm import decoder_hidden, eval_mode, labelled_logprob_sum, sequence_logprobs
from unlearn_fast.models.structure import decoder_layers

Batch = Mapping[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, dict[str, float]]


@runtime_checkable
class Objective(Protocol):
    """What a trainer (SOUL, UOE) needs of an unlearning objective; see the module docstring."""

    name: ClassVar[str]

    @property
    def needs_retain(self) -> bool:
        """Whether :meth:`loss` uses its retain batch (the trainer may skip loading D_r if not)."""
        ...

    def prepare(
        self, model: torch.nn.Module, forget_batches: Iterable[Batch], retain_batches: Iterable[Batch] = ()
    ) -> None: ...

    def loss(self, model: torch.nn.Module, forget_batch: Batch, retain_batch: Batch | None = None) -> LossOutput: ...


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _token_mask(batch: Batch) -> torch.Tensor:
    """[B, S] bool: the attended tokens (all of them without an attention mask)."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def sequence_keys(batch: Batch) -> list[bytes]:
    """One cache key per row: a 16-byte hash of its attended input ids and labels.

    Padding is left out, so the key of a sequence does not depend on the batch it was put in.
    """
    ids, labels, mask = (t.detach().cpu() for t in (batch["input_ids"], batch["labels"], _token_mask(batch)))
    keys = []
    for row_ids, row_labels, row_mask in zip(ids, labels, mask):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(row_ids[row_mask].long().numpy().tobytes())
        digest.update(row_labels[row_mask].long().numpy().tobytes())
        keys.append(digest.digest())
    return keys


def _check_seen(cls_name: str, keys: Sequence[bytes], cache: Mapping[bytes, Any], what: str) -> None:
    missing = sum(key not in cache for key in keys)
    if missing:
        raise ValueError(
            f"{cls_name}: {missing} of {len(keys)} sequences of this {what} batch were not seen by "
            f"prepare(); {cls_name} caches per sequence, so pass every {what} batch to prepare()"
        )


def _global_count(count: torch.Tensor | int) -> torch.Tensor:
    """A count of this rank's batch shard, summed over the ranks (the normaliser of a mean)."""
    return distributed.global_sum(torch.as_tensor(count, dtype=torch.int64))


def _labelled_count(batch: Batch) -> int:
    count = int(_global_count((batch["labels"][:, 1:] != IGNORE_INDEX).sum().cpu()))
    if count == 0:
        raise ValueError("batch has no labelled (answer) tokens: every label after the first is -100")
    return count


def _cross_entropy_term(model: torch.nn.Module, batch: Batch, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * CE(batch)`` (differentiable) and CE itself (detached)."""
    count = _labelled_count(batch)
    # The weight goes into the fused op's token weights, so backward gets a gradient of 1.
    out = labelled_logprob_sum(model, batch, -weight / count)
    return out.total, -out.logp.double().sum() / count


def _floats(**values: torch.Tensor) -> dict[str, float]:
    """Scalar tensors to floats in one device sync (logging must not stall the step more)."""
    stacked = torch.stack([v.detach().double().reshape(()) for v in values.values()])
    return dict(zip(values, stacked.tolist()))


def _check(ok: bool, cls_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{cls_name}: {message}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _RetainCE:
    """The ``gamma * CE(D_r)`` term of GradDiff, NPO and PO; ``gamma = 0`` skips the retain forward."""

    gamma: float

    def _check_gamma(self) -> None:
        _check(
            _is_real(self.gamma) and self.gamma >= 0,
            type(self).__name__,
            f"gamma (retain weight) must be a finite number >= 0, got {self.gamma!r}",
        )

    @property
    def needs_retain(self) -> bool:
        return self.gamma > 0

    def prepare(
        self, model: torch.nn.Module, forget_batches: Iterable[Batch], retain_batches: Iterable[Batch] = ()
    ) -> None:
        """Nothing to cache: the CE terms depend on the current model only."""

    def _finish(
        self, model: torch.nn.Module, retain_batch: Batch | None, loss: torch.Tensor, terms: dict[str, torch.Tensor]
    ) -> LossOutput:
        if self.gamma > 0:
            if retain_batch is None:
                raise ValueError(f"{type(self).__name__} with gamma={self.gamma} needs a retain batch")
            retain, terms["retain_ce"] = _cross_entropy_term(model, retain_batch, self.gamma)
            loss = loss + retain
        return loss, _floats(loss=loss, **terms)


# --------------------------------------------------------------------------------------------
# Likelihood objectives
# --------------------------------------------------------------------------------------------


@dataclass
class GradientAscent:
    """GA: minimise -CE(D_f), i.e. push the forget answers' likelihood down. No retain term."""

    name: ClassVar[str] = "ga"
    needs_retain: ClassVar[bool] = False

    def prepare(
        self, model: torch.nn.Module, forget_batches: Iterable[Batch], retain_batches: Iterable[Batch] = ()
    ) -> None:
        """Nothing to cache."""

    def loss(self, model: torch.nn.Module, forget_batch: Batch, retain_batch: Batch | None = None) -> LossOutput:
        loss, forget_ce = _cross_entropy_term(model, forget_batch, -1.0)
        return loss, _floats(loss=loss, forget_ce=forget_ce)


@dataclass
class GradDiff(_RetainCE):
    """GradDiff: -CE(D_f) + gamma * CE(D_r)."""

    gamma: float = 1.0
    name: ClassVar[str] = "gdiff"

    def __post_init__(self) -> None:
        self._check_gamma()

    def loss(self, model: torch.nn.Module, forget_batch: Batch, retain_batch: Batch | None = None) -> LossOutput:
        forget, forget_ce = _cross_entropy_term(model, forget_batch, -1.0)
        return self._finish(model, retain_batch, forget, {"forget_ce": forget_ce})


@dataclass
class NPO(_RetainCE):
    """Negative preference optimisation (Zhang et al., 2024) plus a retain CE:

    ``-(2/beta) * mean_i log sigmoid(-beta * (log p(y_i|x_i) - log p_ref(y_i|x_i))) + gamma * CE(D_r)``

    with log p the *sum* over answer tokens (as NPO's reference code) and the mean over the forget
    sequences of the batch. p_ref is the model given to :meth:`prepare`; its log-probs are cached
    per sequence, so no reference model stays in memory. At the start (p = p_ref) the forget term
    is ``(2/beta) log 2``; it falls towards 0 as the forget answers become less likely.
    """

    beta: float = 0.1
    gamma: float = 1.0
    name: ClassVar[str] = "npo"
    _reference: dict[bytes, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check(
            _is_real(self.beta) and self.beta > 0,
            "NPO",
            f"beta (inverse temperature) must be a finite number > 0, got {self.beta!r}",
        )
        self._check_gamma()

    def prepare(
        self, model: torch.nn.Module, forget_batches: Iterable[Batch], retain_batches: Iterable[Batch] = ()
    ) -> None:
        """Cache ``log p_ref(y|x)`` of every forget sequence under ``model``, which must be the
        initial model (call before training; a second call replaces the cache)."""
        reference: dict[bytes, float] = {}
        with eval_mode(model):  # the reference is deterministic: no dropout
            for batch in forget_batches:
                sum_logp = sequence_logprobs(model, batch).sum_logp.double().cpu().tolist()
                reference.update(zip(sequence_keys(batch), sum_logp))
        if not reference:
            raise ValueError("NPO.prepare() got no forget batches; the reference log-probs come from them")
        self._reference = reference

    def reference_logprobs(self, forget_batch: Batch) -> torch.Tensor:
        """[B] float64 (CPU): the cached ``log p_ref(y|x)`` of the batch's sequences."""
        if not self._reference:
            raise RuntimeError("NPO: call prepare(model, forget_batches) before the loss")
        keys = sequence_keys(forget_batch)
        _check_seen("NPO", keys, self._reference, "forget")
        return torch.tensor([self._reference[key] for key in keys], dtype=torch.float64)

    def loss(self, model: torch.nn.Module, forget_batch: Batch, retain_batch: Batch | None = None) -> LossOutput:
        reference = self.reference_logprobs(forget_batch)
        scores = sequence_logprobs(model, forget_batch)
        log_ratio = scores.sum_logp - reference.to(scores.sum_logp.device, scores.sum_logp.dtype)
        sequences = int(_global_count(len(log_ratio)))
        forget = -(2 / self.beta) * F.logsigmoid(-self.beta * log_ratio).sum() / sequences
        forget_ce = -scores.sum_logp.sum() / int(_global_count(scores.n_tokens.sum().cpu()))
        return self._finish(
            model,
            retain_batch,
            forget,
            {"forget_npo": forget, "forget_ce": forget_ce, "log_ratio": log_ratio.sum() / sequences},
        )


# Refusals in the spirit of TOFU's "I don't know" set; short, varied, all declining to answer.
REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I can't answer that.",
    "I'm afraid I don't know the answer.",
    "That is something I don't know.",
    "I have no idea.",
    "I'm unable to answer that question.",
    "Sorry, I don't have that information.",
    "I couldn't tell you.",
)


def _answer_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the answer of a training example (with EOS).

    encode_qa tokenises the answer apart from the prompt, so its answer part is exactly what
    training on (question, text) sees, whatever the question: one place owns the format.
    """
    encoded = encode_qa(tokenizer, ("?", text), max_length=1 << 30)
    return encoded["input_ids"][encoded["prompt_length"] :]


@dataclass
class Refusal(_RetainCE):
    """PO: CE towards a refusal answer on the forget prompts, plus ``gamma * CE(D_r)``.

    Each forget sequence keeps its prompt and gets one of ``refusals`` as its answer
    (:meth:`refusal_batch`). **choose**: the refusal is picked from a hash of the sequence, so a
    question always gets the same one and the loss is a function of its inputs (second-order
    estimators may evaluate it repeatedly); TOFU draws a fresh one each time it loads an example.
    """

    tokenizer: Any = None  # the model's; SOUL binds the run's tokenizer when this is None
    refusals: Sequence[str] = REFUSALS
    gamma: float = 1.0
    name: ClassVar[str] = "po"
    _answers: list[list[int]] = field(init=False, repr=False)
    _pad_id: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.refusals = tuple(self.refusals)
        _check(
            len(self.refusals) > 0 and all(isinstance(r, str) and r.strip() for r in self.refusals),
            "Refusal",
            f"refusals must be a non-empty list of non-empty strings, got {self.refusals!r}",
        )
        self._check_gamma()
        if self.tokenizer is not None:
            self._answers = [_answer_ids(self.tokenizer, text) for text in self.refusals]
            self._pad_id = pad_token_id_of(self.tokenizer)

    def refusal_batch(self, forget_batch: Batch) -> dict[str, torch.Tensor]:
        """The forget batch's prompts, each followed by a refusal; labels on the refusal only.

        Each row equals ``encode_qa(tokenizer, (question, refusal))``, collated (right-padded).
        """
        if self.tokenizer is None:
            raise ValueError(
                "the refusal objective 'po' needs a tokenizer to build its refusal answers: "
                "Refusal(tokenizer=...), or pass tokenizer= to the method"
            )
        encoded = []
        rows = zip(
            sequence_keys(forget_batch),
            forget_batch["input_ids"].cpu(),
            forget_batch["labels"].cpu(),
            _token_mask(forget_batch).cpu(),
        )
        for key, ids, labels, mask in rows:
            answer_at = (labels != IGNORE_INDEX).nonzero()
            if len(answer_at) == 0:
                raise ValueError("Refusal: a forget sequence has no answer tokens, so its prompt is unknown")
            start = int(answer_at[0])
            prompt = ids[:start][mask[:start]].tolist()
            answer = self._answers[int.from_bytes(key[:8], "little") % len(self._answers)]
            encoded.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
        return collate(encoded, self._pad_id)

    def loss(self, model: torch.nn.Module, forget_batch: Batch, retain_batch: Batch | None = None) -> LossOutput:
        refusal, refusal_ce = _cross_entropy_term(model, self.refusal_batch(forget_batch), 1.0)
        return self._finish(model, retain_batch, refusal, {"refusal_ce": refusal_ce})


# --------------------------------------------------------------------------------------------
# Representation misdirection (RMU)
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the layer hook: layers after the chosen one cannot change the loss."""


def layer_activations(model: torch.nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """Output [B, S, H] of decoder layer ``layer`` (0-based): the residual stream after it.

    The forward stops there, so the later layers and the LM head cost nothing. Hooks that other
    code put on earlier modules (e.g. a router) still see the forward.
    """
    captured: list[torch.Tensor] = []
    grad_wanted = torch.is_grad_enabled()

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        # transformers 4.x checkpoints a layer's whole __call__, hooks included; reentrant
        # checkpointing runs it under no_grad, so the activation would silently get no gradient.
        if grad_wanted and not torch.is_grad_enabled():
            raise RuntimeError(
                f"decoder layer {layer} ran without gradients (reentrant gradient checkpointing?); "
                "enable checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        decoder_hidden(model, batch)
    except _StopForward:
        return captured[0]
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {layer} did not run in the forward pass")


def _masked_mse(activations: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens of ``||activations - target||^2 / H``, in float32 or better."""
    dtype = torch.promote_types(activations.dtype, torch.float32)
    per_token = (activations.to(dtype) - target.to(dtype)).pow(2).mean(-1)
    return (per_token * mask).sum() / _global_count(mask.sum().cpu()).to(per_token.device)


@dataclass
class RMU:
    """Representation misdirection for unlearning (Li et al., 2024, WMDP):

    ``mse(h_l(D_f), c * u) + alpha * mse(h_l(D_r), h_l^frozen(D_r))``

    h_l is the output of decoder layer ``layer`` (0-based), u a fixed random unit vector and
    h_l^frozen the initial model's activations, cached per retain sequence by :meth:`prepare`.
    Which parameters to train is the trainer's choice (WMDP updates the MLPs of layers l-2..l).

    **choose** (from the WMDP reference code, so its published hyperparameters carry over):

    * ``mse`` is the per-token squared distance divided by the hidden size H (the code's
      ``F.mse_loss``), averaged over attended tokens (prompt and answer); unlike the code, padding
      is excluded.
    * u has entries drawn uniformly from [0, 1), then normalised (``torch.rand``), seeded by ``seed``.
    * ``layer`` 7 and ``steering_coeff`` 6.5: WMDP's Zephyr-7B setting; ``alpha`` 100: the default
      of its script (its Zephyr-7B run used 1200). Tune all three per model.
    * ``cache_device``: where the frozen activations live (retain tokens x H values); ``None``
      keeps them on the layer's device, ``"cpu"`` saves accelerator memory for a copy per step.
    """

    layer: int = 7
    steering_coeff: float = 6.5
    alpha: float = 100.0
    seed: int = 0
    cache_device: str | torch.device | None = None
    name: ClassVar[str] = "rmu"
    _direction: torch.Tensor | None = field(default=None, init=False, repr=False)
    _frozen: dict[bytes, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 0,
            "RMU",
            f"layer must be a decoder layer index >= 0, got {self.layer!r}",
        )
        _check(
            _is_real(self.steering_coeff) and self.steering_coeff > 0,
            "RMU",
            f"steering_coeff must be a finite number > 0, got {self.steering_coeff!r}",
        )
        _check(
            _is_real(self.alpha) and self.alpha >= 0,
            "RMU",
            f"alpha (retain weight) must be a finite number >= 0, got {self.alpha!r}",
        )
        _check(isinstance(self.seed, int), "RMU", f"seed must be an int, got {self.seed!r}")

    @property
    def needs_retain(self) -> bool:
        return self.alpha > 0

    @property
    def direction(self) -> torch.Tensor:
        """The fixed random unit vector u [H] (float64: H numbers, cast per loss)."""
        self._check_prepared()
        return self._direction

    def _check_prepared(self) -> None:
        if self._direction is None:
            raise RuntimeError("RMU: call prepare(model, forget_batches, retain_batches) before the loss")

    def prepare(
        self, model: torch.nn.Module, forget_batches: Iterable[Batch], retain_batches: Iterable[Batch] = ()
    ) -> None:
        """Draw u and cache the frozen layer activations of every retain sequence under ``model``,
        which must be the initial model (a second call replaces both)."""
        layers = decoder_layers(model)
        _check(
            self.layer < len(layers),
            "RMU",
            f"layer {self.layer} is out of range: the model has {len(layers)} decoder layers",
        )
        device = next(layers[self.layer].parameters()).device
        u = torch.rand(
            model.config.hidden_size, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64
        )
        frozen: dict[bytes, torch.Tensor] = {}
        if self.alpha > 0:
            with eval_mode(model):
                for batch in retain_batches:
                    activations = layer_activations(model, batch, self.layer)
                    mask = _token_mask(batch).to(activations.device)
                    for key, row, row_mask in zip(sequence_keys(batch), activations, mask):
                        # Boolean indexing copies, so the cache holds no view of the whole batch.
                        frozen[key] = row[row_mask].to(self.cache_device or row.device)
            if not frozen:
                raise ValueError(f"RMU with alpha={self.alpha} needs retain batches in prepare()")
        self._direction = (u / u.norm()).to(device)
        self._frozen = frozen

    def frozen_activations(self, retain_batch: Batch) -> torch.Tensor:
        """[B, S, H]: the cached initial-model activations of the batch, zero on padding."""
        self._check_prepared()
        keys = sequence_keys(retain_batch)
        _check_seen("RMU", keys, self._frozen, "retain")
        rows = [self._frozen[key] for key in keys]
        mask = _token_mask(retain_batch).to(rows[0].device)
        out = rows[0].new_zeros(*mask.shape, rows[0].shape[-1])
        out[mask] = torch.cat(rows)  # row-major order of the mask == the rows one after another
        return out

    def loss(self, model: torch.nn.Module, forget_batch: Batch, retain_batch: Batch | None = None) -> LossOutput:
        u = self.direction
        forget_h = layer_activations(model, forget_batch, self.layer)
        forget = _masked_mse(
            forget_h, self.steering_coeff * u.to(forget_h.device), _token_mask(forget_batch).to(forget_h.device)
        )
        if self.alpha == 0:
            return forget, _floats(loss=forget, forget_rmu=forget)
        if retain_batch is None:
            raise ValueError(f"RMU with alpha={self.alpha} needs a retain batch")
        frozen = self.frozen_activations(retain_batch)
        retain_h = layer_activations(model, retain_batch, self.layer)
        retain = _masked_mse(retain_h, frozen.to(retain_h.device), _token_mask(retain_batch).to(retain_h.device))
        loss = forget + self.alpha * retain
        return loss, _floats(loss=loss, forget_rmu=forget, retain_rmu=retain)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, type] = {"ga": GradientAscent, "gdiff": GradDiff, "npo": NPO, "po": Refusal, "rmu": RMU}
# Fields that are not hyperparameters: not part of an objective's spec (saved configs, flags).
_NOT_HYPERPARAMETERS = ("tokenizer", "cache_device")


def make_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by name: ``"ga"``, ``"gdiff"``, ``"npo"``, ``"po"`` or ``"rmu"``, with its
    hyperparameters as keyword arguments (the same as ``NPO(beta=0.1)``)."""
    cls = OBJECTIVES.get(name)
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    accepted = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"objective {name!r} takes no argument {unknown}; it accepts {sorted(accepted)}")
    return cls(**kwargs)


def objective_spec(objective: Objective | str) -> dict[str, Any]:
    """``{"name": ..., hyperparameter: value, ...}`` of an objective (or of a name: its defaults)."""
    if isinstance(objective, str):
        objective = make_objective(objective)
    spec: dict[str, Any] = {"name": objective.name}
    for f in fields(objective):
        if f.init and f.name not in _NOT_HYPERPARAMETERS:
            value = getattr(objective, f.name)
            spec[f.name] = list(value) if isinstance(value, tuple) else value
    return spec


def resolve_objective(objective: Objective | str, *, tokenizer: Any = None) -> Objective:
    """A fresh objective for one run: a name becomes its default instance; an instance is copied
    with its hyperparameters and no caches (runs never share NPO's or RMU's cached state), and
    a refusal objective without a tokenizer gets ``tokenizer``."""
    if isinstance(objective, str):
        objective = make_objective(objective)
    if not isinstance(objective, Objective) or not dataclasses.is_dataclass(objective):
        raise TypeError(
            f"objective must be a name {sorted(OBJECTIVES)} or an objective instance "
            f"(e.g. unlearn_fast.objectives.NPO(beta=0.1)), got {type(objective).__name__}"
        )
    changes = {}
    if getattr(objective, "tokenizer", "absent") is None and tokenizer is not None:
        changes["tokenizer"] = tokenizer
    return dataclasses.replace(objective, **changes)
