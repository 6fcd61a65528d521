"""Inverse-HVP solvers: x = (H + λI)^{-1} b for a finite-sum Hessian H = (1/n) Σ_i H_i.

LLMEraser's update is the minimiser of the quadratic ½ xᵀ(H + λI)x − bᵀx, where H is the mean of
n per-example Hessians available only through products. A :class:`FiniteSumOperator` describes
H: ``hvp_fn(v, indices)`` returns the *mean* of H_i v over the examples ``indices`` (over all n
when ``indices`` is None, i.e. H v). Vectors are flat (``[dim]``, or ``[K, dim]`` for K products
at once), float32 or float64, on any device. Cost is counted in single-example HVPs: a minibatch
of m examples costs m per vector, a full product n.

Methods (:func:`solve` dispatches on ``method``):

* ``"cg"``: conjugate gradient on full-sum products (n per iteration). Negative curvature
  (pᵀ(H+λI)p ≤ 0: the quadratic is unbounded below) raises :class:`NegativeCurvatureError` or,
  with ``on_indefinite="increase_damping"``, raises λ past a Lanczos estimate of −λ_min(H) taken
  from the CG coefficients and restarts. ``preconditioner`` (a fitted curvature): PCG.
* ``"svrg"`` (the default, :data:`DEFAULT_SOLVER`): the stochastic finite-sum solver. SVRG epochs
  (minibatch steps on the correction from the epoch's snapshot with the variance-reduced gradient,
  one product per example), each closed by one full product that gives an exact line search (over
  the span of the last ``memory`` epoch steps) and the exact residual. On the synthetic LoRA-like
  sums of bench/llmeraser_solvers.py (d = 2000): 0.78x, 0.54x, 0.50x CG's HVPs at n = 500, 2000,
  10,000; with a fitted preconditioner PCG needs fewer still (docs/RESULTS.md).
* ``"subsample_fcg"`` (formerly ``"qp"``): deterministic flexible CG whose products
  and line searches use the full sum (every step exactly minimises the true quadratic along its
  direction, and the residual is exact, never an estimate) and whose preconditioner is a
  truncated CG solve of (H_S + λI) z = r on a random subsample S of the examples. The subsample
  resolves the well-sampled, stiff part of the spectrum cheaply; the outer Krylov iteration only
  deals with what it misses. An outer iteration costs ``inner_iters·batch_size + n`` HVPs (about
  2n by default) and several times fewer are needed than CG iterations when the subsample
  covers the curvature (batch_size × rank(H_i) ≳ the effective dimension of H at λ); when it
  does not (few examples, low-rank H_i), progress is slow and the subsample is doubled. On
  synthetic sums with n = 2000 and cond 1e3 (bench/test_solvers.py): 44k HVPs to 1e-3 error
  against CG's 164k with rank-4 H_i, 118k against 164k with rank-1 H_i. For small n (a few
  hundred) CG is as good, and where the subsample covers little (d ≫ n·rank(H_i), the LoRA
  regime) it needs up to 2.2x CG's HVPs (bench/llmeraser_solvers.py).
* ``"lissa"``: the stochastic Neumann series of LiSSA (the influence-function baseline).
* ``"reference_adam"``: the LLMEraser reference code's recipe (Adam on x, 20 steps of batch 1,
  lr 1e-5, the damping as weight decay), for comparison: it barely moves.

Every result reports the relative residual ‖(H+λI)x − b‖/‖b‖ per iteration. CG, SVRG and FCG get it
for free from their own recurrences; LiSSA and the Adam recipe pay full products for it every
``monitor_every`` steps, counted apart (``monitor_hvps``). ``max_hvps`` caps all HVPs of a call.
The per-iteration vector work runs in the fused ops of :mod:`unlearn_fast.ops.solver_update`.
:func:`solve_block` solves for a block of right-hand sides with CG, sharing each batched product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unlearn_fast.ops.solver_update import cg_update, damped_dots, xpay

HvpFn = Callable[[Tensor, Sequence[int] | None], Tensor]
SOLVERS = ("cg", "svrg", "subsample_fcg", "lissa", "reference_adam")
# The default of :func:`solve` and of LLMEraserConfig.solver (and so of the CLI): one place. SVRG
# needs 0.5-0.8x CG's HVPs on the synthetic sums of bench/llmeraser_solvers.py (docs/RESULTS.md).
DEFAULT_SOLVER = "svrg"
# Old names, refused with the new one (one name per method).
RENAMED = {"qp": "subsample_fcg"}
ON_INDEFINITE = ("raise", "increase_damping")

# Damping increases after negative curvature before giving up: each sets λ to twice the
# estimated negative part of the spectrum (and more than doubles it), so a few suffice.
_MAX_DAMPING_INCREASES = 20
# A relative residual past this means the iteration diverged (LiSSA with too small a scale).
_DIVERGED = 1e8
# subsample_fcg doubles its subsample when the residual shrinks by less than this factor per outer
# iteration (geometric mean over the last few): a subsample that covers too little of the
# curvature (few examples, low-rank H_i) makes a weak preconditioner, and at about 2n HVPs per
# outer iteration a factor above 0.8 loses to CG.
_SLOW_RATE, _RATE_WINDOW = 0.8, 3


# ---------------------------------------------------------------------------------------------
# Public types.


@dataclass(frozen=True)
class FiniteSumOperator:
    """H = (1/n) Σ_i H_i on flat vectors of length ``dim``, through ``hvp_fn(v, indices)``.

    ``hvp_fn(v, indices)``: v is ``[dim]`` or ``[K, dim]``; returns the same shape, the mean of
    H_i v over ``indices`` (a sequence of distinct example indices in [0, n)), or over all n
    examples when ``indices`` is None. Only the mean makes minibatch products unbiased
    estimates of H v; the damping λ is not part of the operator.
    """

    n: int
    hvp_fn: HvpFn
    dim: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"FiniteSumOperator: n must be an int >= 1, got {self.n!r}")
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"FiniteSumOperator: dim must be an int >= 1, got {self.dim!r}")
        if not callable(self.hvp_fn):
            raise TypeError("FiniteSumOperator: hvp_fn must be callable")


@dataclass(frozen=True)
class IterationInfo:
    """What a ``callback`` sees after each iteration (return True from it to stop)."""

    iteration: int
    x: Tensor  # the live iterate: clone it to keep it
    relative_residual: float
    hvps_used: int
    damping: float


@dataclass
class SolveResult:
    """The outcome of :func:`solve`.

    ``residual_history[k]``: relative residual after k iterations (entry 0: the start point);
    after a damping increase the entries refer to the new system. ``hvps_history[k]``: the
    solver's HVPs spent by then. ``hvps_used``: the method's own HVPs (power iterations
    included); ``monitor_hvps``: full products spent only to report residuals (LiSSA, Adam).
    ``lambda_min_estimate``: a Ritz value, an upper bound of λ_min(H) from the directions the
    solver explored (None where the method gives none). ``damping``: the λ of the final system
    (larger than asked after ``on_indefinite="increase_damping"`` raised it).
    """

    x: Tensor
    method: str
    damping: float
    converged: bool
    iterations: int
    hvps_used: int
    monitor_hvps: int
    residual_history: list[float] = field(default_factory=list)
    hvps_history: list[int] = field(default_factory=list)
    negative_curvature_detected: bool = False
    lambda_min_estimate: float | None = None

    @property
    def relative_residual(self) -> float:
        return self.residual_history[-1]


class NegativeCurvatureError(RuntimeError):
    """H + λI has a direction of non-positive curvature: the quadratic is unbounded below."""

    def __init__(self, message: str, damping: float, lambda_min_estimate: float | None):
        super().__init__(message)
        self.damping = damping
        self.lambda_min_estimate = lambda_min_estimate


class SolverDivergedError(RuntimeError):
    """The iteration produced non-finite or exploding values."""


# ---------------------------------------------------------------------------------------------
# Shared machinery.


class _Run:
    """One call's bookkeeping: HVP counting against the budget, history, callback."""

    def __init__(
        self,
        op: FiniteSumOperator,
        b: Tensor,
        damping: float,
        max_hvps: int | None,
        callback: Callable[[IterationInfo], bool | None] | None,
    ):
        self.op, self.b, self.damping = op, b, damping
        self.max_hvps, self.callback = max_hvps, callback
        self.b_norm = math.sqrt(float(torch.dot(b.double(), b.double())))
        self.used = self.monitor = self.iterations = 0
        self.history: list[float] = []
        self.hvps_history: list[int] = []
        self.negative_curvature = False
        self.lambda_min: float | None = None

    def fits(self, cost: int) -> bool:
        return self.max_hvps is None or self.used + self.monitor + cost <= self.max_hvps

    def hvp(self, v: Tensor, indices: Sequence[int] | None = None, *, monitor: bool = False) -> Tensor:
        """H v (indices None) or the minibatch mean, counted; checks what hvp_fn returns."""
        out = self.op.hvp_fn(v, indices)
        if not isinstance(out, Tensor) or out.shape != v.shape or out.dtype != v.dtype or out.device != v.device:
            got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(
                f"hvp_fn must return a tensor shaped like v ({tuple(v.shape)} {v.dtype} on {v.device}), got {got}"
            )
        cost = (self.op.n if indices is None else len(indices)) * (v.shape[0] if v.dim() == 2 else 1)
        if monitor:
            self.monitor += cost
        else:
            self.used += cost
        return out.contiguous()

    def relative(self, rr: float) -> float:
        return math.sqrt(max(rr, 0.0)) / self.b_norm

    def record(self, rel: float, x: Tensor, *, initial: bool = False, iterations: int | None = None) -> bool:
        """Appends a residual after one more iteration (or ``iterations`` in all; none if
        ``initial``) and runs the callback. Returns True if the callback asks to stop."""
        if not math.isfinite(rel) or rel > _DIVERGED:
            raise SolverDivergedError(
                f"the relative residual reached {rel:.3g} after {self.iterations} iterations: the iteration "
                "diverged (for lissa: raise scale; check that H + damping*I is positive definite)"
            )
        if iterations is not None:
            self.iterations = iterations
        elif not initial:
            self.iterations += 1
        self.history.append(rel)
        self.hvps_history.append(self.used)
        if self.callback is None or initial:
            return False
        return bool(self.callback(IterationInfo(self.iterations, x, rel, self.used, self.damping)))

    def result(self, x: Tensor, method: str, converged: bool) -> SolveResult:
        return SolveResult(
            x=x,
            method=method,
            damping=self.damping,
            converged=converged,
            iterations=self.iterations,
            hvps_used=self.used,
            monitor_hvps=self.monitor,
            residual_history=self.history,
            hvps_history=self.hvps_history,
            negative_curvature_detected=self.negative_curvature,
            lambda_min_estimate=self.lambda_min,
        )


def _finite_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(value, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_vector(v, op: FiniteSumOperator, name: str, like: Tensor | None = None) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    if v.shape != (op.dim,):
        raise ValueError(f"{name} must be a flat vector of shape ({op.dim},), the operator's dim; got {tuple(v.shape)}")
    if v.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {v.dtype}")
    if like is not None and (v.dtype != like.dtype or v.device != like.device):
        raise TypeError(f"{name} is {v.dtype} on {v.device}, b is {like.dtype} on {like.device}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return v.contiguous()


def _start(run: _Run, x0: Tensor | None) -> tuple[Tensor, Tensor]:
    """x0 (zeros by default) and its residual b − (H+λI)x0 (one full product if x0 is given)."""
    b = run.b
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    return x0.clone(), b - run.hvp(x0) - run.damping * x0


def _ritz(basis: Tensor, images: Tensor) -> Tensor:
    """Ritz values of A on the span of the rows of ``basis`` (``images`` = A applied to them)."""
    v, av = basis.double(), images.double()
    gram = v @ v.T
    proj = v @ av.T
    proj = (proj + proj.T) / 2
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals.max() * 1e-10  # drop directions the basis does not really span
    w = evecs[:, keep] / evals[keep].sqrt()
    return torch.linalg.eigvalsh(w.T @ proj @ w)


def _cg_tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """The Lanczos matrix T_k of A from CG's step sizes α_j and ratios β_j (Saad, §6.7.3)."""
    k = len(alphas)
    t = torch.zeros(k, k, dtype=torch.float64)
    for j in range(k):
        t[j, j] = 1 / alphas[j] + (betas[j - 1] / alphas[j - 1] if j else 0.0)
        if j + 1 < k:
            t[j, j + 1] = t[j + 1, j] = math.sqrt(betas[j]) / alphas[j]
    return t


def _increase_damping(run: _Run, theta_min: float, theta_max: float, method: str, on_indefinite: str) -> None:
    """After negative curvature: raise, or set λ' = 2·|λ̂_min(H)| + 1e-3·λ̂_max(H).

    ``theta_min`` <= 0 and ``theta_max`` are Ritz estimates of the extreme eigenvalues of H + λI,
    so λ̂ = θ − λ. A Ritz value overestimates λ_min, hence the factor 2 on the negative part
    (λ' > 2λ: |λ̂_min(H)| >= λ when θ_min <= 0); the 1e-3·λ̂_max(H) margin keeps the condition
    number of the new system near 1e3 at worst, as in docs/METHODS.md's measurements. Another
    detection under λ' raises λ again.
    """
    lam = run.damping
    run.negative_curvature = True
    run.lambda_min = theta_min - lam
    message = (
        f"{method}: negative curvature found: H + {lam:.3g}*I is not positive definite "
        f"(estimated lambda_min(H) <= {run.lambda_min:.3g}), so the quadratic is unbounded below. "
        "Use damping > |lambda_min(H)|, the Gauss-Newton curvature (PSD), or on_indefinite='increase_damping'."
    )
    if on_indefinite == "raise":
        raise NegativeCurvatureError(message, lam, run.lambda_min)
    new = -2 * run.lambda_min + 1e-3 * max(theta_max - lam, 0.0)
    if not new > lam:  # only if H vanishes along the explored directions
        raise NegativeCurvatureError(message + " (no damping increase can be derived)", lam, run.lambda_min)
    run.damping = new


def check_solver(name: str, what: str = "solver") -> None:
    """A clear error for an unknown solver name (and for a renamed one, with its new name)."""
    if name in RENAMED:
        raise ValueError(
            f"{what} {name!r} was renamed {RENAMED[name]!r} (what it does: deterministic flexible CG with a "
            "subsample preconditioner); pass that name"
        )
    _check_choice(name, SOLVERS, what)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _setup(op, b, damping, tol, max_hvps, x0, callback) -> tuple[_Run, Tensor, Tensor | None, float]:
    """Checks the arguments every method shares; returns the run, b, x0 and tol."""
    if not isinstance(op, FiniteSumOperator):
        raise TypeError(f"op must be a FiniteSumOperator, got {type(op).__name__}")
    b = _check_vector(b, op, "b")
    damping = _finite_float(damping, "damping")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    tol = _finite_float(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    max_hvps = _positive_int(max_hvps, "max_hvps", allow_none=True)
    if x0 is not None:
        x0 = _check_vector(x0, op, "x0", like=b)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if not bool(b.abs().max() > 0):
        raise ValueError("b is zero: the solution is x = 0")
    return _Run(op, b, damping, max_hvps, callback), b, x0, tol


def _with_restarts(
    run: _Run, x0: Tensor | None, method: str, attempt: Callable[[Tensor, Tensor], bool | None]
) -> SolveResult:
    """Runs ``attempt(x, r)`` from x0, again after each damping increase (it returns None then).

    The start point's residual under the new λ is b − (H + λ'I)x0 = r0 − (λ' − λ)x0: no HVP.
    """
    x_start, r_start = _start(run, x0)
    for _ in range(_MAX_DAMPING_INCREASES + 1):
        x, r = x_start.clone(), r_start.clone()
        run.record(run.relative(float(torch.dot(r.double(), r.double()))), x, initial=True)
        damping = run.damping
        outcome = attempt(x, r)
        if outcome is not None:
            return run.result(x, method, outcome)
        r_start = r_start - (run.damping - damping) * x_start
    raise NegativeCurvatureError(
        f"{method}: still indefinite after {_MAX_DAMPING_INCREASES} damping increases", run.damping, run.lambda_min
    )


# ---------------------------------------------------------------------------------------------
# Conjugate gradient.


def _cg_attempt(run: _Run, x: Tensor, r: Tensor, tol: float, max_iters: int, on_indefinite: str) -> bool | None:
    """CG from (x, r) in place. True: converged; False: stopped (budget, iterations, callback);
    None: negative curvature was met and the damping raised (restart)."""
    lam, n = run.damping, run.op.n
    p = r.clone()
    rr = float(torch.dot(r.double(), r.double()))
    alphas: list[float] = []
    betas: list[float] = []
    while True:
        if run.relative(rr) <= tol:
            run.lambda_min = float(torch.linalg.eigvalsh(_cg_tridiagonal(alphas, betas))[0]) - lam if alphas else None
            return True
        if run.iterations >= max_iters or not run.fits(n):
            return False
        q = run.hvp(p)
        pq = float(damped_dots(q, p, None, lam)[0])  # q <- (H + λI) p
        if not math.isfinite(pq):
            raise SolverDivergedError("cg: hvp_fn returned non-finite values")
        if pq <= 0:  # Ritz values of the Lanczos matrix, this step's coefficient included
            rayleigh = pq / float(torch.dot(p.double(), p.double()))
            coefficients = alphas + [rr / pq] if pq < 0 else alphas
            ritz = torch.linalg.eigvalsh(_cg_tridiagonal(coefficients, betas)).tolist() if coefficients else [lam]
            _increase_damping(run, min(rayleigh, ritz[0]), ritz[-1], "cg", on_indefinite)
            return None
        alpha = rr / pq
        rr_new = float(cg_update(x, r, p, q, alpha))
        beta = rr_new / rr
        xpay(p, r, beta)
        alphas.append(alpha)
        betas.append(beta)
        rr = rr_new
        if run.record(run.relative(rr), x):
            return False


def _pcg_attempt(
    run: _Run,
    x: Tensor,
    r: Tensor,
    tol: float,
    max_iters: int,
    on_indefinite: str,
    precondition: Callable[[Tensor], Tensor],
) -> bool | None:
    """Preconditioned CG from (x, r) in place (z = P r, P ≈ (H + λI)⁻¹ symmetric positive definite);
    the residual reported is still ‖r‖/‖b‖ of the true system."""
    lam = run.damping
    z = precondition(r).to(r)
    p = z.clone()
    rz = float(torch.dot(r.double(), z.double()))
    while True:
        rr = float(torch.dot(r.double(), r.double()))
        if run.relative(rr) <= tol:
            return True
        if run.iterations >= max_iters or not run.fits(run.op.n):
            return False
        q = run.hvp(p).add_(p, alpha=lam)
        pq = float(torch.dot(p.double(), q.double()))
        if not math.isfinite(pq):
            raise SolverDivergedError("cg: hvp_fn returned non-finite values")
        if pq <= 0:
            rayleigh = pq / float(torch.dot(p.double(), p.double()))
            _increase_damping(run, rayleigh, rayleigh, "cg", on_indefinite)
            return None
        alpha = rz / pq
        x.add_(p, alpha=alpha)
        r.sub_(q, alpha=alpha)
        z = precondition(r).to(r)
        rz_new = float(torch.dot(r.double(), z.double()))
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
        if run.record(run.relative(float(torch.dot(r.double(), r.double()))), x):
            return False


def solve_cg(
    op: FiniteSumOperator,
    b: Tensor,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    max_iters: int | None = None,
    x0: Tensor | None = None,
    on_indefinite: str = "raise",
    callback: Callable[[IterationInfo], bool | None] | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> SolveResult:
    """Full-sum conjugate gradient: n HVPs per iteration, at most ``max_iters`` (default 10·dim).

    ``preconditioner``: r ↦ P r with P symmetric positive definite, an approximation of
    (H + λI)⁻¹ (e.g. a fitted :mod:`unlearn_fast.curvature` object's ``solve``): preconditioned CG."""
    run, b, x0, tol = _setup(op, b, damping, tol, max_hvps, x0, callback)
    max_iters = _positive_int(10 * op.dim if max_iters is None else max_iters, "max_iters")
    _check_choice(on_indefinite, ON_INDEFINITE, "on_indefinite")
    if preconditioner is not None:
        return _with_restarts(
            run, x0, "cg", lambda x, r: _pcg_attempt(run, x, r, tol, max_iters, on_indefinite, preconditioner)
        )
    return _with_restarts(run, x0, "cg", lambda x, r: _cg_attempt(run, x, r, tol, max_iters, on_indefinite))


# ---------------------------------------------------------------------------------------------
# Several right-hand sides at once.


def solve_block(
    op: FiniteSumOperator,
    rhs: Tensor,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    max_iters: int | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
) -> SolveResult:
    """(H + λI) X = B for a block B [m, dim]: m (preconditioned) CG solves run in lockstep, each
    iteration one batched product ``hvp_fn(P)`` of the k columns not yet at ``tol`` (k·n HVPs), so
    the work that does not depend on the direction (the model's forward pass) is shared.

    Column j's iterates are those of :func:`solve_cg` on B[j] (its own step sizes); ``x``: X [m, dim];
    ``residual_history``: the largest relative residual over the columns. Negative curvature raises
    :class:`NegativeCurvatureError` (no damping increase for a block).
    """
    if not isinstance(rhs, Tensor) or rhs.dim() != 2 or rhs.shape[1] != op.dim or len(rhs) == 0:
        got = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
        raise ValueError(f"solve_block: rhs must be a block [m, {op.dim}] with m >= 1, got {got}")
    if not bool(torch.isfinite(rhs).all()) or bool((rhs.abs().amax(1) == 0).any()):
        raise ValueError("solve_block: rhs has a non-finite entry or a zero row (whose solution is 0)")
    run, _, _, tol = _setup(op, rhs[0], damping, tol, max_hvps, None, callback)  # checks the rest
    max_iters = _positive_int(10 * op.dim if max_iters is None else max_iters, "max_iters")
    precondition = preconditioner if preconditioner is not None else (lambda v: v)
    lam, n = run.damping, op.n
    x, r = torch.zeros_like(rhs), rhs.clone()
    z = precondition(r).to(r)
    p, rz = z.clone(), (r.double() * z.double()).sum(1)
    norms = rhs.double().norm(dim=1)
    relative = r.double().norm(dim=1) / norms
    run.record(float(relative.max()), x, initial=True)
    while True:
        active = (relative > tol).nonzero().squeeze(1)
        if not len(active):
            return run.result(x, "block_cg", True)
        if run.iterations >= max_iters or not run.fits(n * len(active)):
            return run.result(x, "block_cg", False)
        pa = p[active]
        q = run.hvp(pa).add_(pa, alpha=lam)
        pq = (pa.double() * q.double()).sum(1)
        if not bool(torch.isfinite(pq).all()):
            raise SolverDivergedError("block_cg: hvp_fn returned non-finite values")
        if bool((pq <= 0).any()):
            raise NegativeCurvatureError(
                f"block_cg: negative curvature found: H + {lam:.3g}*I is not positive definite; raise the "
                "damping or use the Gauss-Newton curvature (PSD)",
                lam,
                None,
            )
        alpha = (rz[active] / pq).to(x.dtype)[:, None]
        x[active] += alpha * pa
        r[active] -= alpha * q
        z = precondition(r[active]).to(r)
        rz_new = (r[active].double() * z.double()).sum(1)
        p[active] = z + (rz_new / rz[active]).to(p.dtype)[:, None] * pa
        rz[active] = rz_new
        relative[active] = r[active].double().norm(dim=1) / norms[active]
        if run.record(float(relative.max()), x):
            return run.result(x, "block_cg", False)


# ---------------------------------------------------------------------------------------------
# Flexible CG with a subsample preconditioner.


class _Directions:
    """The last ``size`` steps p_j with their exact images (H + λI) p_j and curvatures p_jᵀ(H + λI)p_j."""

    def __init__(self, size: int, like: Tensor):
        self.dirs, self.images = like.new_empty(size, like.numel()), like.new_empty(size, like.numel())
        self.curvatures = torch.empty(size, dtype=torch.float64, device=like.device)
        self.size, self.count = size, 0

    @property
    def stored(self) -> int:
        return min(self.count, self.size)

    def orthogonalise(self, z: Tensor, az: Tensor) -> None:
        """z ← z − Σ c_j p_j, az ← az − Σ c_j (H + λI) p_j: z made A-orthogonal to the stored p_j."""
        k = self.stored
        coef = ((self.images[:k] @ z).double() / self.curvatures[:k]).to(z.dtype)
        z.addmv_(self.dirs[:k].T, coef, alpha=-1)
        az.addmv_(self.images[:k].T, coef, alpha=-1)

    def push(self, p: Tensor, ap: Tensor, pap: float) -> None:
        slot = self.count % self.size
        self.dirs[slot].copy_(p)
        self.images[slot].copy_(ap)
        self.curvatures[slot] = pap
        self.count += 1


class _SubsampleCG:
    """subsample_fcg's preconditioner: ``steps`` CG iterations on (H_S + λI) z = r from z = 0, H_S the
    mean Hessian of the fixed subsample S. Its buffers live across calls.

    If the subsample shows non-positive curvature, the solve stops there and ``negative`` is set;
    the direction stays in ``p`` for the caller to check on the full sum.
    """

    def __init__(self, run: _Run, order: list[int], size: int, steps: int, like: Tensor):
        self.run, self.order, self.steps = run, order, steps
        self.subsample = sorted(order[:size])
        self.s, self.p = torch.empty_like(like), torch.empty_like(like)
        self.alphas: list[float] = []  # the last solve's CG coefficients (its Lanczos matrix)
        self.betas: list[float] = []
        self.negative = False

    def grow(self) -> bool:
        """Doubles the subsample (nested: the next examples of the same permutation); False if
        it already holds every example."""
        size = len(self.subsample)
        self.subsample = sorted(self.order[: min(2 * size, len(self.order))])
        return len(self.subsample) > size

    def ritz_range(self) -> tuple[float, float]:
        """Extreme Ritz values of H_S + λI from the last solve (the negative step included): the
        top estimates λ_max(H + λI) well, the bottom hints at λ_min. (0, 0) if no step."""
        if not self.alphas:
            return 0.0, 0.0
        ritz = torch.linalg.eigvalsh(_cg_tridiagonal(self.alphas, self.betas))
        return float(ritz[0]), float(ritz[-1])

    def __call__(self, z: Tensor, r: Tensor, rr: float, reserve: int) -> None:
        """Writes the approximate solution into z, keeping ``reserve`` HVPs of the budget free."""
        run, lam, s, p = self.run, self.run.damping, self.s, self.p
        z.zero_()
        s.copy_(r)
        p.copy_(r)
        self.alphas, self.betas, self.negative = [], [], False
        for _ in range(self.steps):
            if rr == 0 or not run.fits(reserve + len(self.subsample)):
                break
            q = run.hvp(p, self.subsample)
            pq = float(damped_dots(q, p, None, lam)[0])
            if not pq > 0:  # the subsample's curvature is not positive along p: stop here
                self.negative = True
                if pq < 0:
                    self.alphas.append(rr / pq)
                break
            alpha = rr / pq
            rr_new = float(cg_update(z, s, p, q, alpha))
            xpay(p, s, rr_new / rr)
            self.alphas.append(alpha)
            self.betas.append(rr_new / rr)
            rr = rr_new
        if not self.alphas or self.alphas[0] < 0:  # no usable step: the residual (steepest descent)
            z.copy_(r)


def _fcg_attempt(
    run: _Run,
    x: Tensor,
    r: Tensor,
    tol: float,
    max_iters: int,
    precondition: _SubsampleCG,
    memory: int,
    on_indefinite: str,
) -> bool | None:
    """Flexible CG (A-orthogonalised against the last ``memory`` directions) from (x, r) in place,
    preconditioned by the subsample solve. Return values as for :func:`_cg_attempt`.

    Negative curvature is detected exactly on the full sum: along an outer direction, or along
    the direction where the subsample solve met it (checked with one full product, once per
    attempt: a subsample can be indefinite where H is not).
    """
    lam, n = run.damping, run.op.n
    past = _Directions(memory, x)
    checked = False
    window: list[float] = []  # relative residuals of the last iterations, for the growth rule
    z = torch.empty_like(x)
    rr = float(torch.dot(r.double(), r.double()))

    def indefinite(p: Tensor, ap: Tensor, pap: float, k: int) -> None:
        """Negative curvature along p (ap = (H + λI) p): estimates from the outer Ritz values on
        the stored directions and p, and from the subsample's Lanczos matrix."""
        ritz = _ritz(torch.cat([past.dirs[:k], p[None]]), torch.cat([past.images[:k], ap[None]]))
        sub_min, sub_max = precondition.ritz_range()
        theta_min = min(pap / float(torch.dot(p.double(), p.double())), float(ritz[0]), sub_min)
        _increase_damping(run, theta_min, max(float(ritz[-1]), sub_max), "subsample_fcg", on_indefinite)

    while True:
        if run.relative(rr) <= tol:
            if past.stored:
                k = past.stored
                run.lambda_min = float(_ritz(past.dirs[:k], past.images[:k])[0]) - lam
            return True
        if run.iterations >= max_iters or not run.fits(n):
            return False
        precondition(z, r, rr, reserve=n)
        k = past.stored
        if precondition.negative and not checked and run.fits(2 * n):
            checked = True
            p = precondition.p
            ap = run.hvp(p)
            pap = float(damped_dots(ap, p, None, lam)[0])
            if pap <= 0:
                indefinite(p, ap, pap, k)
                return None
        az = run.hvp(z)
        if not math.isfinite(float(damped_dots(az, z, None, lam)[0])):  # az <- (H + λI) z
            raise SolverDivergedError("subsample_fcg: hvp_fn returned non-finite values")
        if k:  # A-orthogonalise against the stored directions (two passes over the memory)
            past.orthogonalise(z, az)
        paq, pr = (float(v) for v in damped_dots(az, z, r, 0.0))
        if not paq > 0:  # the quadratic is unbounded below along z
            indefinite(z, az, paq, k)
            return None
        rr = float(cg_update(x, r, z, az, pr / paq))
        past.push(z, az, paq)
        if run.record(run.relative(rr), x):
            return False
        window.append(run.history[-1])
        if len(window) > _RATE_WINDOW:
            if (window[-1] / window[0]) ** (1 / _RATE_WINDOW) > _SLOW_RATE and precondition.grow():
                window = window[-1:]
            else:
                window.pop(0)


def solve_subsample_fcg(
    op: FiniteSumOperator,
    b: Tensor,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    max_iters: int = 500,
    batch_size: int | None = None,
    inner_iters: int = 20,
    memory: int = 10,
    seed: int = 0,
    x0: Tensor | None = None,
    on_indefinite: str = "raise",
    callback: Callable[[IterationInfo], bool | None] | None = None,
) -> SolveResult:
    """Deterministic flexible CG preconditioned by a CG solve on a random subsample (module docstring).

    ``batch_size``: initial subsample size (default max(ceil(n/20), min(n, 8))), drawn from
    ``seed`` and doubled (nested) whenever the residual shrank by less than 0.8x per outer
    iteration over the last 3; ``inner_iters``: CG steps of the preconditioner (batch_size HVPs
    each); ``memory``: past directions kept for the A-orthogonalisation (2·memory extra vectors
    of dim); ``max_iters``: outer iterations (n + inner_iters·batch_size HVPs each).
    """
    run, b, x0, tol = _setup(op, b, damping, tol, max_hvps, x0, callback)
    max_iters = _positive_int(max_iters, "max_iters")
    inner_iters = _positive_int(inner_iters, "inner_iters")
    memory = _positive_int(memory, "memory")
    batch_size = _positive_int(max(-(-op.n // 20), min(op.n, 8)) if batch_size is None else batch_size, "batch_size")
    if batch_size > op.n:
        raise ValueError(f"batch_size must be <= n = {op.n}, got {batch_size}")
    _check_choice(on_indefinite, ON_INDEFINITE, "on_indefinite")
    order = torch.randperm(op.n, generator=torch.Generator().manual_seed(seed)).tolist()
    precondition = _SubsampleCG(run, order, batch_size, inner_iters, b)
    return _with_restarts(
        run,
        x0,
        "subsample_fcg",
        lambda x, r: _fcg_attempt(run, x, r, tol, max_iters, precondition, memory, on_indefinite),
    )


# ---------------------------------------------------------------------------------------------
# SVRG: variance-reduced stochastic epochs.


def _svrg_step_size(run: _Run, batches, precondition: Callable[[Tensor], Tensor], probes: int, seed: int) -> float:
    """1 / (2·L̂), L̂ the largest of ``probes`` power estimates (10 iterations each) of λ_max(P (H_B + λI))
    on fresh minibatches B: the stable step of the stochastic iteration (counted as its HVPs)."""
    generator = torch.Generator().manual_seed(seed)
    top = 0.0
    for _ in range(probes):
        batch = next(batches)
        v = torch.randn(run.op.dim, generator=generator, dtype=torch.float64).to(run.b)
        v /= v.norm()
        for _ in range(10):
            q = precondition(run.hvp(v, batch).add_(v, alpha=run.damping))
            estimate = float(q.norm())  # ‖P A_B v‖ with ‖v‖ = 1: tends to λ_max(P A_B)
            v = q / estimate
        top = max(top, estimate)
    return 1 / (2 * top)


def _svrg_attempt(
    run: _Run,
    x: Tensor,
    r: Tensor,
    tol: float,
    max_epochs: int,
    epoch_length: int,
    step: float,
    batches,
    precondition: Callable[[Tensor], Tensor],
    memory_size: int,
    on_indefinite: str,
) -> bool | None:
    """SVRG epochs from (x, r) in place. Return values as for :func:`_cg_attempt`.

    An epoch's snapshot is x, whose full gradient is −r (known). From δ = 0 it takes
    ``epoch_length`` steps δ ← δ − η P g on fresh minibatches B with the variance-reduced gradient
    g = ∇f_B(x + δ) − ∇f_B(x) + ∇f(x) = (H_B + λI) δ − r: one product per example (the quadratic
    is linear in δ), and g → 0 as δ → the exact correction, so no noise floor. Then one full
    product (H + λI) δ gives the exact line search x ← x + αδ and the exact new residual.
    """
    lam, n = run.damping, run.op.n
    delta = torch.empty_like(x)
    memory = _Directions(memory_size, x)
    rr = float(torch.dot(r.double(), r.double()))
    while True:
        if run.relative(rr) <= tol:
            return True
        if run.iterations >= max_epochs or not run.fits(n):
            return False
        delta.zero_()
        for _ in range(epoch_length):
            batch = next(batches)
            if not run.fits(n + len(batch)):
                break
            g = run.hvp(delta, batch).add_(delta, alpha=lam).sub_(r)  # the variance-reduced gradient
            delta.sub_(precondition(g).to(delta), alpha=step)
        ad = run.hvp(delta)
        dad, dr = (float(v) for v in damped_dots(ad, delta, r, lam))  # ad <- (H + λI) δ
        if not math.isfinite(dad):
            raise SolverDivergedError("svrg: the iterate is not finite (hvp_fn or the step size)")
        if not dad > 0:  # the quadratic is unbounded below along δ
            rayleigh = dad / float(torch.dot(delta.double(), delta.double()))
            _increase_damping(run, rayleigh, 1 / step, "svrg", on_indefinite)
            return None
        if memory.stored:  # A-orthogonal to the last epochs' steps: exact minimisation over their span
            memory.orthogonalise(delta, ad)
            dad, dr = (float(v) for v in damped_dots(ad, delta, r, 0.0))
        rr = float(cg_update(x, r, delta, ad, dr / dad))
        memory.push(delta, ad, dad)
        if run.record(run.relative(rr), x):
            return False


def solve_svrg(
    op: FiniteSumOperator,
    b: Tensor,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    max_iters: int = 1000,
    batch_size: int | None = None,
    epoch_length: int | None = None,
    step_size: float | None = None,
    probes: int = 3,
    memory: int = 10,
    seed: int = 0,
    x0: Tensor | None = None,
    on_indefinite: str = "raise",
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
) -> SolveResult:
    """SVRG (Johnson & Zhang, 2013) on the quadratic, each epoch closed by an exact line search
    (:func:`_svrg_attempt`); ``preconditioner`` P ≈ (H + λI)⁻¹ (a fitted curvature's ``solve``)
    scales the stochastic steps. An epoch costs ``epoch_length·batch_size + n`` HVPs.

    ``batch_size``: minibatch (default max(1, n // 200)); ``epoch_length``: steps per epoch
    (default n // batch_size: one pass); ``step_size``: η (default 1/(2 L̂), L̂ from ``probes``
    minibatch power estimates, counted in hvps_used); ``memory``: past epoch steps the line search
    is A-orthogonalised against (1: plain SVRG with a line search); ``max_iters``: epochs;
    ``seed``: the minibatches. The residual recorded per epoch is exact. With a preconditioner,
    use larger minibatches (n/20 measured best): P(H_B + λI) of a small B has a large top
    eigenvalue, hence a small step.
    """
    run, b, x0, tol = _setup(op, b, damping, tol, max_hvps, x0, callback)
    max_iters = _positive_int(max_iters, "max_iters")
    batch_size = _positive_int(max(1, op.n // 200) if batch_size is None else batch_size, "batch_size")
    if batch_size > op.n:
        raise ValueError(f"batch_size must be <= n = {op.n}, got {batch_size}")
    epoch_length = _positive_int(max(1, op.n // batch_size) if epoch_length is None else epoch_length, "epoch_length")
    memory = _positive_int(memory, "memory")
    _check_choice(on_indefinite, ON_INDEFINITE, "on_indefinite")
    precondition = preconditioner if preconditioner is not None else (lambda v: v)
    batches = _minibatches(op, batch_size, seed)
    if step_size is None:
        step_size = _svrg_step_size(run, batches, precondition, _positive_int(probes, "probes"), seed)
    step_size = _finite_float(step_size, "step_size")
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    return _with_restarts(
        run,
        x0,
        "svrg",
        lambda x, r: _svrg_attempt(
            run, x, r, tol, max_iters, epoch_length, step_size, batches, precondition, memory, on_indefinite
        ),
    )


# ---------------------------------------------------------------------------------------------
# Stochastic baselines: LiSSA and the LLMEraser reference recipe.


def _monitor(run: _Run, x: Tensor) -> float:
    """The exact relative residual of x, from one full product counted as monitoring."""
    q = run.hvp(x, monitor=True)
    damped_dots(q, x, None, run.damping)  # q <- (H + λI) x
    xpay(q, run.b, -1.0)  # q <- b − q
    return run.relative(float(torch.dot(q.double(), q.double())))


def _minibatches(op: FiniteSumOperator, batch_size: int, seed: int):
    """Endless minibatches: passes over a fresh permutation of the examples (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(op.n, generator=generator).tolist()
        for start in range(0, op.n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _power_lambda_max(run: _Run, iters: int, seed: int) -> float:
    """λ_max(H + λI) by ``iters`` full-sum power iterations (counted as the method's HVPs)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(run.op.dim, generator=generator, dtype=torch.float64).to(run.b)
    v /= v.norm()
    estimate = 0.0
    for _ in range(iters):
        q = run.hvp(v)
        estimate = float(damped_dots(q, v, None, run.damping)[0])  # Rayleigh quotient, ‖v‖ = 1
        v = q / q.norm()
    return estimate


def _monitor_every(value: int | None, op: FiniteSumOperator, batch_size: int) -> int:
    """Default: every 10 passes over the data, so that monitoring costs ~10% of the solve."""
    return _positive_int(max(1, 10 * op.n // batch_size) if value is None else value, "monitor_every")


def solve_lissa(
    op: FiniteSumOperator,
    b: Tensor,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    max_iters: int = 10_000,
    batch_size: int = 1,
    scale: float | None = None,
    power_iters: int = 20,
    seed: int = 0,
    monitor_every: int | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
) -> SolveResult:
    """LiSSA: v_j = b + (I − (H_{S_j} + λI)/scale) v_{j−1}, x = v/scale (Agarwal et al., 2017).

    A stochastic Neumann series for (H+λI)^{-1}b, i.e. SGD with step 1/scale on the quadratic;
    converges if scale exceeds the spectral radius of the minibatch operators H_S + λI, at a
    rate 1 − λ_min(H+λI)/scale per step, down to a noise floor set by ``batch_size``. ``scale``:
    default 2·λ_max(H+λI) from ``power_iters`` full power iterations (counted in hvps_used); raise
    it if the iteration diverges (SolverDivergedError) with small minibatches. ``max_iters``: the
    depth; the residual is checked (one monitored full product) every ``monitor_every`` steps
    and at the end; the iteration stops there once it is <= tol.
    """
    run, b, _, tol = _setup(op, b, damping, tol, max_hvps, None, callback)
    max_iters = _positive_int(max_iters, "max_iters")
    batch_size = _positive_int(batch_size, "batch_size")
    if batch_size > op.n:
        raise ValueError(f"batch_size must be <= n = {op.n}, got {batch_size}")
    monitor_every = _monitor_every(monitor_every, op, batch_size)
    if scale is None:
        power_iters = _positive_int(power_iters, "power_iters")
        if not run.fits((power_iters + 1) * op.n):
            raise ValueError(
                f"max_hvps={max_hvps} does not cover the {power_iters} power iterations that estimate "
                "the scale (n HVPs each) and one residual check; pass scale or raise max_hvps"
            )
        scale = 2 * _power_lambda_max(run, power_iters, seed)
    scale = _finite_float(scale, "scale")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    v = torch.zeros_like(b)
    run.record(1.0, v, initial=True)
    batches = _minibatches(op, batch_size, seed)
    step, rel = 0, 1.0
    while step < max_iters and run.fits(batch_size + op.n):  # keep room for a final check
        # q <- H_S v + (λ − scale) v, then v <- b − q/scale = b + v − (H_S + λI) v / scale.
        q = run.hvp(v, next(batches))
        damped_dots(q, v, None, damping - scale)
        xpay(q, b, -1.0 / scale)
        v, step = q, step + 1
        if step % monitor_every == 0 or step == max_iters:
            rel = _monitor(run, v / scale)
            if run.record(rel, v / scale, iterations=step) or rel <= tol:
                break
    x = v / scale
    if step % monitor_every and step < max_iters:  # stopped by the budget between two checks
        rel = _monitor(run, x)
        run.record(rel, x, iterations=step)
    return run.result(x, "lissa", rel <= tol)


def solve_reference_adam(
    op: FiniteSumOperator,
    b: Tensor,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    max_iters: int = 20,
    batch_size: int = 1,
    lr: float = 1e-5,
    seed: int = 0,
    monitor_every: int | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
) -> SolveResult:
    """The LLMEraser reference recipe: Adam on x from 0 with the gradient (H_S + λI)x − b of the
    quadratic on minibatches of ``batch_size`` (λ is the reference's weight decay, 1e-5 there),
    ``max_iters`` steps, no convergence check of its own. The residual is monitored (one full
    product) every ``monitor_every`` steps (default: only at the end)."""
    run, b, _, tol = _setup(op, b, damping, tol, max_hvps, None, callback)
    max_iters = _positive_int(max_iters, "max_iters")
    batch_size = _positive_int(batch_size, "batch_size")
    if batch_size > op.n:
        raise ValueError(f"batch_size must be <= n = {op.n}, got {batch_size}")
    lr = _finite_float(lr, "lr")
    monitor_every = _positive_int(max_iters if monitor_every is None else monitor_every, "monitor_every")
    x = torch.zeros_like(b, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=lr, weight_decay=damping)  # decay adds λx: the damped gradient
    run.record(1.0, x.detach(), initial=True)
    batches = _minibatches(op, batch_size, seed)
    step, rel = 0, 1.0
    while step < max_iters and run.fits(batch_size + op.n):
        x.grad = run.hvp(x.detach(), next(batches)) - b
        optimizer.step()
        step += 1
        if step % monitor_every == 0 or step == max_iters:
            rel = _monitor(run, x.detach())
            if run.record(rel, x.detach(), iterations=step) or rel <= tol:
                break
    if step % monitor_every and step < max_iters:
        rel = _monitor(run, x.detach())
        run.record(rel, x.detach(), iterations=step)
    return run.result(x.detach(), "reference_adam", rel <= tol)


_SOLVERS = {
    "cg": solve_cg,
    "svrg": solve_svrg,
    "subsample_fcg": solve_subsample_fcg,
    "lissa": solve_lissa,
    "reference_adam": solve_reference_adam,
}


def solve(
    op: FiniteSumOperator,
    b: Tensor,
    method: str = DEFAULT_SOLVER,
    *,
    damping: float,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
    **options,
) -> SolveResult:
    """Solve (H + damping·I) x = b for the finite sum ``op`` with ``method`` (module docstring).

    ``options`` go to the method: :func:`solve_svrg` (batch_size, epoch_length, step_size, probes,
    memory, seed, max_iters, x0, on_indefinite, preconditioner), :func:`solve_subsample_fcg`
    (batch_size, inner_iters, memory, seed, max_iters, x0, on_indefinite), :func:`solve_cg` (max_iters, x0, on_indefinite, preconditioner),
    :func:`solve_lissa` (max_iters, batch_size, scale, power_iters, seed, monitor_every),
    :func:`solve_reference_adam` (max_iters, batch_size, lr, seed, monitor_every).
    """
    check_solver(method, "method")
    return _SOLVERS[method](op, b, damping=damping, tol=tol, max_hvps=max_hvps, callback=callback, **options)


# ---------------------------------------------------------------------------------------------
# Operators of real models.


def flatten_vectors(tree: Mapping[str, Tensor]) -> Tensor:
    """Concatenates a dict of tensors (parameters, gradients) into one flat vector, in order."""
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten_vector(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`flatten_vectors` (views of ``flat``, or of each row if [K, dim])."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[..., start : start + t.numel()].reshape(*flat.shape[:-1], *t.shape)
        start += t.numel()
    if start != flat.shape[-1]:
        raise ValueError(f"the flat vector has {flat.shape[-1]} entries, the parameters {start}")
    return out


def finite_sum_operator(
    losses: Sequence[Callable[[dict[str, Tensor]], Tensor]],
    params: Mapping[str, Tensor],
    *,
    curvature: str = "hessian",
    method: str = "auto",
) -> FiniteSumOperator:
    """The operator of n per-example losses (e.g. from :func:`unlearn_fast.hvp.make_loss_fn`, one
    batch per example) at ``params``, on vectors flattened by :func:`flatten_vectors`.

    A minibatch product runs :func:`unlearn_fast.hvp.hvp` once per example, K directions batched;
    ``curvature`` ("hessian" | "gauss_newton") and ``method`` are passed to it.
    """
    from unlearn_fast.hvp import hvp

    losses = list(losses)
    if not losses:
        raise ValueError("finite_sum_operator needs at least one loss")
    params = dict(params)
    dim = sum(t.numel() for t in params.values())

    def hvp_fn(v: Tensor, indices: Sequence[int] | None) -> Tensor:
        chosen = range(len(losses)) if indices is None else indices
        vectors = unflatten_vector(v, params)
        total = torch.zeros_like(v)
        for i in chosen:
            total += flatten_batched(hvp(losses[i], params, vectors, curvature=curvature, method=method), v.dim())
        return total / len(chosen)

    def flatten_batched(tree: dict[str, Tensor], ndim: int) -> Tensor:
        return torch.cat([t.reshape(*t.shape[: ndim - 1], -1) for t in tree.values()], -1)

    return FiniteSumOperator(n=len(losses), hvp_fn=hvp_fn, dim=dim)
