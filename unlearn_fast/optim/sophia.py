"""Sophia, the clipped diagonally preconditioned optimizer of SOUL, on the fused update op.

Each ``step()`` runs one fused pass per (param group, device, dtype) over all parameters that
have a gradient (:func:`unlearn_fast.ops.sophia_update.sophia_update`): momentum, decoupled
weight decay, the clipped step ``lr * sign(m) * min(|m| / max(rho * bs * h, eps), 1)`` and, for
the ``empirical`` estimator, the Hessian EMA from g*g.

Where the diagonal Hessian estimate ĥ comes from (``estimator``, a param-group option):

* ``"gnb"`` (Sophia-G, Gauss-Newton-Bartlett): every ``hessian_interval`` steps
  (:meth:`Sophia.hessian_due`) the caller backpropagates the mean cross-entropy on labels
  sampled from the model's own softmax and calls :meth:`Sophia.update_hessian`, which takes
  ĥ = ĝ*ĝ from ``p.grad``;
* ``"hutchinson"`` (Sophia-H): the caller computes u*(Hu) (u Rademacher) and passes the
  estimates to :meth:`Sophia.update_hessian`; they may be negative, which the max(., eps)
  denominator turns into a full clipped step instead of a flipped one;
* ``"empirical"`` (what the SOUL reference code runs): ĥ = g*g of the step's own gradient,
  folded into ``step()`` every step (``hessian_interval`` is ignored).

``bs`` is the number of tokens the loss averages over: ĝ*ĝ of a mean loss is about 1/bs of the
per-token curvature, and the step's ``rho * bs * h`` undoes that. Give it to the constructor (a
group option, e.g. the fixed 5120 of the SOUL preset), per group (``group["bs"]``), or per step
(``step(bs=n_tokens)``, which overrides the groups). It is required for ``gnb`` and
``empirical``; for ``hutchinson`` it defaults to 1, since u*(Hu) of the mean loss is already
the curvature the step wants.

Typical Sophia-G loop::

    opt = Sophia(model.parameters(), lr=2e-4, estimator="gnb")
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        opt.step(bs=int(batch["attention_mask"].sum()))
        opt.zero_grad()
        if opt.hessian_due():
            logits = model(**batch).logits
            sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
            F.cross_entropy(logits.flatten(0, -2), sampled.flatten()).backward()
            opt.update_hessian()
            opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from unlearn_fast.distributed import local
from unlearn_fast.ops.sophia_update import sophia_update, state_dtype

ESTIMATORS = ("gnb", "hutchinson", "empirical")
SOUL_REFERENCE_BS = 5120


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_group(group: dict) -> None:
    """Clear errors for bad hyperparameters, whether from the constructor or a param group."""
    if not (_is_finite_number(group["lr"]) and group["lr"] >= 0):
        raise ValueError(f"Sophia: lr must be a finite float >= 0, got {group['lr']!r}")
    betas = group["betas"]
    if not (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_finite_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"Sophia: betas must be two numbers in [0, 1), got {betas!r}")
    if not (_is_finite_number(group["rho"]) and group["rho"] >= 0):
        raise ValueError(f"Sophia: rho must be finite and >= 0, got {group['rho']!r}")
    if not (_is_finite_number(group["weight_decay"]) and group["weight_decay"] >= 0):
        raise ValueError(f"Sophia: weight_decay must be finite and >= 0, got {group['weight_decay']!r}")
    if not (_is_finite_number(group["eps"]) and group["eps"] > 0):
        raise ValueError(f"Sophia: eps must be finite and > 0, got {group['eps']!r}")
    if group["estimator"] not in ESTIMATORS:
        raise ValueError(f"Sophia: estimator must be one of {ESTIMATORS}, got {group['estimator']!r}")
    k = group["hessian_interval"]
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"Sophia: hessian_interval must be an int >= 1, got {k!r}")
    if group["bs"] is not None and not (_is_finite_number(group["bs"]) and group["bs"] > 0):
        raise ValueError(f"Sophia: bs must be None or a finite number > 0, got {group['bs']!r}")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"Sophia: maximize must be a bool, got {group['maximize']!r}")


class Sophia(torch.optim.Optimizer):
    """Sophia (Liu et al., 2023) with the ``gnb``, ``hutchinson`` and ``empirical`` estimators.

    Args:
        params: parameters or param groups (every argument below is also a group option).
        lr: learning rate: the largest per-coordinate move of one step (besides weight decay).
        betas: (beta1, beta2), the EMA factors of the gradient and of the Hessian estimate.
        rho: clipping scale: the step is lr * sign(m) * min(|m| / (rho * bs * h), 1).
        weight_decay: decoupled, p <- p * (1 - lr * weight_decay) every step.
        estimator: ``"gnb"``, ``"hutchinson"`` or ``"empirical"`` (see the module docstring).
        hessian_interval: k, refresh h every k steps (:meth:`hessian_due`); not for empirical.
        bs: tokens per batch (see the module docstring), or None to give it per step.
        eps: floor of the denominator, max(rho * bs * h, eps).
        maximize: ascend instead of descend.

    State per parameter: ``exp_avg`` (m) and ``hessian`` (h), float32 (also for bfloat16 and
    float16 params) or float64 for float64 params; per group, ``step`` counts ``step()`` calls.

    With ``track_win_rate`` (SOUL sets it), after every ``step()`` :attr:`win_counts` holds
    (unclipped, moving) coordinates of that step (moving: m != 0): their ratio is the "win rate"
    Sophia's authors tune rho by (0.1 to 0.5 of the coordinates unclipped); with h = 0 every
    coordinate is clipped and Sophia is sign momentum. Counting is a second pass over m and h
    (unfused: ~7x the fused step's time on SmolLM2-sized parameters, measured), so it is off by
    default; it is small next to a forward and backward pass, and LoRA runs count few coordinates.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        estimator: str = "gnb",
        hessian_interval: int = 10,
        bs: float | None = None,
        eps: float = 1e-15,
        maximize: bool = False,
        track_win_rate: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            rho=rho,
            weight_decay=weight_decay,
            estimator=estimator,
            hessian_interval=hessian_interval,
            bs=bs,
            eps=eps,
            maximize=maximize,
            soul_reference=False,
            step=0,
        )
        _check_group(defaults)
        super().__init__(params, defaults)
        self.win_counts = torch.zeros(2, dtype=torch.float64)  # (unclipped, moving) of the last step
        self.track_win_rate = track_win_rate

    @property
    def win_rate(self) -> float:
        """Share of the coordinates that the last ``step()`` did not clip (NaN before any step)."""
        unclipped, total = self.win_counts.tolist()
        return unclipped / total if total else math.nan

    @classmethod
    def soul_reference(cls, params: Iterable[torch.Tensor] | Iterable[dict], lr: float) -> Sophia:
        """The optimizer of the SOUL reference code, reproduced exactly (docs/METHODS.md).

        The empirical estimator (h from g*g every step), betas (0.9, 0.95), rho 0.04, bs fixed at
        5120 (not the token count), weight decay 0.1 (param groups may override it, as the
        reference does for biases and norms), and the reference's order within a step:
        h <- b2 h + (1 - b2) g*g; m <- b1 m + (1 - b1) g; p <- p (1 - lr wd);
        m <- b1 m + (1 - b1) g *again* (a quirk: an effective beta1 of 0.81); then the clipped
        step with the public code's denominator rho * bs * h + 1e-15. The double momentum
        update exists only here.
        """
        opt = cls(
            params,
            lr=lr,
            betas=(0.9, 0.95),
            rho=0.04,
            weight_decay=0.1,
            estimator="empirical",
            hessian_interval=1,
            bs=SOUL_REFERENCE_BS,
            eps=1e-15,
        )
        opt.defaults["soul_reference"] = True
        for group in opt.param_groups:
            group["soul_reference"] = True
        return opt

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["betas"] = tuple(group["betas"])
            _check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the state keeps its own dtype: torch casts it to each parameter's, which
        would round the float32 state of bfloat16 / float16 parameters (a resume must be exact)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key in ("exp_avg", "hessian"):
                if key in saved:
                    self.state[p][key] = saved[key].to(
                        device=p.device, dtype=state_dtype(p.dtype), memory_format=torch.contiguous_format, copy=True
                    )

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            sdtype = state_dtype(p.dtype)
            state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.contiguous_format)
            state["hessian"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.contiguous_format)
        return state

    @staticmethod
    def _batch_size(group: dict, bs: float | None) -> float:
        value = bs if bs is not None else group["bs"]
        if value is None:
            if group["estimator"] == "hutchinson":
                return 1.0
            raise ValueError(
                f"Sophia(estimator={group['estimator']!r}) needs bs, the number of tokens the loss averages "
                "over: pass bs= to the constructor, to step(bs=...), or set param_group['bs']"
            )
        if not (_is_finite_number(value) and value > 0):
            raise ValueError(f"Sophia: bs must be a finite number > 0, got {value!r}")
        return float(value)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, bs: float | None = None):
        """One update of every parameter with a gradient (parameters without one are skipped).

        ``bs`` overrides the groups' batch size for this step. Returns the closure's loss, if any.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.win_counts = torch.zeros(2, dtype=torch.float64)
        for group in self.param_groups:
            buckets: dict[tuple, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Sophia does not support sparse gradients")
                # An FSDP-sharded parameter (DTensor) updates its local shard: the update is elementwise.
                param, grad = local(p), local(p.grad)
                if not param.is_contiguous():
                    raise ValueError(
                        f"Sophia: parameters must be contiguous, got one of shape {tuple(p.shape)} "
                        f"and strides {param.stride()}"
                    )
                state = self._state_for(p)
                lists = buckets.setdefault((p.device, p.dtype), ([], [], [], []))
                lists[0].append(param)
                lists[1].append(grad if grad.is_contiguous() else grad.contiguous())
                lists[2].append(local(state["exp_avg"]))
                lists[3].append(local(state["hessian"]))
            if buckets:
                step_bs = self._batch_size(group, bs)
                beta1, beta2 = group["betas"]
                for params, grads, exp_avgs, hessians in buckets.values():
                    sophia_update(
                        params,
                        grads,
                        exp_avgs,
                        hessians,
                        lr=group["lr"],
                        beta1=beta1,
                        beta2=beta2,
                        rho=group["rho"],
                        bs=step_bs,
                        weight_decay=group["weight_decay"],
                        eps=group["eps"],
                        maximize=group["maximize"],
                        hessian_from_grad=group["estimator"] == "empirical",
                        soul_reference=group["soul_reference"],
                    )
                    if self.track_win_rate:
                        self._count_unclipped(exp_avgs, hessians, group["rho"] * step_bs, group["eps"])
            group["step"] += 1
        return loss

    def _count_unclipped(self, exp_avgs, hessians, scale: float, eps: float) -> None:
        """Add this bucket's moving coordinates (m != 0) and those among them with
        |m| < max(rho * bs * h, eps), whose step was not clipped."""
        for m, h in zip(exp_avgs, hessians):
            size = m.abs()
            self.win_counts[0] += float(((size > 0) & (size < (h * scale).clamp_(min=eps))).sum())
            self.win_counts[1] += float((size > 0).sum())

    def hessian_due(self) -> bool:
        """Whether a ``gnb``/``hutchinson`` group wants :meth:`update_hessian` now.

        True after every k-th ``step()`` (k = ``hessian_interval``), the public Sophia loop's
        ``iter % k == k - 1``: the first k steps run on h = 0, i.e. clipped sign steps.
        """
        return any(
            g["estimator"] != "empirical" and g["step"] > 0 and g["step"] % g["hessian_interval"] == 0
            for g in self.param_groups
        )

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor | None] | None = None, *, reset: bool = False) -> None:
        """h <- beta2 h + (1 - beta2) ĥ for every parameter of the ``gnb``/``hutchinson`` groups.

        ``reset``: h <- ĥ instead, the initial estimate before the first step. Without it the EMA
        starts from h = 0 and reaches ĥ's scale only after ~1/(1 - beta2) refreshes: with the
        default beta2 0.99 and a refresh every 10 steps, far longer than an unlearning run.

        Without ``estimates``: ĥ = p.grad * p.grad (Sophia-G; the caller has just backpropagated
        the loss on labels sampled from the model; parameters without a gradient are skipped).
        With ``estimates``: ĥ is given, one entry per parameter of ``self.param_groups`` in order
        (None skips a parameter), e.g. u*(Hu) for Sophia-H; for ``gnb`` they must already be
        squared gradients. Groups of the ``empirical`` estimator are skipped (their h is updated
        inside ``step()``) and must get None entries.
        """
        groups = self.param_groups
        per_group: list[list] = [[None] * len(g["params"]) for g in groups]
        if estimates is not None:
            estimates = list(estimates)
            n = sum(len(g["params"]) for g in groups)
            if len(estimates) != n:
                raise ValueError(
                    f"update_hessian: got {len(estimates)} estimates for {n} parameters "
                    "(one per parameter of the param groups, None to skip)"
                )
            it = iter(estimates)
            per_group = [[next(it) for _ in g["params"]] for g in groups]
        if all(g["estimator"] == "empirical" for g in groups):
            raise ValueError("update_hessian: the 'empirical' estimator updates h inside step(); nothing to do")
        for group, ests in zip(groups, per_group):
            if group["estimator"] == "empirical":
                if any(e is not None for e in ests):
                    raise ValueError(
                        "update_hessian: got estimates for an 'empirical' group, whose h is "
                        "updated inside step(); pass None for its parameters"
                    )
                continue
            if estimates is None and group["estimator"] == "hutchinson":
                raise ValueError("update_hessian: the 'hutchinson' estimator needs estimates u*(Hu), one per parameter")
            hessians, sources = [], []
            for p, e in zip(group["params"], ests):
                source = p.grad if estimates is None else e
                if source is None:
                    continue
                source = local(source)
                if source.shape != local(p).shape:
                    raise ValueError(
                        f"update_hessian: an estimate of shape {tuple(source.shape)} is for a "
                        f"parameter of shape {tuple(local(p).shape)}"
                    )
                h = local(self._state_for(p)["hessian"])
                hessians.append(h)
                sources.append(source.to(device=h.device, dtype=h.dtype))
            if not hessians:
                continue
            beta2 = 0.0 if reset else group["betas"][1]
            torch._foreach_mul_(hessians, beta2)
            if estimates is None:
                torch._foreach_addcmul_(hessians, sources, sources, value=1 - beta2)
            else:
                torch._foreach_add_(hessians, sources, alpha=1 - beta2)
