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
``"hessian"`` is indefinite even at a well-fitted adapter (METHODS.md), so with it the qp and cg
solvers raise λ past the negative curvature they meet (``on_indefinite="increase_damping"``, with
a warning; the report gives the λ used).

Cost. A curvature product over the whole training set costs n example passes, so for large n
``curvature_sample=m`` estimates H on the edited examples plus a fixed random sample of m of the
others, reweighted to their share (a subsampled Newton step): the solve then costs the same at
any n, and the edit's cost grows only with |S|. ``check_fit`` (one gradient pass over train_data, once per eraser) can be
switched off for the same reason.

Checkpoints: ``remove(..., checkpoint_dir=d, checkpoint_every=k)`` (and the other two edits)
saves the solver's iterate every k iterations and at the end, with b, to
``d/llmeraser_checkpoint.pt`` atomically; the same call again (same eraser settings, adapter, training set and edits) skips the
gradient pass and restarts the qp / cg solver from the saved iterate with the rest of the HVP
budget. A restart, not a replay: the Krylov directions are rebuilt, so the resumed ΔΘ equals the
uninterrupted one to the solver's tolerance, not bitwise.

Distributed: when a ``torch.distributed`` process group is initialised, every sum over examples
(gradients, curvature products) is split across the ranks and all-reduced. Make the same calls on
every rank (same model, train_data and edits); each rank ends with the same edited model.

    eraser = LLMEraser(peft_model, train_data, tokenizer=tokenizer)
    result = eraser.remove([3, 17])             # or .modify_queries({3: "new question"})
    result.model, result.report                  #    .correct_responses({3: "new answer"})
    eraser.save(result.model, "adapter_dir")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.utils import PeftType
from torch import Tensor

from unlearn_fast import checkpoint, distributed
from unlearn_fast.data import IGNORE_INDEX, QAExample, check_examples, collate, encode_qa, pad_token_id_of
from unlearn_fast.hvp import SoftmaxCrossEntropy, hvp, make_loss_fn
from unlearn_fast.models import hvp_safe
from unlearn_fast.solvers import METHODS as SOLVERS
from unlearn_fast.solvers import FiniteSumOperator, IterationInfo, flatten_vectors, solve, unflatten_vector

Example = QAExample | tuple[str, str]
CURVATURES = ("gauss_newton", "hessian")
CURVATURE_DATA = ("train", "edited")
LOSS_WEIGHTINGS = ("token", "example")
# Above this ‖∇R(Θ̂)‖ / (mean edited-example gradient), Θ̂ does not look fitted to train_data.
FIT_WARNING_RATIO = 0.5
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
    # ‖∇R(Θ̂)‖ of the training loss R = (1/n) Σ_i L(z_i), and its ratio to the mean gradient of
    # the edited examples (‖n·b‖/|S|): near 0 when the adapter is fitted to train_data. NaN
    # without check_fit.
    train_grad_norm: float
    train_grad_ratio: float
    gradient_time_s: float  # b (and, on the eraser's first edit, ∇R)
    solve_time_s: float
    wall_time_s: float
    residual_history: list[float] = field(default_factory=list)
    solver_info: dict[str, Any] = field(default_factory=dict)  # the solver's other outputs


@dataclass
class EraseResult:
    model: PeftModel  # the edited model: a copy unless inplace=True
    report: EraseReport


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
    fine-tuning did with ``tokenizer`` and ``max_length`` (:func:`unlearn_fast.data.encode_qa`).

    Solver: ``solver`` (``"qp"``, ``"cg"``, ``"lissa"``, ``"reference_adam"``), ``damping`` λ,
    ``tol`` (relative residual), ``max_hvps`` (budget in single-example products), ``batch_size``
    (the qp subsample / stochastic minibatch; None: the solver's default) and any other option of
    the method in ``solver_options`` (e.g. ``{"seed": 1, "inner_iters": 10}``); see
    :func:`unlearn_fast.solvers.solve`. ``curvature``: ``"gauss_newton"`` or ``"hessian"``;
    ``curvature_data``: ``"train"`` or ``"edited"``; ``curvature_sample``: estimate H on the edited
    examples and this many others drawn with ``seed`` (None: all); ``check_fit``: warn if ∇R(Θ̂) is not small
    (one gradient pass over train_data). ``hvp_method``: see :func:`unlearn_fast.hvp.hvp`.
    ``loss_weighting``: ``"token"`` or ``"example"``. ``examples_per_pass``: examples per forward pass of the sums (memory bound).
    """

    def __init__(
        self,
        peft_model: PeftModel,
        train_data: Sequence[Example],
        *,
        tokenizer: Any = None,
        solver: str = "qp",
        damping: float = 1e-3,
        curvature: Literal["gauss_newton", "hessian"] = "gauss_newton",
        curvature_data: Literal["train", "edited"] = "train",
        curvature_sample: int | None = None,
        check_fit: bool = True,
        seed: int = 0,
        tol: float = 1e-3,
        max_hvps: int | None = None,
        batch_size: int | None = None,
        solver_options: Mapping[str, Any] | None = None,
        loss_weighting: Literal["token", "example"] = "token",
        hvp_method: str = "auto",
        examples_per_pass: int = 8,
        max_length: int = 256,
    ) -> None:
        peft_model = distributed.unwrap_ddp(peft_model)
        self._names = _lora_parameter_names(peft_model)
        if any(distributed.is_sharded(p) for p in peft_model.parameters()):
            raise ValueError(
                "LLMEraser: the model is FSDP-sharded, but its Hessian-vector products differentiate through the "
                "layers twice (double backward or forward mode), which FSDP does not support; load the model whole "
                "on every rank: under torch.distributed the sums over examples are still split across the ranks")
        problems = []
        if solver not in SOLVERS:
            problems.append(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "cg" and batch_size is not None:
            problems.append("batch_size does not apply to solver='cg' (full-sum products only)")
        if curvature not in CURVATURES:
            problems.append(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if curvature_data not in CURVATURE_DATA:
            problems.append(f"curvature_data must be one of {CURVATURE_DATA}, got {curvature_data!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            problems.append(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if isinstance(damping, bool) or not (isinstance(damping, (int, float)) and math.isfinite(damping)
                                             and damping >= 0):
            problems.append(f"damping must be a finite number >= 0, got {damping!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            problems.append(f"tol must be > 0, got {tol!r}")
        for name, value in (("examples_per_pass", examples_per_pass), ("max_length", max_length),
                            ("batch_size", batch_size), ("max_hvps", max_hvps),
                            ("curvature_sample", curvature_sample)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if problems:
            raise ValueError("LLMEraser: " + "; ".join(problems))
        if tokenizer is None:
            raise ValueError("LLMEraser needs tokenizer= (the one the adapter was fine-tuned with) to encode "
                             "train_data")

        self.model = peft_model
        self.tokenizer = tokenizer
        self.solver, self.damping, self.tol = solver, float(damping), float(tol)
        self.curvature, self.curvature_data = curvature, curvature_data
        self.curvature_sample, self.check_fit, self.seed = curvature_sample, bool(check_fit), seed
        self.max_hvps = max_hvps
        self.solver_options = dict(solver_options or {})
        if batch_size is not None:
            self.solver_options["batch_size"] = batch_size
        if curvature == "hessian" and solver in ("qp", "cg"):
            self.solver_options.setdefault("on_indefinite", "increase_damping")
        self.loss_weighting, self.hvp_method = loss_weighting, hvp_method
        self.examples_per_pass, self.max_length = examples_per_pass, max_length

        self.train_data = check_examples(train_data, "train_data")
        self._pad = pad_token_id_of(tokenizer)
        self._encoded = [encode_qa(tokenizer, ex, max_length) for ex in self.train_data]
        self._mean_answer_tokens = sum(map(_answer_tokens, self._encoded)) / len(self._encoded)
        self._train_grad_norm: float | None = None  # ‖∇R(Θ̂)‖, computed on first use
        first = peft_model.get_parameter(self._names[0])
        self._dtype, self._device = first.dtype, first.device
        self.dim = sum(peft_model.get_parameter(name).numel() for name in self._names)

    @property
    def n(self) -> int:
        return len(self._encoded)

    @property
    def parameter_names(self) -> list[str]:
        """Names of the adapter parameters Θ, in the order of the flat vectors."""
        return list(self._names)

    # --- the three edits -----------------------------------------------------------------------

    def remove(self, indices: Iterable[int] | Tensor, *, inplace: bool = False,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10) -> EraseResult:
        """Instance removal: unlearn the training examples ``train_data[i]`` for i in ``indices``."""
        chosen = self._check_indices(indices, "remove")
        if len(chosen) == self.n:
            raise ValueError("remove: cannot remove every training example (nothing would remain to fit)")
        return self._erase("remove", dict.fromkeys(chosen), inplace, checkpoint_dir, checkpoint_every)

    def modify_queries(self, queries: Mapping[int, str], *, inplace: bool = False,
                       checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10) -> EraseResult:
        """Query modification: ``train_data[i]``'s question becomes ``queries[i]``, same answer."""
        chosen = self._check_edits(queries, "modify_queries", field_index=0)
        return self._erase("modify_queries", {i: (queries[i], self._pair(i)[1]) for i in chosen}, inplace,
                           checkpoint_dir, checkpoint_every)

    def correct_responses(self, responses: Mapping[int, str], *, inplace: bool = False,
                          checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10) -> EraseResult:
        """Response correction: ``train_data[i]``'s answer becomes ``responses[i]``, same question."""
        chosen = self._check_edits(responses, "correct_responses", field_index=1)
        return self._erase("correct_responses", {i: (self._pair(i)[0], responses[i]) for i in chosen}, inplace,
                           checkpoint_dir, checkpoint_every)

    # --- saving --------------------------------------------------------------------------------

    @staticmethod
    def save(model: PeftModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save ``model``'s adapter (peft ``save_pretrained``: safetensors + adapter config) to ``path``.

        Written into a temporary directory beside ``path``, then renamed into place, so ``path``
        never holds a partial adapter even if the process dies mid-write. An existing ``path`` is
        an error unless ``overwrite=True`` (then it is swapped out, then deleted). Reload with
        ``PeftModel.from_pretrained(base_model, path)``. Under torch.distributed, save from one rank
        only (every rank holds the same model).
        """
        if not isinstance(model, PeftModel):
            raise TypeError(f"save expects the PeftModel of an EraseResult, got {type(model).__name__}")
        target = Path(path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / target.name)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # --- the curvature operator and gradients --------------------------------------------------

    @property
    def operator(self) -> FiniteSumOperator:
        """H = (1/n) Σ_i H_i at the model's current adapter, on flat vectors (order: :attr:`parameter_names`)."""
        return self._operator([(e, f"train_data[{i}]") for i, e in enumerate(self._encoded)])

    def _operator(self, pool: Sequence[tuple[Mapping[str, Any], str]], weights: Sequence[float] | None = None
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
        norm = self._mean_answer_tokens if self.loss_weighting == "token" else _answer_tokens(encoded)
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
        for start in range(0, len(mine), self.examples_per_pass):
            chunk = mine[start:start + self.examples_per_pass]
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
                    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), allow_unused=True,
                                                materialize_grads=True)
                flat = flatten_vectors(dict(zip(leaves, grads)))
                if not bool(torch.isfinite(flat).all()):
                    bad.extend(t.label for t in chunk)
                total += flat
        # Checked after the all-reduce, so that every rank raises (a NaN spreads through the sum).
        distributed.all_reduce_sum(total)
        if not bool(torch.isfinite(total).all()):
            where = f" (in a pass over {', '.join(bad)})" if bad else ""
            raise FloatingPointError(
                f"the loss gradient is not finite{where}; check the adapter and model weights for NaN/inf")
        return total

    def _curvature_product(self, terms: Sequence[_Term], vectors: Tensor) -> Tensor:
        """Σ_z c_z C_z v_k for K flat vectors [K, dim], summed over ranks."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be [{self.dim}] or [K, {self.dim}], got {tuple(vectors.shape)}")
        total = torch.zeros_like(vectors)
        cast = vectors.to(dtype=self._dtype, device=self._device)
        with self._evaluating():
            for _, loss, params in self._losses(terms):
                products = hvp(loss, params, unflatten_vector(cast, params), curvature=self.curvature,
                               method=self.hvp_method)
                total += torch.cat([p.reshape(p.shape[0], -1) for p in products.values()], dim=1).to(total)
        return distributed.all_reduce_sum(total)

    def _train_gradient_norm(self) -> float:
        """‖∇R(Θ̂)‖ of the training loss R = (1/n) Σ_i L(z_i); cached until an in-place edit."""
        if self._train_grad_norm is None:
            terms = [self._term(e, 1.0 / self.n, f"train_data[{i}]") for i, e in enumerate(self._encoded)]
            self._train_grad_norm = self._gradient(terms).norm().item()
        return self._train_grad_norm

    # --- one edit ------------------------------------------------------------------------------

    def _erase(self, task: str, edits: Mapping[int, tuple[str, str] | None], inplace: bool,
               checkpoint_dir: str | os.PathLike | None, checkpoint_every: int) -> EraseResult:
        """Apply the edits ``{i: new (question, answer), or None to remove train_data[i]}``."""
        start = time.perf_counter()
        run = self._checkpoint(task, edits, checkpoint_dir, checkpoint_every)
        saved = run.saved if run is not None else None
        chosen = list(edits)
        new = {i: encode_qa(self.tokenizer, pair, self.max_length) for i, pair in edits.items() if pair is not None}
        terms = [self._term(self._encoded[i], 1.0, f"train_data[{i}]") for i in chosen]
        terms += [self._term(e, -1.0, f"edited train_data[{i}]") for i, e in new.items()]
        # The curvature's examples: the edited ones (as they were for H over train_data; their new
        # versions for H over the edited set), and the others.
        if self.curvature_data == "train":
            edited = [(self._encoded[i], f"train_data[{i}]") for i in chosen]
        else:
            edited = [(e, f"edited train_data[{i}]") for i, e in new.items()]
        others = [(e, f"train_data[{i}]") for i, e in enumerate(self._encoded) if i not in edits]
        weights = [1.0 / self.n] * (len(edited) + len(others))
        if self.curvature_sample is not None and self.curvature_sample < len(others):
            # A sample of the others, reweighted to their share; the edited examples always count in
            # full: b lies along their gradients, and their own curvature is what bounds the step there
            # (without it, H_sample + λI is ~λ along b and the step overshoots by ~1/λ).
            order = torch.randperm(len(others), generator=torch.Generator().manual_seed(self.seed))
            share = len(others) / (self.curvature_sample * self.n)
            weights = [1.0 / self.n] * len(edited) + [share] * self.curvature_sample
            others = [others[j] for j in sorted(order[:self.curvature_sample].tolist())]
        pool = edited + others
        operator = self._operator(pool, weights)

        if saved is not None:  # b and the fit check as computed before the interruption
            train_grad_norm, rhs = saved["train_grad_norm"], saved["rhs"].to(self._device)
        else:
            train_grad_norm = self._train_gradient_norm() if self.check_fit else math.nan
            rhs = self._gradient(terms).div_(self.n)  # b = (1/n) Σ_S [𝒢(z) − 𝒢(z')]
        gradient_time = time.perf_counter() - start
        rhs_norm = rhs.norm().item()
        if rhs_norm == 0:
            raise ValueError(f"{task}: the edit's gradient b is exactly zero, so ΔΘ = 0 (do the edits change any "
                             "answer-token likelihood?)")
        ratio = train_grad_norm / (rhs_norm * self.n / len(chosen))
        if ratio > FIT_WARNING_RATIO:  # False for NaN (check_fit off)
            warnings.warn(
                f"LLMEraser: the training-loss gradient at the adapter is {ratio:.2f}x the mean gradient of the "
                "edited examples, but the influence step assumes a fitted adapter. Is train_data exactly the "
                "fine-tuning set (same examples, tokenizer and max_length), and did fine-tuning converge?",
                stacklevel=3)

        solve_start = time.perf_counter()
        options, damping, max_hvps = dict(self.solver_options), self.damping, self.max_hvps
        done = {"step": 0, "hvps": 0}
        if saved is not None:  # CG / QP restarted from the saved iterate, with the rest of the budget
            options["x0"], damping = saved["x"].to(self._device), saved["damping"]
            done = {"step": saved["step"], "hvps": saved["hvps"]}
            if max_hvps is not None:
                if max_hvps <= done["hvps"]:
                    raise ValueError(f"{run.path} has used {done['hvps']} of max_hvps={max_hvps} products; raise "
                                     "max_hvps to go on, or delete the checkpoint to start over")
                max_hvps -= done["hvps"]
        if run is not None:
            options["callback"] = self._saving_callback(run, checkpoint_every, done, rhs, train_grad_norm,
                                                        options.get("callback"))
        solved = solve(operator, rhs, self.solver, damping=damping, tol=self.tol, max_hvps=max_hvps, **options)
        solved = dataclasses.replace(solved, hvps_used=solved.hvps_used + done["hvps"],
                                     iterations=solved.iterations + done["step"])
        if run is not None:  # the final iterate too: a repeated call returns it after one residual check
            _write_solve_state(run, solved.iterations, solved.hvps_used, solved.x, solved.damping, rhs,
                               train_grad_norm)
        solve_time = time.perf_counter() - solve_start
        # Every rank solved the same system; rank 0's answer makes the models bitwise identical.
        delta = distributed.broadcast(solved.x.detach().to(self._dtype).contiguous())
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(f"the {self.solver!r} solver returned a non-finite ΔΘ; increase damping "
                                     f"(now {solved.damping:g}) or use curvature='gauss_newton'")
        if solved.damping != self.damping:
            warnings.warn(f"LLMEraser: negative curvature; the solver raised the damping from {self.damping:g} to "
                          f"{solved.damping:g}", stacklevel=3)
        if not solved.converged:
            warnings.warn(f"LLMEraser: the {self.solver!r} solver stopped at relative residual "
                          f"{solved.relative_residual:.3g} > tol {self.tol:g} after {solved.hvps_used} HVPs; "
                          "raise max_hvps or damping", stacklevel=3)

        model = self.model if inplace else copy.deepcopy(self.model)
        with torch.no_grad():
            params = {name: model.get_parameter(name) for name in self._names}
            for name, step in unflatten_vector(delta, params).items():
                params[name].add_(step)
        if inplace:
            self._train_grad_norm = None  # the adapter moved

        report = EraseReport(
            task=task, indices=chosen, n=self.n, dim=self.dim, curvature=self.curvature,
            curvature_data=self.curvature_data, curvature_examples=len(pool), solver=self.solver,
            damping=solved.damping, tol=self.tol, residual=solved.relative_residual, converged=solved.converged,
            hvps=solved.hvps_used, iterations=solved.iterations, delta_norm=delta.norm().item(), rhs_norm=rhs_norm,
            train_grad_norm=train_grad_norm, train_grad_ratio=ratio, gradient_time_s=gradient_time,
            solve_time_s=solve_time, wall_time_s=time.perf_counter() - start,
            residual_history=list(solved.residual_history),
            solver_info={f.name: getattr(solved, f.name) for f in dataclasses.fields(solved)
                         if f.name not in _REPORTED},
        )
        return EraseResult(model, report)

    # --- validation ----------------------------------------------------------------------------

    def _pair(self, i: int) -> tuple[str, str]:
        ex = self.train_data[i]
        return (ex.question, ex.answer) if isinstance(ex, QAExample) else (ex[0], ex[1])

    def _checkpoint(self, task: str, edits: Mapping[int, Any], checkpoint_dir, checkpoint_every: int):
        """The checkpoint file of this edit's solve under ``checkpoint_dir`` (None without one); an
        error if it was written by another edit, model, training set or settings."""
        checkpoint.check_every(checkpoint_every, f"LLMEraser.{task}")
        if checkpoint_dir is None:
            return None
        if self.solver not in ("qp", "cg"):
            raise ValueError(f"LLMEraser.{task}: checkpoint_dir needs solver 'qp' or 'cg' (a resume restarts them "
                             f"from the saved iterate), got {self.solver!r}")
        settings = {name: getattr(self, name) for name in (
            "solver", "damping", "curvature", "curvature_data", "curvature_sample", "seed", "tol", "loss_weighting",
            "hvp_method", "max_length")}
        settings["solver_options"] = {k: v for k, v in self.solver_options.items() if k != "callback"}
        run = checkpoint.CheckpointFile(Path(checkpoint_dir) / CHECKPOINT_FILE, settings)
        run.check(task=task, edits=repr(sorted(edits.items())),
                  model=checkpoint.tensor_fingerprint((n, self.model.get_parameter(n)) for n in self._names),
                  data=checkpoint.tensor_fingerprint((f"{i}.{key}", torch.as_tensor(e[key])) for i, e in
                                                     enumerate(self._encoded) for key in ("input_ids", "labels")))
        return run

    @staticmethod
    def _saving_callback(run, every: int, done: Mapping[str, int], rhs: Tensor, train_grad_norm: float, then):
        """A solver callback that saves the iterate every ``every`` iterations, then calls ``then``."""
        def callback(info: IterationInfo) -> bool | None:
            if info.iteration % every == 0:
                _write_solve_state(run, done["step"] + info.iteration, done["hvps"] + info.hvps_used, info.x,
                                   info.damping, rhs, train_grad_norm)
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
        outside = [i for i in chosen if not 0 <= i < self.n]
        if outside:
            raise ValueError(f"{what}: indices {outside} are out of range; train_data has {self.n} examples "
                             f"(0..{self.n - 1})")
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
# Helpers.


def _answer_tokens(encoded: Mapping[str, Any]) -> int:
    """Scored answer tokens of an encoded example (label t is predicted at position t-1)."""
    return sum(label != IGNORE_INDEX for label in encoded["labels"][1:])


def _write_solve_state(run, step: int, hvps: int, x: Tensor, damping: float, rhs: Tensor,
                       train_grad_norm: float) -> None:
    run.write({"step": step, "hvps": hvps, "x": x.detach().cpu(), "damping": damping, "rhs": rhs.detach().cpu(),
               "train_grad_norm": train_grad_norm})


def _lora_parameter_names(model: Any) -> list[str]:
    """The trainable LoRA parameters of a peft model; an error for anything else."""
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"LLMEraser needs a peft LoRA model (PeftModel), got {type(model).__name__}; fine-tune one with "
            "unlearn_fast.finetune.finetune (method='lora') or wrap a model with peft.get_peft_model")
    kinds = {name: model.peft_config[name].peft_type for name in model.active_adapters}
    not_lora = {name: str(kind) for name, kind in kinds.items() if kind != PeftType.LORA}
    if not_lora:
        raise TypeError(f"LLMEraser supports LoRA adapters only; the active adapters {not_lora} are not LoRA")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    if not lora:
        raise ValueError("the model has no trainable LoRA parameters; load a saved adapter with "
                         "PeftModel.from_pretrained(..., is_trainable=True)")
    others = sorted(set(trainable) - set(lora))
    if others:
        raise ValueError(
            f"trainable parameters that are not LoRA adapters: {others[:5]}{' ...' if len(others) > 5 else ''}; "
            "LLMEraser edits the adapters only, so its influence step would ignore them. Freeze them "
            "(requires_grad_(False)) if they were not fine-tuned")
    return lora

