"""LLMEraser: influence-function unlearning of a LoRA fine-tuned LLM (Ding et al., 2024).

Θ is the LoRA adapter of a peft model, fine-tuned to Θ̂ on ``train_data`` (n examples). Editing a
set S of training examples moves the adapter by the influence-function step

    Θ_new = Θ̂ + ΔΘ,   ΔΘ = (H + λI)⁻¹ b,   b = (1/n) Σ_S [𝒢(z) − 𝒢(z')],   H = (1/n) Σ_i ∇²L(z_i; Θ̂)

with 𝒢(z) = ∇_Θ L(z; Θ̂) and z' the edited example: none for instance removal (IR, 𝒢(z') = 0),
z with a new prompt for query modification (QM), z with a new response for response correction
(RC). The inverse-HVP is a finite-sum quadratic program solved by :func:`unlearn_fast.solvers.solve`
on :attr:`LLMEraser.operator`. The damping λ regularises the flat directions of H (LoRA's A/B
rescalings among them); an adapter fine-tuned with an L2 penalty (λ/2)‖Θ‖² has exactly λ.

Per-example loss. :func:`unlearn_fast.finetune.finetune` minimises the cross-entropy averaged
over all answer tokens of a batch, so examples weigh by their answer length. The default
``loss_weighting="token"`` defines ``L(z) = Σ_t CE_t(z) / T̄`` (over the answer tokens of z; T̄ the
mean answer length of ``train_data``): then ``(1/n) Σ_i L(z_i)`` is exactly the token-mean CE of
the whole training set, the objective of full-batch fine-tuning, and H and 𝒢 are derivatives of
that one function. ``"example"`` uses the mean CE over each example's own answer tokens instead
(for adapters trained with one loss per example). Prompt and padding tokens never count.

Curvature. ``curvature_data="train"`` (default) takes H over ``train_data`` as above, the
influence-function step of the paper. ``"edited"`` takes it over the edited training set instead
(the retained examples plus the new versions of the edited ones): one exact Newton step on the
edited objective, the better step when the edited examples are memorised, since their own
curvature then stiffens H in exactly the directions the step has to move along.
``curvature="gauss_newton"`` (default) is JᵀH_ℓJ, positive semi-definite; the exact
``"hessian"`` is indefinite even at a well-fitted adapter (docs/METHODS.md), so with it the cg, svrg
and subsample_fcg solvers raise λ past the negative curvature they meet (``on_indefinite="increase_damping"``, with
a warning; the report gives the λ used).

Cost. A curvature product over the whole training set costs n example passes, so for large n
``curvature_sample=m`` estimates H on the edited examples plus a fixed random sample of m of the
others, reweighted to their share (a subsampled Newton step): the solve then costs the same at
any n, and the edit's cost grows only with |S|. ``check_fit`` (one gradient pass over train_data,
once per eraser) can be switched off for the same reason.

Checkpoints: ``remove(..., checkpoint_dir=d, checkpoint_every=k)`` (and the other two edits)
saves the solver's iterate every k iterations and at the end, with b, to
``d/llmeraser_checkpoint.pt`` atomically; the same call again (same eraser settings, adapter,
training set and edits) skips the gradient pass and restarts the cg / svrg / subsample_fcg solver from the saved
iterate with the rest of the HVP budget. A restart, not a replay: the Krylov directions are
rebuilt, so the resumed ΔΘ equals the uninterrupted one to the solver's tolerance, not bitwise.

Distributed: when a ``torch.distributed`` process group is initialised, every sum over examples
(gradients, curvature products) is split across the ranks and all-reduced. Make the same calls on
every rank (same model, train_data and edits); each rank ends with the same edited model.

    eraser = LLMEraser(peft_model, train_data, tokenizer=tokenizer)  # or (..., LLMEraserConfig(...), ...)
    result = eraser.remove([3, 17])              # or .modify_queries({3: "new question"})
    result.model, result.report                  #    .correct_responses({3: "new answer"})
    result.save("result_dir")                    # adapter tensors, config, report: UnlearnResult.load
    result.model.save_pretrained("adapter_dir")  # or as a peft adapter directory
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.utils import PeftType
from torch import Tensor
from tqdm.auto import tqdm

from unlearn_fast import checkpoint, distributed
from unlearn_fast import curvature as fitted
from unlearn_fast.config import Config
from unlearn_fast.data import IGNORE_INDEX, QAExample, check_examples, collate, encode_qa, pad_token_id_of
from unlearn_fast.hvp import HVP_METHODS, SoftmaxCrossEntropy, hvp, make_loss_fn
from unlearn_fast.methods.base import UnlearnResult
from unlearn_fast.models import hvp_safe
from unlearn_fast.models.causal_lm import sequence_logprobs
from unlearn_fast.solvers import (
    DEFAULT_SOLVER,
    FiniteSumOperator,
    IterationInfo,
    SolveResult,
    check_solver,
    flatten_vectors,
    solve,
    solve_block,
    unflatten_vector,
)

logger = logging.getLogger(__name__)

Example = QAExample | tuple[str, str]
# The three edits, by the name of their method.
EDIT_TASKS = ("remove", "modify_queries", "correct_responses")
Solver = Literal["cg", "svrg", "subsample_fcg", "lissa", "reference_adam"]
# The solvers that restart from an iterate (checkpoints) and raise λ past negative curvature.
RESTARTABLE = ("cg", "svrg", "subsample_fcg")
Curvature = Literal["gauss_newton", "hessian"]
CurvatureData = Literal["train", "edited"]
LossWeighting = Literal["token", "example"]
HvpMethod = Literal["auto", "forward_over_reverse", "double_backward"]
CurvatureMethod = Literal["exact", "fisher", "ekfac"]
Preconditioner = Literal["none", "fisher", "ekfac"]
CurvatureLabels = Literal["sampled", "exact"]
CURVATURE_METHODS = typing.get_args(CurvatureMethod)
PRECONDITIONERS = typing.get_args(Preconditioner)
CURVATURES = typing.get_args(Curvature)
CURVATURE_DATA = typing.get_args(CurvatureData)
LOSS_WEIGHTINGS = typing.get_args(LossWeighting)
# The fit check's fixed relative tolerance on ‖∇R(Θ̂)‖ / ‖b‖ (R, or R + (λ/2)‖Θ‖² for an adapter
# fine-tuned with the L2 penalty λ: whichever Θ̂ is closer to stationary for). The influence step solves
# (H + λI)ΔΘ = b; the Newton step on the edited objective solves it with b − ∇R(Θ̂), so this ratio is
# the relative error of the step's right-hand side that an unfitted adapter makes (whatever n/|S|).
FIT_TOLERANCE = 0.5
CHECKPOINT_FILE = "llmeraser_checkpoint.pt"
# SolveResult fields the report carries under its own names.
_REPORTED = ("x", "method", "damping", "converged", "iterations", "hvps_used", "residual_history")


@dataclass
class EraseReport:
    """What an edit did. ``residual``: the solver's final ‖(H+λI)ΔΘ − b‖/‖b‖; ``damping``: the λ
    of the system solved (above the one asked for if negative curvature made the solver raise it)."""

    task: str  # "remove" | "modify_queries" | "correct_responses"
    indices: list[int]
    n: int  # training examples
    dim: int  # adapter parameters
    curvature: str
    curvature_data: str
    curvature_examples: int  # examples in the curvature sum (the edited ones + curvature_sample others, if set)
    solver: str
    damping: float
    tol: float
    residual: float
    converged: bool
    hvps: int  # single-example curvature products used by the solver
    iterations: int
    delta_norm: float  # ‖ΔΘ‖
    rhs_norm: float  # ‖b‖
    # ‖∇R(Θ̂)‖ of the training loss R = (1/n) Σ_i L(z_i), and its ratio to ‖b‖ (the relative error
    # of the step's right-hand side; warned above FIT_TOLERANCE). NaN without check_fit.
    train_grad_norm: float
    train_grad_ratio: float
    gradient_time_s: float  # b (and, on the eraser's first edit, ∇R)
    solve_time_s: float
    wall_time_s: float
    residual_history: list[float] = field(default_factory=list)
    solver_info: dict[str, Any] = field(default_factory=dict)  # the solver's other outputs


@dataclass
class EraseResult(UnlearnResult):
    """An edit's :class:`~unlearn_fast.methods.base.UnlearnResult` (``model``: the edited model, a
    copy unless ``inplace=True``; ``trained``: the LoRA parameter names; ``metrics``: the report's
    scalars; ``history``: one record per entry of the solver's residual history, ``{"iteration",
    "residual", "hvps"}``, entry 0 the start point, and one more start entry after each damping
    increase), with the full :class:`EraseReport`, which :meth:`save` records in result.json too."""

    report: EraseReport = field(kw_only=True)

    def _extra(self) -> dict[str, Any]:
        return {"report": dataclasses.asdict(self.report)}


@dataclass(frozen=True)
class LLMEraserConfig(Config):
    """Settings of an LLMEraser (module docstring); ``LLMEraser(model, train_data, config)``.

    solver: the inverse-HVP solver of :func:`unlearn_fast.solvers.solve`: ``"svrg"`` (variance-reduced
        stochastic epochs, the default: :data:`unlearn_fast.solvers.DEFAULT_SOLVER`), ``"cg"`` (full-sum
        conjugate gradient), ``"subsample_fcg"`` (flexible CG with a subsample
        preconditioner; formerly "qp"), ``"lissa"`` or ``"reference_adam"``.
    damping: λ of (H + λI)ΔΘ = b, >= 0; an adapter fine-tuned with an L2 penalty (λ/2)‖Θ‖² has exactly λ.
    curvature: ``"gauss_newton"`` (JᵀH_ℓJ, positive semi-definite) or ``"hessian"`` (exact and
        indefinite, so cg, svrg and subsample_fcg raise λ past its negative curvature, with a warning).
    curvature_data: ``"train"`` (H over train_data, the paper's influence step) or ``"edited"``
        (H over the edited training set: one Newton step on the edited objective).
    curvature_sample: estimate H on the edited examples and this many others drawn with seed,
        reweighted to their share (None: all examples).
    check_fit: warn if ‖∇R(Θ̂)‖ > FIT_TOLERANCE·‖b‖ (one gradient pass over train_data, once per
        eraser).
    seed: draws the curvature_sample examples.
    tol: the solver's target relative residual ‖(H+λI)ΔΘ − b‖/‖b‖.
    max_hvps: the solver's budget in single-example curvature products (None: no budget).
    batch_size: the subsample_fcg subsample or the stochastic solvers' minibatch (None: the solver's default;
        not for cg, whose products are full sums).
    solver_options: any other option of the solver, such as ``{"seed": 1, "inner_iters": 10}``; a
        ``callback`` option is called after each solver iteration (and is not saved with a result).
    loss_weighting: ``"token"`` (L(z) = Σ_t CE_t(z) / T̄, the token-mean CE of fine-tuning) or
        ``"example"`` (each example's own answer-token mean CE).
    hvp_method: how curvature products are differentiated, see :func:`unlearn_fast.hvp.hvp`.
    examples_per_pass: examples per forward pass of the sums (bounds memory).
    max_length: the token limit train_data was encoded with in fine-tuning
        (:func:`unlearn_fast.data.encode_qa`).
    curvature_method: ``"exact"`` (the iterative solve on the curvature operator, the default),
        ``"fisher"`` (per-example Gauss-Newton rows, inverted exactly by the Woodbury identity) or
        ``"ekfac"`` (eigenvalue-corrected Kronecker factors per LoRA module): the last two are
        fitted once (:meth:`LLMEraser.fit_curvature`) at the adapter and reused by every edit
        (:mod:`unlearn_fast.curvature`); Gauss-Newton only.
    preconditioner: with ``curvature_method="exact"`` and ``solver="cg"`` or ``"svrg"``, a fitted
        ``"fisher"`` or ``"ekfac"`` curvature preconditions the solver (``"none"``: none).
    curvature_labels: the fitted curvature's rows, ``"sampled"`` (k labels drawn from the model per
        example, unbiased) or ``"exact"`` (every label weighted by its probability: the exact
        per-example Gauss-Newton, small vocabularies only).
    curvature_samples: k, the labels drawn per example for ``curvature_labels="sampled"``.
    curvature_dtype: storage of the Woodbury rows, ``"float32"``, ``"bfloat16"`` or ``"float64"``
        (None: float64 for a float64 adapter, else float32); the Gram and its factor are float64.
    """

    solver: Solver = DEFAULT_SOLVER
    damping: float = 1e-3
    curvature: Curvature = "gauss_newton"
    curvature_data: CurvatureData = "train"
    curvature_sample: int | None = None
    check_fit: bool = True
    seed: int = 0
    tol: float = 1e-3
    max_hvps: int | None = None
    batch_size: int | None = None
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    loss_weighting: LossWeighting = "token"
    hvp_method: HvpMethod = "auto"
    examples_per_pass: int = 8
    max_length: int = 256
    curvature_method: CurvatureMethod = "exact"
    preconditioner: Preconditioner = "none"
    curvature_labels: CurvatureLabels = "sampled"
    curvature_samples: int = 1
    curvature_dtype: Literal["float32", "bfloat16", "float64"] | None = None

    def __post_init__(self) -> None:
        problems = []
        try:
            check_solver(self.solver)
        except ValueError as error:
            problems.append(str(error))
        if self.solver == "cg" and self.batch_size is not None:
            problems.append("batch_size does not apply to solver='cg' (full-sum products only)")
        for name, choices in (
            ("curvature", CURVATURES),
            ("curvature_data", CURVATURE_DATA),
            ("loss_weighting", LOSS_WEIGHTINGS),
            ("hvp_method", HVP_METHODS),
        ):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        damping, tol = self.damping, self.tol
        if isinstance(damping, bool) or not (
            isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0
        ):
            problems.append(f"damping must be a finite number >= 0, got {damping!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            problems.append(f"tol must be > 0, got {tol!r}")
        problems += _fitted_curvature_problems(self)
        for name in (
            "examples_per_pass",
            "max_length",
            "batch_size",
            "max_hvps",
            "curvature_sample",
            "curvature_samples",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.solver_options, Mapping):
            problems.append(
                f"solver_options must be a mapping of option names to values, got {type(self.solver_options).__name__}"
            )
        if problems:
            raise ValueError("LLMEraserConfig: " + "; ".join(problems))
        # Frozen: numbers as floats (one repr in checkpoints), and a copy of the caller's options.
        object.__setattr__(self, "damping", float(damping))
        object.__setattr__(self, "tol", float(tol))
        object.__setattr__(self, "solver_options", dict(self.solver_options))

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`, less a ``callback`` solver option (a function, not a setting)."""
        out = super().to_dict()
        out["solver_options"] = {k: v for k, v in out["solver_options"].items() if k != "callback"}
        return out


@dataclass(frozen=True)
class _Term:
    """One example of a weighted sum Σ c_z L(z): each of its answer tokens weighs c_z / norm_z."""

    label: str  # names the example in error messages
    encoded: Mapping[str, Any]
    token_weight: float


class LLMEraser:
    """Influence-function edits of a LoRA adapter fine-tuned on ``train_data`` (module docstring).

    ``peft_model``: a peft LoRA model whose trainable parameters are its LoRA adapters (any target
    modules and rank); never modified unless an edit passes ``inplace=True``. ``train_data``: the
    examples it was fine-tuned on (``QAExample`` or ``(question, answer)``), encoded as
    fine-tuning did with ``tokenizer`` and the config's ``max_length``
    (:func:`unlearn_fast.data.encode_qa`). ``config``: the settings (:class:`LLMEraserConfig`);
    ``overrides``: fields of it to change, e.g. ``LLMEraser(model, data, tokenizer=tok, solver="cg")``.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        train_data: Sequence[Example],
        config: LLMEraserConfig | None = None,
        *,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> None:
        if config is not None and not isinstance(config, LLMEraserConfig):
            raise TypeError(
                f"LLMEraser: config must be an LLMEraserConfig, got {type(config).__name__} (from a "
                "dict: LLMEraserConfig.from_dict(values))"
            )
        fields = [f.name for f in dataclasses.fields(LLMEraserConfig)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"LLMEraser: unknown setting(s) {unknown}; the settings are {fields}")
        self.config = cfg = dataclasses.replace(config or LLMEraserConfig(), **overrides)
        peft_model = distributed.unwrap_ddp(peft_model)
        self._names = _lora_parameter_names(peft_model)
        if any(distributed.is_sharded(p) for p in peft_model.parameters()):
            raise ValueError(
                "LLMEraser: the model is FSDP-sharded, but its Hessian-vector products differentiate through the "
                "layers twice (double backward or forward mode), which FSDP does not support; load the model whole "
                "on every rank: under torch.distributed the sums over examples are still split across the ranks"
            )
        if tokenizer is None:
            raise ValueError(
                "LLMEraser needs tokenizer= (the one the adapter was fine-tuned with) to encode train_data"
            )

        self.model = peft_model
        self.tokenizer = tokenizer
        # What the solver gets: the config's options, batch_size, and the indefinite Hessian's remedy.
        self._solver_options = dict(cfg.solver_options)
        if cfg.batch_size is not None:
            self._solver_options["batch_size"] = cfg.batch_size
        if cfg.curvature == "hessian" and cfg.solver in RESTARTABLE:
            self._solver_options.setdefault("on_indefinite", "increase_damping")

        self.train_data = check_examples(train_data, "train_data")
        self._pad = pad_token_id_of(tokenizer)
        self._encoded = [encode_qa(tokenizer, ex, cfg.max_length) for ex in self.train_data]
        self._mean_answer_tokens = sum(map(_answer_tokens, self._encoded)) / len(self._encoded)
        self._train_grad: Tensor | None = None  # ∇R(Θ̂), computed on first use (check_fit)
        first = peft_model.get_parameter(self._names[0])
        self._dtype, self._device = first.dtype, first.device
        self.dim = sum(peft_model.get_parameter(name).numel() for name in self._names)
        # The training set after in-place edits: removed examples leave it, edited ones change
        # (their version counts the changes; it seeds their label draws).
        self._removed: set[int] = set()
        self._versions = [0] * len(self._encoded)
        self._curvature: fitted.FittedCurvature | None = None
        self.curvature_fit_time_s: float | None = None

    @property
    def n(self) -> int:
        return len(self._encoded)

    @property
    def parameter_names(self) -> list[str]:
        """Names of the adapter parameters Θ, in the order of the flat vectors."""
        return list(self._names)

    # --- the three edits -----------------------------------------------------------------------

    def remove(
        self,
        indices: Iterable[int] | Tensor,
        *,
        inplace: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        progress: bool = True,
    ) -> EraseResult:
        """Instance removal: unlearn the training examples ``train_data[i]`` for i in ``indices``.

        ``progress``: a progress bar over the solve (HVPs used, relative residual)."""
        edits = self._edits("remove", indices)
        return self._erase("remove", edits, inplace, checkpoint_dir, checkpoint_every, progress)

    def modify_queries(
        self,
        queries: Mapping[int, str],
        *,
        inplace: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        progress: bool = True,
    ) -> EraseResult:
        """Query modification: ``train_data[i]``'s question becomes ``queries[i]``, same answer."""
        edits = self._edits("modify_queries", queries)
        return self._erase("modify_queries", edits, inplace, checkpoint_dir, checkpoint_every, progress)

    def correct_responses(
        self,
        responses: Mapping[int, str],
        *,
        inplace: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        progress: bool = True,
    ) -> EraseResult:
        """Response correction: ``train_data[i]``'s answer becomes ``responses[i]``, same question."""
        edits = self._edits("correct_responses", responses)
        return self._erase("correct_responses", edits, inplace, checkpoint_dir, checkpoint_every, progress)

    def _encode_versions(self, edits: Mapping[int, tuple[str, str] | None]) -> dict[int, Mapping[str, Any]]:
        """The new versions z' of the edited (not removed) examples, encoded."""
        return {i: encode_qa(self.tokenizer, p, self.config.max_length) for i, p in edits.items() if p is not None}

    def _edits(self, task: str, request: Any, what: str | None = None) -> dict[int, tuple[str, str] | None]:
        """A request of ``task`` (checked) as ``{i: the new (question, answer), or None to remove train_data[i]}``."""
        what = what or task
        if task == "remove":
            chosen = self._check_indices(request, what)
            if len(chosen) == self.n - len(self._removed):
                raise ValueError(f"{what}: cannot remove every training example (nothing would remain to fit)")
            return dict.fromkeys(chosen)
        if task not in EDIT_TASKS:
            raise ValueError(f"{what}: the task must be one of {EDIT_TASKS}, got {task!r}")
        field_index = 0 if task == "modify_queries" else 1
        chosen = self._check_edits(request, what, field_index)
        pairs = {i: list(self._pair(i)) for i in chosen}
        for i in chosen:
            pairs[i][field_index] = request[i]
        return {i: (q, a) for i, (q, a) in pairs.items()}

    def answer_logprobs(self, model: torch.nn.Module, indices: Sequence[int]) -> Tensor:
        """Σ log p(answer | question) of ``train_data[i]`` for i in ``indices`` under ``model`` (float64)."""
        with torch.no_grad():
            batch = collate([self._encoded[i] for i in indices], self._pad)
            device = next(model.parameters()).device
            scores = sequence_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        return scores.sum_logp.double().cpu()

    # --- the curvature operator and gradients --------------------------------------------------

    @property
    def operator(self) -> FiniteSumOperator:
        """H = (1/n) Σ_i H_i at the model's current adapter, on flat vectors (order: :attr:`parameter_names`)."""
        return self._operator([(e, f"train_data[{i}]") for i, e in enumerate(self._encoded) if i not in self._removed])

    def _operator(
        self, pool: Sequence[tuple[Mapping[str, Any], str]], weights: Sequence[float] | None = None
    ) -> FiniteSumOperator:
        """Σ_j w_j H(pool_j) over the pool examples (encoded, label), w_j = 1/n by default (the
        pool's share of (1/n) Σ_i H_i). As a finite sum of m terms: hvp_fn(v, indices) is the mean
        of m·w_j·H(pool_j) v over ``indices`` (all m when None), v [dim] or [K, dim]."""
        weights = [1.0 / self.n] * len(pool) if weights is None else list(weights)

        def hvp_fn(v: Tensor, indices: Sequence[int] | None) -> Tensor:
            chosen = range(len(pool)) if indices is None else [int(i) for i in indices]
            if not chosen or not all(0 <= i < len(pool) for i in chosen):
                raise ValueError(f"hvp_fn: indices must be a non-empty list within [0, {len(pool)}), got {indices}")
            terms = [self._term(pool[j][0], weights[j] * len(pool) / len(chosen), pool[j][1]) for j in chosen]
            single = v.dim() == 1
            out = self._curvature_product(terms, v.unsqueeze(0) if single else v)
            return out[0] if single else out

        return FiniteSumOperator(n=len(pool), hvp_fn=hvp_fn, dim=self.dim)

    def _term(self, encoded: Mapping[str, Any], coefficient: float, label: str) -> _Term:
        norm = self._mean_answer_tokens if self.config.loss_weighting == "token" else _answer_tokens(encoded)
        return _Term(label, encoded, coefficient / norm)

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) and HVP-safe kernels; every module's own flags come back after.

        The fused log-prob kernels (first-order only) are not needed: make_loss_fn's loss is plain
        torch and the Gauss-Newton product's ce_curvature op is never differentiated.
        """
        flags = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with hvp_safe(self.model):
                yield
        finally:
            for module, training in flags:
                module.training = training

    def _losses(self, terms: Sequence[_Term]) -> Iterator[tuple[list[_Term], SoftmaxCrossEntropy, dict[str, Tensor]]]:
        """This rank's share of Σ_z c_z L(z), as losses of collated passes of similar lengths."""
        mine = distributed.shard(sorted(terms, key=lambda t: len(t.encoded["input_ids"])))
        step = self.config.examples_per_pass
        for start in range(0, len(mine), step):
            chunk = mine[start : start + step]
            batch = collate([t.encoded for t in chunk], self._pad)
            loss, params = make_loss_fn(self.model, batch, self._names)
            # make_loss_fn weighs every scored token 1/count (the batch mean): use c_z / norm_z.
            scored = batch["labels"][:, 1:] != IGNORE_INDEX
            per_row = torch.tensor([t.token_weight for t in chunk], dtype=torch.float64)
            weights = per_row[:, None].expand_as(scored)[scored]
            loss.token_weights = weights.to(dtype=loss.token_weights.dtype, device=loss.token_weights.device)
            yield chunk, loss, params

    def _gradient(self, terms: Sequence[_Term]) -> Tensor:
        """∇_Θ Σ_z c_z L(z) at the current adapter, flat [dim], summed over ranks."""
        total = torch.zeros(self.dim, dtype=self._dtype, device=self._device)
        bad: list[str] = []
        with self._evaluating():
            for chunk, loss, params in self._losses(terms):
                leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
                with torch.enable_grad():
                    grads = torch.autograd.grad(
                        loss(leaves), list(leaves.values()), allow_unused=True, materialize_grads=True
                    )
                flat = flatten_vectors(dict(zip(leaves, grads)))
                if not bool(torch.isfinite(flat).all()):
                    bad.extend(t.label for t in chunk)
                total += flat
        # Checked after the all-reduce, so that every rank raises (a NaN spreads through the sum).
        distributed.all_reduce_sum(total)
        if not bool(torch.isfinite(total).all()):
            where = f" (in a pass over {', '.join(bad)})" if bad else ""
            raise FloatingPointError(
                f"the loss gradient is not finite{where}; check the adapter and model weights for NaN/inf"
            )
        return total

    def _curvature_product(self, terms: Sequence[_Term], vectors: Tensor) -> Tensor:
        """Σ_z c_z C_z v_k for K flat vectors [K, dim], summed over ranks."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be [{self.dim}] or [K, {self.dim}], got {tuple(vectors.shape)}")
        total = torch.zeros_like(vectors)
        cast = vectors.to(dtype=self._dtype, device=self._device)
        with self._evaluating():
            for _, loss, params in self._losses(terms):
                products = hvp(
                    loss,
                    params,
                    unflatten_vector(cast, params),
                    curvature=self.config.curvature,
                    method=self.config.hvp_method,
                )
                total += torch.cat([p.reshape(p.shape[0], -1) for p in products.values()], dim=1).to(total)
        return distributed.all_reduce_sum(total)

    def _train_gradient_norm(self) -> float:
        """‖∇R(Θ̂)‖ of the training loss R = (1/n) Σ_i L(z_i), or of R + (λ/2)‖Θ‖² if smaller (an adapter
        fine-tuned with that penalty); cached until an in-place edit."""
        if self._train_grad is None:
            terms = [
                self._term(e, 1.0 / self.n, f"train_data[{i}]")
                for i, e in enumerate(self._encoded)
                if i not in self._removed
            ]
            self._train_grad = self._gradient(terms)
        # Stationary for R, or for the penalised R + (λ/2)‖Θ‖² whose Hessian is H + λI: either fits.
        # Kept as the gradient, not its norm, so that an eraser at another λ (with_damping) reuses it.
        penalised = self._train_grad + self.config.damping * self._flat_adapter().to(self._train_grad)
        return min(self._train_grad.norm().item(), penalised.norm().item())

    # --- the fitted curvature -------------------------------------------------------------------

    @property
    def _fitted_method(self) -> str | None:
        cfg = self.config
        if cfg.curvature_method != "exact":
            return cfg.curvature_method
        return None if cfg.preconditioner == "none" else cfg.preconditioner

    def fit_curvature(self) -> fitted.FittedCurvature:
        """Fits the config's curvature (``curvature_method``, or the ``preconditioner``) once, at
        the current adapter, over the current training set; every later edit reuses it (and an
        in-place edit updates it). One pass over train_data (fisher) or two (ekfac). The time
        taken is :attr:`curvature_fit_time_s`."""
        method = self._fitted_method
        if method is None:
            raise ValueError("fit_curvature: the config uses curvature_method='exact' without a preconditioner")
        start = time.perf_counter()
        theta = self._flat_adapter()
        items = [(i, e, self._versions[i]) for i, e in enumerate(self._encoded) if i not in self._removed]
        if method == "fisher":
            rows, owners = self._fisher_rows(items, theta)
            self._curvature = fitted.WoodburyGaussNewton.fit(rows, owners, self.config.damping, theta)
        else:
            shapes = [self.model.get_parameter(n).shape for n in self._names]
            curv = fitted.EKFAC.empty(self._names, shapes, self.config.damping, theta)
            for _, _, acts in self._curvature_rows(items, theta, curv.modules):
                curv.add_factors(acts)
            curv.eigendecompose()
            for _, rows, _ in self._curvature_rows(items, theta):
                curv.add_rows(rows)
            self._curvature = curv
        self.curvature_fit_time_s = time.perf_counter() - start
        logger.info(
            "LLMEraser: %s curvature fitted on %d examples in %.2f s", method, len(items), self.curvature_fit_time_s
        )
        return self._curvature

    def with_damping(self, damping: float) -> LLMEraser:
        """An eraser of the same model, (edited) training set and settings but λ = ``damping``, with this
        one's fitted curvature refactored for the new λ (no pass over the data): e.g. for the λ that
        :func:`calibrate` chose. Later in-place edits of either eraser leave the other alone."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, damping=damping)
        other.train_data, other._encoded, other._versions = (
            list(self.train_data),
            list(self._encoded),
            list(self._versions),
        )
        other._removed, other._solver_options = set(self._removed), dict(self._solver_options)
        other._curvature = None if self._curvature is None else self._curvature.with_damping(damping)
        return other

    def save_curvature(self, directory: str | os.PathLike) -> Path:
        """Writes the fitted curvature to ``directory/curvature.safetensors`` (atomically), e.g.
        beside the adapter it was fitted to."""
        if self._curvature is None:
            raise ValueError("save_curvature: no curvature fitted yet (fit_curvature())")
        return fitted.save(self._curvature, directory, self._curvature_meta())

    def load_curvature(self, directory: str | os.PathLike) -> fitted.FittedCurvature:
        """Reads a curvature saved by :meth:`save_curvature` for the same adapter layout, training
        set size and settings; examples it was downdated for are removed from this eraser too."""
        curv, meta = fitted.load(directory)
        want = self._curvature_meta()
        wrong = [
            k
            for k in ("method", "names", "shapes", "n", "labels", "samples", "seed", "damping")
            if meta.get(k) != want.get(k)
        ]
        if wrong:
            raise ValueError(
                f"load_curvature: {directory} was fitted with other settings: "
                + ", ".join(f"{k}={meta.get(k)!r} (here {want.get(k)!r})" for k in wrong)
            )
        if any(meta["versions"]) and meta["versions"] != self._versions:
            raise ValueError(
                "load_curvature: it was saved after in-place query/response edits, which this eraser "
                "has not made; load it into the eraser that made them"
            )
        self._removed = set(meta["removed"])
        self._curvature = curv
        return curv

    def _curvature_meta(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": self._fitted_method,
            "names": list(self._names),
            "n": self.n,
            "shapes": [list(self.model.get_parameter(n).shape) for n in self._names],
            "labels": cfg.curvature_labels,
            "samples": cfg.curvature_samples,
            "seed": cfg.seed,
            "damping": cfg.damping,
            "removed": sorted(self._removed),
            "versions": list(self._versions),
        }

    def _flat_adapter(self) -> Tensor:
        return torch.cat([self.model.get_parameter(n).detach().reshape(-1) for n in self._names])

    def _curvature_rows(
        self, items: Iterable[tuple[int, Mapping[str, Any], int]], theta: Tensor, modules: Sequence[str] = ()
    ) -> Iterator[tuple[int, Tensor, dict[str, Any]]]:
        """(index, rows [r, dim], module activations) of each (index, encoded, version) at adapter ``theta``."""
        cfg = self.config
        with self._evaluating():
            for i, encoded, version in items:
                loss, params = make_loss_fn(self.model, collate([encoded], self._pad), self._names)
                weight = self._term(encoded, 1.0 / self.n, f"train_data[{i}]").token_weight
                rows, acts = fitted.example_rows(
                    self.model,
                    loss,
                    unflatten_vector(theta.to(self._device), params),
                    weight,
                    labels=cfg.curvature_labels,
                    samples=cfg.curvature_samples,
                    generator=fitted.example_generator(cfg.seed, i, version),
                    modules=modules,
                )
                yield i, rows, acts

    def _fisher_rows(self, items, theta: Tensor) -> tuple[Tensor, Tensor]:
        """The Woodbury rows of the items (exact labels: compressed per example) and their owners."""
        cfg = self.config
        store = (
            {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[cfg.curvature_dtype]
            if cfg.curvature_dtype
            else torch.float64
            if self._dtype == torch.float64
            else torch.float32
        )
        rows, owners = [], []
        for i, r, _ in self._curvature_rows(items, theta):
            r = fitted.compress_rows(r) if cfg.curvature_labels == "exact" else r
            rows.append(r.to(store))
            owners.append(torch.full((len(r),), i, dtype=torch.long))
        empty = torch.zeros(0, self.dim, dtype=store, device=self._device)
        return (torch.cat(rows) if rows else empty), (torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long))

    def _edited_curvature(self, chosen: Sequence[int], new: Mapping[int, Mapping[str, Any]]) -> fitted.FittedCurvature:
        """The fitted curvature over the edited training set: the chosen examples' terms taken out
        (rows deleted, or their contributions subtracted), their new versions' added, at Θ_fit."""
        curv = self._curvature
        old = [(i, self._encoded[i], self._versions[i]) for i in chosen]
        added = [(i, e, self._versions[i] + 1) for i, e in new.items()]
        if isinstance(curv, fitted.WoodburyGaussNewton):
            out = curv.remove(chosen)
            return out.add(*self._fisher_rows(added, curv.theta)) if added else out
        out = curv.copy()
        for sign, items in ((-1.0, old), (1.0, added)):
            for _, rows, acts in self._curvature_rows(items, curv.theta, out.modules):
                out.add_factors(acts, sign)
                out.add_rows(rows, sign)
        return out

    def _direct_solve(self, curv: fitted.FittedCurvature, rhs: Tensor) -> SolveResult:
        """ΔΘ = (C + λI)⁻¹ b with the fitted C: no iterations; the residual is that of C's own system."""
        x = curv.solve(rhs.to(torch.float64)).to(rhs)
        # rhs [d] or a block [m, d]: the largest relative residual over its rows.
        residual = ((curv.matvec(x.double()) - rhs.double()).norm(dim=-1) / rhs.double().norm(dim=-1)).max()
        return SolveResult(
            x=x,
            method=curv.method,
            damping=curv.damping,
            converged=True,
            iterations=0,
            hvps_used=0,
            monitor_hvps=0,
            residual_history=[float(residual)],
            hvps_history=[0],
        )

    def _commit_edit(
        self,
        chosen: Sequence[int],
        new: Mapping[int, Mapping[str, Any]],
        edits: Mapping,
        edited_curvature: fitted.FittedCurvature | None,
    ) -> None:
        """After an in-place edit: the training set (and the fitted curvature) become the edited ones."""
        self._train_grad = None  # the adapter moved
        for i in chosen:
            if i in new:
                self._encoded[i], self._versions[i] = new[i], self._versions[i] + 1
                question, answer = edits[i]
                self.train_data[i] = dataclasses.replace(self.train_data[i], question=question, answer=answer)
            else:
                self._removed.add(i)
        if self._curvature is not None:
            self._curvature = edited_curvature if edited_curvature is not None else self._edited_curvature(chosen, new)

    # --- one edit ------------------------------------------------------------------------------

    def _erase(
        self,
        task: str,
        edits: Mapping[int, tuple[str, str] | None],
        inplace: bool,
        checkpoint_dir: str | os.PathLike | None,
        checkpoint_every: int,
        progress: bool,
    ) -> EraseResult:
        """Apply the edits ``{i: new (question, answer), or None to remove train_data[i]}``."""
        start = time.perf_counter()
        run = self._checkpoint(task, edits, checkpoint_dir, checkpoint_every)
        chosen = list(edits)
        new = self._encode_versions(edits)
        pool, weights = self._curvature_pool(chosen, new)
        rhs, train_grad_norm = self._edit_gradient(chosen, new, run)
        gradient_time = time.perf_counter() - start
        rhs_norm = rhs.norm().item()
        ratio = self._fit_ratio(task, train_grad_norm, rhs_norm)

        solve_start = time.perf_counter()
        solved, edited_curvature = self._solve_edit(
            task, chosen, new, pool, weights, rhs, train_grad_norm, run, checkpoint_every, progress, inplace
        )
        solve_time = time.perf_counter() - solve_start
        delta = self._checked_step(solved)
        model = self._apply(delta, inplace)
        if inplace:
            self._commit_edit(chosen, new, edits, edited_curvature)

        times = (gradient_time, solve_time, time.perf_counter() - start)
        report = self._report(task, chosen, len(pool), solved, delta, rhs_norm, (train_grad_norm, ratio), times)
        logger.info("LLMEraser %s: %d of %d examples edited in %.1f s (residual %.3g, %d HVPs, |delta| %.3g)",
                    task, len(chosen), self.n, report.wall_time_s, report.residual, report.hvps, report.delta_norm)  # fmt: skip
        return self._result(model, report, solved.hvps_history)

    def _report(self, task, chosen, pool_size, solved, delta, rhs_norm, fit, times) -> EraseReport:
        """The report of one edit; ``fit``: (‖∇R(Θ̂)‖, its ratio to ‖b‖); ``times``: gradient, solve, wall."""
        cfg = self.config
        info = {f.name: getattr(solved, f.name) for f in dataclasses.fields(solved) if f.name not in _REPORTED}
        return EraseReport(
            task=task,
            indices=list(chosen),
            n=self.n,
            dim=self.dim,
            curvature=cfg.curvature,
            curvature_data=cfg.curvature_data,
            curvature_examples=pool_size,
            solver=solved.method,
            damping=solved.damping,
            tol=cfg.tol,
            residual=solved.relative_residual,
            converged=solved.converged,
            hvps=solved.hvps_used,
            iterations=solved.iterations,
            delta_norm=delta.norm().item(),
            rhs_norm=rhs_norm,
            train_grad_norm=fit[0],
            train_grad_ratio=fit[1],
            gradient_time_s=times[0],
            solve_time_s=times[1],
            wall_time_s=times[2],
            residual_history=list(solved.residual_history),
            solver_info=info,
        )

    def remove_many(self, requests: Sequence[Iterable[int]], *, progress: bool = True) -> list[EraseResult]:
        """Several independent removal requests at once: ``edit_many`` of ``("remove", r)`` for r in requests."""
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
            raise TypeError(f"remove_many: pass a non-empty list of index lists, got {requests!r}")
        return self.edit_many([("remove", r) for r in requests], progress=progress)

    def edit_many(self, requests: Sequence[tuple[str, Any]], *, progress: bool = True) -> list[EraseResult]:
        """Several independent edit requests at once, each ``(task, argument)`` as for the method of that
        name: ``("remove", [3, 17])``, ``("modify_queries", {3: "new question"})``, ``("correct_responses",
        {5: "new answer"})``. Result j is what that call gives (each from the current adapter; none is
        applied in place), but the m right-hand sides share every curvature product: one batched pass per
        iteration of block CG (:func:`unlearn_fast.solvers.solve_block`, preconditioned by a fitted
        ``preconditioner``), or one block solve with a fitted ``curvature_method``. Each report's ``hvps``,
        ``iterations`` and solve time are the shared block solve's. Needs the curvature that every request
        shares: ``curvature_data="train"`` without ``curvature_sample``."""
        cfg = self.config
        if cfg.curvature_data != "train" or cfg.curvature_sample is not None:
            raise ValueError(
                "edit_many: the requests share one curvature only with curvature_data='train' and "
                "curvature_sample=None; edit per request with these settings"
            )
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
            raise TypeError(f"edit_many: pass a non-empty list of (task, argument) pairs, got {requests!r}")
        if not all(isinstance(r, tuple) and len(r) == 2 for r in requests):
            raise TypeError(
                f"edit_many: each request is a (task, argument) pair, e.g. ('remove', [3]); got {requests!r}"
            )
        start = time.perf_counter()
        edits = [self._edits(task, arg, f"edit_many request {j}") for j, (task, arg) in enumerate(requests)]
        news = [self._encode_versions(e) for e in edits]
        grads = [self._edit_gradient(list(e), new, None) for e, new in zip(edits, news)]
        rhs = torch.stack([g for g, _ in grads])
        fits = [(norm, self._fit_ratio(task, norm, g.norm().item())) for (task, _), (g, norm) in zip(requests, grads)]
        gradient_time, solve_start = time.perf_counter() - start, time.perf_counter()
        solved = self._solve_block(rhs, progress)
        solve_time = time.perf_counter() - solve_start
        results = []
        for j, ((task, _), e) in enumerate(zip(requests, edits)):
            one = dataclasses.replace(solved, x=solved.x[j])
            delta = self._checked_step(one)
            times = (gradient_time, solve_time, time.perf_counter() - start)
            pool = self.n - len(self._removed)
            report = self._report(task, list(e), pool, one, delta, rhs[j].norm().item(), fits[j], times)
            results.append(self._result(self._apply(delta, False), report, solved.hvps_history))
        return results

    def _solve_block(self, rhs: Tensor, progress: bool) -> SolveResult:
        """(H + λI) X = B for the block of right-hand sides, directly with a fitted curvature or by block CG."""
        cfg = self.config
        if self._fitted_method is not None and self._curvature is None:
            self.fit_curvature()
        if cfg.curvature_method != "exact":
            return self._direct_solve(self._curvature, rhs)
        bar = tqdm(
            total=cfg.max_hvps, desc="LLMEraser remove_many (block_cg)", unit="hvp", leave=False, disable=not progress
        )
        try:
            return solve_block(
                self.operator,
                rhs,
                damping=cfg.damping,
                tol=cfg.tol,
                max_hvps=cfg.max_hvps,
                preconditioner=self._curvature.solve if self._curvature is not None else None,
                callback=_progress_callback(bar, 0, self._solver_options.get("callback")),
            )
        finally:
            bar.close()

    def _apply(self, delta: Tensor, inplace: bool) -> PeftModel:
        """The model with ΔΘ added to its adapter: a copy, or the eraser's model in place."""
        model = self.model if inplace else copy.deepcopy(self.model)
        with torch.no_grad():
            params = {name: model.get_parameter(name) for name in self._names}
            for name, step in unflatten_vector(delta, params).items():
                params[name].add_(step)
        return model

    def _solve_edit(
        self, task, chosen, new, pool, weights, rhs, train_grad_norm, run, checkpoint_every, progress, inplace
    ) -> tuple[SolveResult, fitted.FittedCurvature | None]:
        """The edit's solve: iterative on the operator (preconditioned if set), or direct with the
        fitted curvature; and the edited fitted curvature when it was needed (or None)."""
        cfg = self.config
        edited_curvature = None
        if self._fitted_method is not None:
            if self._curvature is None:
                self.fit_curvature()
            if cfg.curvature_data == "edited" or inplace:
                edited_curvature = self._edited_curvature(chosen, new)
            curv = edited_curvature if cfg.curvature_data == "edited" else self._curvature
            if cfg.curvature_method != "exact":
                return self._direct_solve(curv, rhs), edited_curvature
            self._solver_options["preconditioner"] = curv.solve
        try:
            solved = self._solve(
                task, self._operator(pool, weights), rhs, train_grad_norm, run, checkpoint_every, progress
            )
        finally:
            self._solver_options.pop("preconditioner", None)
        return solved, edited_curvature

    def _curvature_pool(
        self, chosen: Sequence[int], new: Mapping[int, Mapping[str, Any]]
    ) -> tuple[list[tuple[Mapping[str, Any], str]], list[float]]:
        """The curvature's examples (encoded, label) and their weights in H."""
        cfg = self.config
        # The edited ones (as they were for H over train_data; their new versions for H over the
        # edited set), and the others.
        if cfg.curvature_data == "train":
            edited = [(self._encoded[i], f"train_data[{i}]") for i in chosen]
        else:
            edited = [(e, f"edited train_data[{i}]") for i, e in new.items()]
        skip = set(chosen) | self._removed
        others = [(e, f"train_data[{i}]") for i, e in enumerate(self._encoded) if i not in skip]
        weights = [1.0 / self.n] * (len(edited) + len(others))
        m = cfg.curvature_sample
        if m is not None and m < len(others):
            # A sample of the others, reweighted to their share; the edited examples always count in
            # full: b lies along their gradients, and their own curvature is what bounds the step there
            # (without it, H_sample + λI is ~λ along b and the step overshoots by ~1/λ).
            order = torch.randperm(len(others), generator=torch.Generator().manual_seed(cfg.seed))
            share = len(others) / (m * self.n)
            weights = [1.0 / self.n] * len(edited) + [share] * m
            others = [others[j] for j in sorted(order[:m].tolist())]
        return edited + others, weights

    def _edit_gradient(
        self, chosen: Sequence[int], new: Mapping[int, Mapping[str, Any]], run: checkpoint.CheckpointFile | None
    ) -> tuple[Tensor, float]:
        """b = (1/n) Σ_S [𝒢(z) − 𝒢(z')] and ‖∇R(Θ̂)‖ (NaN without check_fit), or both as saved
        in the checkpoint before an interruption."""
        if run is not None and run.saved is not None:
            logger.info(
                "LLMEraser: resuming from %s (iteration %d, %d HVPs)", run.path, run.saved["step"], run.saved["hvps"]
            )
            return run.saved["rhs"].to(self._device), run.saved["train_grad_norm"]
        train_grad_norm = self._train_gradient_norm() if self.config.check_fit else math.nan
        terms = [self._term(self._encoded[i], 1.0, f"train_data[{i}]") for i in chosen]
        terms += [self._term(e, -1.0, f"edited train_data[{i}]") for i, e in new.items()]
        return self._gradient(terms).div_(self.n), train_grad_norm

    def _fit_ratio(self, task: str, train_grad_norm: float, rhs_norm: float) -> float:
        """‖∇R(Θ̂)‖ / ‖b‖, with a warning above the fixed FIT_TOLERANCE (the adapter does not look
        fitted to train_data: the step's right-hand side is off by more than that share)."""
        if rhs_norm == 0:
            raise ValueError(
                f"{task}: the edit's gradient b is exactly zero, so ΔΘ = 0 (do the edits change any "
                "answer-token likelihood?)"
            )
        ratio = train_grad_norm / rhs_norm
        if ratio > FIT_TOLERANCE:  # False for NaN (check_fit off)
            warnings.warn(
                f"LLMEraser: the training-loss gradient at the adapter is {ratio:.2f}x the edit's gradient b "
                f"(tolerance {FIT_TOLERANCE}), but the influence step assumes a fitted adapter. Is train_data "
                "exactly the fine-tuning set (same examples, tokenizer and max_length), and did fine-tuning converge?",
                stacklevel=4,
            )
        return ratio

    def _solve(
        self,
        task: str,
        operator: FiniteSumOperator,
        rhs: Tensor,
        train_grad_norm: float,
        run: checkpoint.CheckpointFile | None,
        checkpoint_every: int,
        progress: bool,
    ) -> SolveResult:
        """(H + λI)ΔΘ = b, from the checkpoint's iterate if there is one (counts include the saved run's)."""
        cfg = self.config
        options, damping, max_hvps = dict(self._solver_options), cfg.damping, cfg.max_hvps
        done = {"step": 0, "hvps": 0}
        saved = run.saved if run is not None else None
        if saved is not None:  # CG / SVRG / FCG restarted from the saved iterate, with the rest of the budget
            options["x0"], damping = saved["x"].to(self._device), saved["damping"]
            done = {"step": saved["step"], "hvps": saved["hvps"]}
            if max_hvps is not None:
                if max_hvps <= done["hvps"]:
                    raise ValueError(
                        f"{run.path} has used {done['hvps']} of max_hvps={max_hvps} products; raise "
                        "max_hvps to go on, or delete the checkpoint to start over"
                    )
                max_hvps -= done["hvps"]
        callback = options.pop("callback", None)
        if run is not None:
            callback = self._saving_callback(run, checkpoint_every, done, rhs, train_grad_norm, callback)
        # One bar, on rank 0: every rank runs the same solve.
        bar = tqdm(
            total=cfg.max_hvps,
            initial=done["hvps"],
            desc=f"LLMEraser {task} ({cfg.solver})",
            unit="hvp",
            leave=False,
            disable=not progress or distributed.rank_and_world_size()[0] != 0,
        )
        try:
            solved = solve(
                operator,
                rhs,
                cfg.solver,
                damping=damping,
                tol=cfg.tol,
                max_hvps=max_hvps,
                callback=_progress_callback(bar, done["hvps"], callback),
                **options,
            )
        finally:
            bar.close()
        solved = dataclasses.replace(
            solved,
            hvps_used=solved.hvps_used + done["hvps"],
            iterations=solved.iterations + done["step"],
            hvps_history=[h + done["hvps"] for h in solved.hvps_history],
        )
        if run is not None:  # the final iterate too: a repeated call returns it after one residual check
            _write_solve_state(run, solved.iterations, solved.hvps_used, solved.x, solved.damping, rhs, train_grad_norm)
        return solved

    def _checked_step(self, solved: SolveResult) -> Tensor:
        """ΔΘ, the same on every rank and finite; warnings if the solver raised λ or did not converge."""
        cfg = self.config
        # Every rank solved the same system; rank 0's answer makes the models bitwise identical.
        delta = distributed.broadcast(solved.x.detach().to(self._dtype).contiguous())
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(
                f"the {cfg.solver!r} solver returned a non-finite ΔΘ; increase damping "
                f"(now {solved.damping:g}) or use curvature='gauss_newton'"
            )
        if solved.damping != cfg.damping:
            warnings.warn(
                f"LLMEraser: negative curvature; the solver raised the damping from {cfg.damping:g} to "
                f"{solved.damping:g}",
                stacklevel=4,
            )
        if not solved.converged:
            warnings.warn(
                f"LLMEraser: the {cfg.solver!r} solver stopped at relative residual "
                f"{solved.relative_residual:.3g} > tol {cfg.tol:g} after {solved.hvps_used} HVPs; "
                "raise max_hvps or damping",
                stacklevel=4,
            )
        return delta

    def _result(self, model: PeftModel, report: EraseReport, hvps_history: Sequence[int]) -> EraseResult:
        """The report as an :class:`UnlearnResult`: its scalars as metrics, its residuals as history."""
        metrics = {
            f.name: getattr(report, f.name)
            for f in dataclasses.fields(report)
            if isinstance(getattr(report, f.name), (str, int, float, bool))
        }
        history = [
            {"iteration": i, "residual": r, "hvps": h}
            for i, (r, h) in enumerate(zip(report.residual_history, hvps_history))
        ]
        return EraseResult(
            method="llmeraser",
            model=model,
            config=self.config,
            history=history,
            metrics=metrics,
            wall_time_s=report.wall_time_s,
            trained=list(self._names),
            report=report,
        )

    # --- validation ----------------------------------------------------------------------------

    def _pair(self, i: int) -> tuple[str, str]:
        ex = self.train_data[i]
        return (ex.question, ex.answer) if isinstance(ex, QAExample) else (ex[0], ex[1])

    def _checkpoint(
        self, task: str, edits: Mapping[int, Any], checkpoint_dir: str | os.PathLike | None, checkpoint_every: int
    ) -> checkpoint.CheckpointFile | None:
        """The checkpoint file of this edit's solve under ``checkpoint_dir`` (None without one); an
        error if it was written by another edit, model, training set or settings."""
        checkpoint.check_every(checkpoint_every, f"LLMEraser.{task}")
        if checkpoint_dir is None:
            return None
        if self.config.solver not in RESTARTABLE:
            raise ValueError(
                f"LLMEraser.{task}: checkpoint_dir needs solver {RESTARTABLE} (a resume restarts them "
                f"from the saved iterate), got {self.config.solver!r}"
            )
        settings = {
            name: getattr(self.config, name)
            for name in (
                "solver",
                "damping",
                "curvature",
                "curvature_data",
                "curvature_sample",
                "seed",
                "tol",
                "loss_weighting",
                "hvp_method",
                "max_length",
            )
        }
        settings["solver_options"] = {k: v for k, v in self._solver_options.items() if k != "callback"}
        run = checkpoint.CheckpointFile(Path(checkpoint_dir) / CHECKPOINT_FILE, settings)
        run.check(
            task=task,
            edits=repr(sorted(edits.items())),
            model=checkpoint.tensor_fingerprint((n, self.model.get_parameter(n)) for n in self._names),
            data=checkpoint.tensor_fingerprint(
                (f"{i}.{key}", torch.as_tensor(e[key]))
                for i, e in enumerate(self._encoded)
                for key in ("input_ids", "labels")
            ),
        )
        return run

    @staticmethod
    def _saving_callback(run, every: int, done: Mapping[str, int], rhs: Tensor, train_grad_norm: float, then):
        """A solver callback that saves the iterate every ``every`` iterations, then calls ``then``."""

        def callback(info: IterationInfo) -> bool | None:
            if info.iteration % every == 0:
                _write_solve_state(
                    run,
                    done["step"] + info.iteration,
                    done["hvps"] + info.hvps_used,
                    info.x,
                    info.damping,
                    rhs,
                    train_grad_norm,
                )
            return then(info) if then is not None else None

        return callback

    def _check_indices(self, indices: Iterable[int] | Tensor, what: str) -> list[int]:
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        if isinstance(indices, (int, str, bytes)) or not isinstance(indices, Iterable):
            raise TypeError(f"{what}: pass a list of train_data indices, got {indices!r}")
        chosen = list(indices)
        if not chosen:
            raise ValueError(f"{what}: no examples given (an empty list)")
        wrong_type = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int)]
        if wrong_type:
            raise TypeError(f"{what}: indices must be integers, got {wrong_type}")
        outside = [i for i in chosen if not 0 <= i < self.n or i in self._removed]
        if outside:
            raise ValueError(
                f"{what}: indices {outside} are out of range; train_data has {self.n} examples "
                f"(0..{self.n - 1})"
                + (f" less those removed in place, {sorted(self._removed)}" if self._removed else "")
            )
        repeated = sorted(i for i, count in Counter(chosen).items() if count > 1)
        if repeated:
            raise ValueError(f"{what}: indices {repeated} are given more than once")
        return chosen

    def _check_edits(self, edits: Mapping[int, str], what: str, field_index: int) -> list[int]:
        if not isinstance(edits, Mapping):
            raise TypeError(f"{what}: pass a dict {{train_data index: new text}}, got {type(edits).__name__}")
        chosen = self._check_indices(list(edits), what)
        for i in chosen:
            text = edits[i]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{what}: the new text of example {i} must be a non-empty string, got {text!r}")
            if text == self._pair(i)[field_index]:
                raise ValueError(f"{what}: the new text of example {i} equals the current one ({text!r})")
        return chosen


# ---------------------------------------------------------------------------------------------
# λ chosen on removals other than the evaluated one.


@dataclass
class Calibration:
    """What :func:`calibrate` found. ``damping``: the λ of the grid with the smallest mean error;
    ``errors[λ]``: the mean over the calibration sets of ‖s(erased) − s(retrained)‖ / ‖s(original)
    − s(retrained)‖, s the per-example answer log-probabilities of the set's removed examples and
    as many retained ones (0: what retraining does; 1: no closer than not erasing); ``sets``: the
    calibration removals, disjoint from the evaluated one."""

    damping: float
    errors: dict[float, float]
    sets: list[list[int]]


def calibrate(
    eraser: LLMEraser,
    evaluated: Iterable[int],
    retrain: Callable[[list[int]], torch.nn.Module],
    dampings: Sequence[float],
    *,
    sets: Sequence[Sequence[int]] | None = None,
    count: int = 3,
    size: int | None = None,
    seed: int = 0,
) -> Calibration:
    """Chooses the damping λ of ``eraser`` honestly: on removals disjoint from ``evaluated`` (the
    removal whose result will be reported), by retraining them and keeping the λ of ``dampings``
    whose erasure matches retraining best (:class:`Calibration`). ``retrain(removed)`` returns
    the model fine-tuned as ``eraser.model`` was, without ``train_data[i]`` for i in removed (e.g.
    :func:`unlearn_fast.finetune.finetune` with ``exclude=removed``). ``sets``: the calibration
    removals, or ``count`` sets of ``size`` (default |evaluated|) examples drawn with ``seed`` from
    the others; an overlap with ``evaluated`` is an error. The eraser's other settings are kept."""
    evaluated = eraser._check_indices(evaluated, "calibrate: evaluated")
    grid = sorted({float(lam) for lam in dampings})
    if not grid or any(not (math.isfinite(lam) and lam > 0) for lam in grid):
        raise ValueError(f"calibrate: dampings must be a non-empty list of numbers > 0, got {dampings!r}")
    sets = _calibration_sets(eraser, evaluated, sets, count, size or len(evaluated), seed)
    if eraser._fitted_method is not None and eraser._curvature is None:
        eraser.fit_curvature()  # once: every λ of the grid reuses it (refactored, not refitted)
    errors = {lam: 0.0 for lam in grid}
    for removed in sets:
        scored = removed + _draw(eraser, set(removed) | set(evaluated), len(removed), seed + 1)
        gold = eraser.answer_logprobs(retrain(list(removed)), scored)
        scale = (eraser.answer_logprobs(eraser.model, scored) - gold).norm().item()
        for lam in grid:
            erased = eraser.with_damping(lam).remove(removed, progress=False).model
            errors[lam] += (eraser.answer_logprobs(erased, scored) - gold).norm().item() / scale / len(sets)
    best = min(grid, key=errors.__getitem__)
    logger.info("LLMEraser calibrate: damping %g (errors %s)", best, {k: round(v, 4) for k, v in errors.items()})
    return Calibration(best, errors, sets)


def _calibration_sets(eraser, evaluated, sets, count, size, seed) -> list[list[int]]:
    """The given calibration sets (checked disjoint from ``evaluated``), or ``count`` drawn ones."""
    if sets is None:
        return [_draw(eraser, set(evaluated), size, seed + j) for j in range(_positive(count, "count"))]
    sets = [eraser._check_indices(s, f"calibrate: sets[{j}]") for j, s in enumerate(sets)]
    overlap = sorted({i for s in sets for i in s} & set(evaluated))
    if overlap:
        raise ValueError(
            f"calibrate: the calibration sets contain {overlap}, which the evaluated removal removes too: "
            "λ tuned on the evaluated examples is tuned on the test; use sets disjoint from it"
        )
    if not sets:
        raise ValueError("calibrate: sets is empty; pass at least one calibration removal (or sets=None)")
    return sets


def _draw(eraser: LLMEraser, exclude: set[int], size: int, seed: int) -> list[int]:
    pool = [i for i in range(eraser.n) if i not in exclude and i not in eraser._removed]
    if _positive(size, "size") > len(pool):
        raise ValueError(f"calibrate: cannot draw {size} examples from the {len(pool)} outside the evaluated removal")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size]
    return sorted(pool[j] for j in order.tolist())


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"calibrate: {name} must be an integer >= 1, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Helpers.


def _answer_tokens(encoded: Mapping[str, Any]) -> int:
    """Scored answer tokens of an encoded example (label t is predicted at position t-1)."""
    return sum(label != IGNORE_INDEX for label in encoded["labels"][1:])


def _progress_callback(bar: tqdm, hvps_before: int, then: Callable[[IterationInfo], bool | None] | None):
    """A solver callback that moves ``bar`` to the HVPs used and shows the residual, then calls ``then``."""

    def callback(info: IterationInfo) -> bool | None:
        bar.update(hvps_before + info.hvps_used - bar.n)
        bar.set_postfix(residual=f"{info.relative_residual:.2e}", refresh=False)
        return then(info) if then is not None else None

    return callback


def _write_solve_state(
    run, step: int, hvps: int, x: Tensor, damping: float, rhs: Tensor, train_grad_norm: float
) -> None:
    run.write(
        {
            "step": step,
            "hvps": hvps,
            "x": x.detach().cpu(),
            "damping": damping,
            "rhs": rhs.detach().cpu(),
            "train_grad_norm": train_grad_norm,
        }
    )


def _lora_parameter_names(model: Any) -> list[str]:
    """The trainable LoRA parameters of a peft model; an error for anything else."""
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"LLMEraser needs a peft LoRA model (PeftModel), got {type(model).__name__}; fine-tune one with "
            "unlearn_fast.finetune.finetune (method='lora') or wrap a model with peft.get_peft_model"
        )
    kinds = {name: model.peft_config[name].peft_type for name in model.active_adapters}
    not_lora = {name: str(kind) for name, kind in kinds.items() if kind != PeftType.LORA}
    if not_lora:
        raise TypeError(f"LLMEraser supports LoRA adapters only; the active adapters {not_lora} are not LoRA")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    if not lora:
        raise ValueError(
            "the model has no trainable LoRA parameters; load a saved adapter with "
            "PeftModel.from_pretrained(..., is_trainable=True)"
        )
    others = sorted(set(trainable) - set(lora))
    if others:
        raise ValueError(
            f"trainable parameters that are not LoRA adapters: {others[:5]}{' ...' if len(others) > 5 else ''}; "
            "LLMEraser edits the adapters only, so its influence step would ignore them. Freeze them "
            "(requires_grad_(False)) if they were not fine-tuned"
        )
    return lora


def _fitted_curvature_problems(cfg: LLMEraserConfig) -> list[str]:
    """What is wrong with the fitted-curvature settings of a config."""
    problems = []
    if cfg.curvature_method not in CURVATURE_METHODS:
        problems.append(f"curvature_method must be one of {CURVATURE_METHODS}, got {cfg.curvature_method!r}")
    if cfg.preconditioner not in PRECONDITIONERS:
        problems.append(f"preconditioner must be one of {PRECONDITIONERS}, got {cfg.preconditioner!r}")
    if cfg.curvature_labels not in fitted.LABELS:
        problems.append(f"curvature_labels must be one of {fitted.LABELS}, got {cfg.curvature_labels!r}")
    if cfg.curvature_dtype not in (None, "float32", "bfloat16", "float64"):
        problems.append(
            f"curvature_dtype must be None, 'float32', 'bfloat16' or 'float64', got {cfg.curvature_dtype!r}"
        )
    if cfg.preconditioner != "none" and (cfg.curvature_method != "exact" or cfg.solver not in ("cg", "svrg")):
        problems.append("preconditioner applies to curvature_method='exact' with solver='cg' or 'svrg'")
    if cfg.curvature_method != "exact" or cfg.preconditioner != "none":
        if cfg.curvature != "gauss_newton":
            problems.append("a fitted curvature (fisher, ekfac) is Gauss-Newton: set curvature='gauss_newton'")
        if cfg.curvature_sample is not None:
            problems.append("curvature_sample applies to the operator, not to a fitted curvature")
        if not cfg.damping > 0:
            problems.append("a fitted curvature needs damping > 0")
    return problems
