"""Inverse-HVP solvers against dense solves of (H + λI) x = b on synthetic finite sums and a tiny
LoRA model (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast.backend import select_backend, use_backend
from unlearn_fast.hvp import make_loss_fn
from unlearn_fast.models import hvp_safe
from unlearn_fast.ops import solver_update
from unlearn_fast.solvers import (
    DEFAULT_SOLVER,
    SOLVERS,
    FiniteSumOperator,
    NegativeCurvatureError,
    SolverDivergedError,
    finite_sum_operator,
    flatten_vectors,
    solve,
    solve_block,
    unflatten_vector,
)

DT = torch.float64


class FiniteSum:
    """H_i = A_iᵀA_i − shift·I with A_i [rank, d] Gaussian rows scaled so that E[H_i] has the
    eigenvalues ``spectrum`` (log-spaced from 1 to ``low``) in a random basis. A counting hvp_fn."""

    def __init__(self, n, d, rank=4, low=1e-4, shift=0.0, seed=0, dtype=DT):
        g = torch.Generator().manual_seed(seed)
        spectrum = torch.logspace(0, math.log10(low), d, dtype=DT)
        basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
        rows = torch.randn(n, rank, d, generator=g, dtype=DT) / math.sqrt(rank)
        self.a = (rows * spectrum.sqrt() @ basis.T).to(dtype)
        self.n, self.d, self.shift = n, d, shift
        gram = torch.einsum("nri,nrj->ij", self.a.double(), self.a.double())
        self.hessian = gram / n - shift * torch.eye(d, dtype=DT)
        self.eigenvalues = torch.linalg.eigvalsh(self.hessian)
        self.b = torch.randn(d, generator=g, dtype=DT).to(dtype)
        self.calls = self.examples = 0

    def hvp_fn(self, v, indices):
        self.calls += 1
        a = self.a if indices is None else self.a[list(indices)]
        self.examples += a.shape[0] * (v.shape[0] if v.dim() == 2 else 1)
        return torch.einsum("nri,...nr->...i", a, torch.einsum("nrj,...j->...nr", a, v)) / a.shape[0] - self.shift * v

    @property
    def op(self):
        return FiniteSumOperator(self.n, self.hvp_fn, self.d)

    def damping_for(self, cond):
        """λ giving H + λI the condition number ``cond`` (H PSD or not)."""
        lo, hi = self.eigenvalues[0].item(), self.eigenvalues[-1].item()
        return (hi - cond * lo) / (cond - 1)

    def exact(self, damping, b=None):
        b = self.b if b is None else b
        return torch.linalg.solve(self.hessian + damping * torch.eye(self.d, dtype=DT), b.double())

    def relative_error(self, x, damping):
        want = self.exact(damping)
        return ((x.double() - want).norm() / want.norm()).item()

    def relative_residual(self, x, damping):
        x = x.double()
        return ((self.hessian @ x + damping * x - self.b.double()).norm() / self.b.double().norm()).item()


@pytest.fixture(scope="module")
def problem():
    return FiniteSum(n=400, d=120, rank=4, seed=1)


# ---------------------------------------------------------------------------------------------
# Accuracy against the dense solve (cond ~1e3).


@pytest.mark.parametrize("method", ["cg", "subsample_fcg"])
def test_reaches_1e3_relative_error_against_dense_solve(problem, method):
    lam = problem.damping_for(1e3)
    result = solve(problem.op, problem.b, method, damping=lam, tol=1e-5)
    assert result.converged and result.residual_history[-1] <= 1e-5
    assert problem.relative_error(result.x, lam) <= 1e-3
    # The reported residual is the true one (recurrences checked against a dense product).
    assert result.residual_history[-1] == pytest.approx(problem.relative_residual(result.x, lam), rel=1e-3, abs=1e-9)
    assert not result.negative_curvature_detected
    # A Ritz value: an upper bound of λ_min(H) (CG's Lanczos estimate is tight).
    assert result.lambda_min_estimate >= problem.eigenvalues[0].item() - 1e-9
    if method == "cg":
        assert result.lambda_min_estimate == pytest.approx(problem.eigenvalues[0].item(), rel=0.2, abs=1e-5)


def test_subsample_fcg_needs_fewer_hvps_than_cg_for_large_n():
    prob = FiniteSum(n=500, d=100, rank=4, seed=2)
    lam = prob.damping_for(1e3)
    cg = solve(prob.op, prob.b, "cg", damping=lam, tol=1e-5)
    fcg = solve(prob.op, prob.b, "subsample_fcg", damping=lam, tol=1e-5)
    assert cg.converged and fcg.converged
    assert fcg.hvps_used < 0.75 * cg.hvps_used, (fcg.hvps_used, cg.hvps_used)
    assert prob.relative_error(fcg.x, lam) <= 1e-3


@pytest.mark.parametrize("n,d", [(50, 50), (200, 300)])
def test_subsample_fcg_small_and_wide_problems(n, d):
    prob = FiniteSum(n=n, d=d, rank=2, seed=3)
    lam = prob.damping_for(1e3)
    result = solve(prob.op, prob.b, "subsample_fcg", damping=lam, tol=1e-6)
    assert result.converged and prob.relative_error(result.x, lam) <= 1e-3


def test_subsample_fcg_grows_a_subsample_that_covers_too_little():
    """Rank-one H_i and 4 examples in the subsample: a weak preconditioner, doubled until it works."""
    prob = FiniteSum(n=300, d=100, rank=1, seed=9)
    lam = prob.damping_for(1e3)
    result = solve(prob.op, prob.b, "subsample_fcg", damping=lam, tol=1e-6, batch_size=4, inner_iters=10)
    assert result.converged and prob.relative_error(result.x, lam) <= 1e-3
    inner = [b - a - prob.n for a, b in zip(result.hvps_history, result.hvps_history[1:])]
    assert inner[-1] > 4 * inner[0]  # the preconditioner's cost per iteration grew


@pytest.mark.parametrize("method", ["cg", "subsample_fcg"])
def test_float32(method):
    prob = FiniteSum(n=200, d=80, rank=4, seed=4, dtype=torch.float32)
    lam = prob.damping_for(1e2)
    result = solve(prob.op, prob.b, method, damping=lam, tol=1e-4)
    assert result.x.dtype == torch.float32 and result.converged
    assert prob.relative_error(result.x, lam) <= 1e-3


def test_lissa_converges_on_a_well_conditioned_problem():
    prob = FiniteSum(n=200, d=40, rank=32, low=0.1, seed=5)
    lam = 0.02 * prob.eigenvalues[-1].item()
    result = solve(prob.op, prob.b, "lissa", damping=lam, tol=5e-2, batch_size=50, max_iters=3000, monitor_every=50)
    assert result.converged and result.residual_history[-1] <= 5e-2
    assert prob.relative_error(result.x, lam) <= 5e-2
    assert result.monitor_hvps == prob.n * (len(result.residual_history) - 1)  # one full product per check
    # 20 power iterations for the scale, then the steps of 20 examples.
    assert result.hvps_used == 20 * prob.n + 50 * result.iterations


def test_lissa_with_too_small_a_scale_raises():
    prob = FiniteSum(n=100, d=30, rank=4, low=0.1, seed=6)
    with pytest.raises(SolverDivergedError, match="raise scale"):
        solve(
            prob.op,
            prob.b,
            "lissa",
            damping=0.01,
            scale=0.2 * prob.eigenvalues[-1].item(),
            max_iters=2000,
            monitor_every=100,
            batch_size=10,
        )


def test_reference_adam_barely_moves(problem):
    lam = 1e-5
    result = solve(problem.op, problem.b, "reference_adam", damping=lam)
    assert result.iterations == 20 and result.hvps_used == 20 and not result.converged
    assert result.residual_history[-1] > 0.9  # METHODS.md: 0.99 on the real model


# ---------------------------------------------------------------------------------------------
# Indefinite Hessians.


@pytest.fixture(scope="module")
def indefinite():
    prob = FiniteSum(n=150, d=60, rank=6, low=1e-3, shift=0.02, seed=7)
    assert prob.eigenvalues[0] < -0.01
    return prob


@pytest.mark.parametrize("method", ["cg", "subsample_fcg"])
def test_indefinite_raises(indefinite, method):
    lam = 1e-3 * indefinite.eigenvalues[-1].item()  # still indefinite, as in METHODS.md
    with pytest.raises(NegativeCurvatureError, match="not positive definite") as info:
        solve(indefinite.op, indefinite.b, method, damping=lam)
    assert info.value.damping == lam
    # A Ritz value: between the true λ_min(H) and 0.
    assert indefinite.eigenvalues[0].item() - 1e-9 <= info.value.lambda_min_estimate < 0


@pytest.mark.parametrize("method", ["cg", "subsample_fcg"])
def test_indefinite_increase_damping(indefinite, method):
    lam = 1e-3 * indefinite.eigenvalues[-1].item()
    result = solve(indefinite.op, indefinite.b, method, damping=lam, tol=1e-6, on_indefinite="increase_damping")
    assert result.negative_curvature_detected and result.converged
    assert result.damping > -indefinite.eigenvalues[0].item() > lam  # now positive definite
    assert result.lambda_min_estimate < 0
    assert indefinite.relative_error(result.x, result.damping) <= 1e-4  # the solution of the damped system


def test_lissa_on_indefinite_diverges_loudly(indefinite):
    with pytest.raises(SolverDivergedError):
        solve(indefinite.op, indefinite.b, "lissa", damping=0.0, batch_size=30, max_iters=20000, monitor_every=200)


# ---------------------------------------------------------------------------------------------
# Accounting, budget, stopping, determinism.


@pytest.mark.parametrize(
    "method,options",
    [
        ("cg", {}),
        ("subsample_fcg", {"batch_size": 17, "inner_iters": 5}),
        ("lissa", {"batch_size": 8, "max_iters": 300, "monitor_every": 100}),
        ("reference_adam", {"monitor_every": 5}),
    ],
)
def test_hvp_accounting_is_exact(method, options):
    prob = FiniteSum(n=90, d=40, seed=8)
    result = solve(prob.op, prob.b, method, damping=prob.damping_for(100), tol=1e-6, **options)
    assert result.hvps_used + result.monitor_hvps == prob.examples
    assert len(result.hvps_history) == len(result.residual_history)
    assert result.hvps_history == sorted(result.hvps_history) and result.hvps_history[-1] == result.hvps_used
    if method in ("cg", "subsample_fcg"):  # one history entry per iteration (LiSSA, Adam: per residual check)
        assert len(result.residual_history) == result.iterations + 1
    if method == "cg":
        assert result.hvps_used == prob.n * result.iterations and prob.calls == result.iterations
        assert result.monitor_hvps == 0


def test_x0_costs_one_full_product_and_warm_starts(problem):
    lam = problem.damping_for(100)
    cold = solve(problem.op, problem.b, "cg", damping=lam, tol=1e-8)
    before = problem.examples
    warm = solve(problem.op, problem.b, "cg", damping=lam, tol=1e-6, x0=cold.x)
    assert warm.iterations == 0 and warm.converged and warm.hvps_used == problem.n
    assert problem.examples - before == problem.n
    torch.testing.assert_close(warm.x, cold.x)


@pytest.mark.parametrize(
    "method,options", [("cg", {}), ("subsample_fcg", {}), ("lissa", {"scale": 2.0, "batch_size": 9})]
)
def test_budget_is_respected(problem, method, options):
    budget = 5 * problem.n + 7
    before = problem.examples
    result = solve(
        problem.op, problem.b, method, damping=problem.damping_for(1e3), tol=1e-8, max_hvps=budget, **options
    )
    assert not result.converged
    assert problem.examples - before == result.hvps_used + result.monitor_hvps <= budget
    assert result.hvps_used + result.monitor_hvps > budget - problem.n - 64  # and it is used


@pytest.mark.parametrize("method", ["cg", "subsample_fcg"])
def test_stops_at_tolerance(problem, method):
    result = solve(problem.op, problem.b, method, damping=problem.damping_for(1e3), tol=1e-2)
    history = result.residual_history
    assert result.converged and history[-1] <= 1e-2 < min(history[:-1])
    assert history[0] == 1.0 and len(history) == result.iterations + 1


def test_callback_sees_each_iteration_and_can_stop(problem):
    seen = []

    def callback(info):
        seen.append((info.iteration, info.relative_residual, info.hvps_used))
        return info.iteration == 3

    result = solve(problem.op, problem.b, "subsample_fcg", damping=problem.damping_for(1e3), callback=callback)
    assert [s[0] for s in seen] == [1, 2, 3] and result.iterations == 3 and not result.converged
    assert [s[1] for s in seen] == result.residual_history[1:]
    assert [s[2] for s in seen] == result.hvps_history[1:]


@pytest.mark.parametrize("method", ["subsample_fcg", "lissa"])
def test_deterministic_given_seed(problem, method):
    options = dict(damping=problem.damping_for(1e3), tol=1e-4, max_hvps=20 * problem.n)
    if method == "lissa":
        options.update(batch_size=10, max_iters=500, power_iters=5)
    first = solve(problem.op, problem.b, method, seed=3, **options)
    again = solve(problem.op, problem.b, method, seed=3, **options)
    other = solve(problem.op, problem.b, method, seed=4, **options)
    assert torch.equal(first.x, again.x) and first.residual_history == again.residual_history
    assert not torch.equal(first.x, other.x)


def test_solvers_run_the_fused_ops_not_the_reference(problem, monkeypatch):
    def forbidden(*args):
        raise AssertionError("the solver called the unfused reference")

    for name in ("reference_cg_update", "reference_damped_dots", "reference_xpay"):
        monkeypatch.setattr(solver_update, name, forbidden)
    assert select_backend("solver_cg_update", torch.device("cpu")) == "cpp"
    for method in ("cg", "subsample_fcg"):
        assert solve(problem.op, problem.b, method, damping=problem.damping_for(100), tol=1e-4).converged


# ---------------------------------------------------------------------------------------------
# Errors.


def test_bad_inputs(problem):
    op, b = problem.op, problem.b
    with pytest.raises(ValueError, match=r"shape \(120,\)"):
        solve(op, b[:-1], damping=0.1)
    with pytest.raises(ValueError, match=r"shape \(120,\)"):
        solve(op, b[None], damping=0.1)
    with pytest.raises(ValueError, match="NaN"):
        solve(op, torch.full_like(b, float("nan")), damping=0.1)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        solve(op, b, damping=-1e-3)
    with pytest.raises(ValueError, match="damping must be a finite"):
        solve(op, b, damping=float("inf"))
    for tol in (0.0, -1.0):
        with pytest.raises(ValueError, match="tol must be > 0"):
            solve(op, b, damping=0.1, tol=tol)
    with pytest.raises(ValueError, match="method must be one of"):
        solve(op, b, "newton", damping=0.1)
    with pytest.raises(ValueError, match="on_indefinite must be one of"):
        solve(op, b, "cg", damping=0.1, on_indefinite="ignore")
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
        solve(op, b, "cg", damping=0.1, scale=2.0)
    with pytest.raises(ValueError, match="batch_size must be <= n"):
        solve(op, b, "subsample_fcg", damping=0.1, batch_size=problem.n + 1)
    with pytest.raises(ValueError, match="max_hvps must be an int >= 1"):
        solve(op, b, damping=0.1, max_hvps=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        solve(op, b.half(), damping=0.1)
    with pytest.raises(TypeError, match="x0 is torch.float32"):
        solve(op, b, damping=0.1, x0=b.float())
    with pytest.raises(ValueError, match="b is zero"):
        solve(op, torch.zeros_like(b), damping=0.1)
    with pytest.raises(TypeError, match="FiniteSumOperator"):
        solve(problem.hvp_fn, b, damping=0.1)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        FiniteSumOperator(0, problem.hvp_fn, 120)
    bad = FiniteSumOperator(problem.n, lambda v, idx: v[:-1], problem.d)
    with pytest.raises(TypeError, match="hvp_fn must return a tensor shaped like v"):
        solve(bad, b, "cg", damping=0.1)
    nan = FiniteSumOperator(problem.n, lambda v, idx: v * float("nan"), problem.d)
    with pytest.raises(SolverDivergedError, match="non-finite"):
        solve(nan, b, "cg", damping=0.1)


# ---------------------------------------------------------------------------------------------
# A real model: LoRA adapters of a tiny Llama, exact per-example Hessians.


def test_subsample_fcg_on_a_tiny_lora_model_matches_the_dense_solve():
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config).to(DT).eval(),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    for name, p in model.named_parameters():  # off B = 0, where the Hessian is degenerate
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    n = 8
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 23, (1, 7), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "labels": labels})
    with hvp_safe(model), use_backend("reference"):
        losses, params = zip(*(make_loss_fn(model, batch) for batch in batches))
        params = params[0]
        dim = sum(p.numel() for p in params.values())
        assert 200 <= dim <= 400 and all("lora_" in name for name in params)
        op = finite_sum_operator(losses, params, method="double_backward")  # the fastest here
        flat = flatten_vectors(params)

        def mean_loss(v):
            ps = unflatten_vector(v, params)
            return sum(loss(ps) for loss in losses) / n

        hessian = torch.autograd.functional.hessian(mean_loss, flat, vectorize=True)
        # b: the removal gradient of LLMEraser's IR task for the first two examples.
        b = flatten_vectors(torch.func.grad(lambda ps: losses[0](ps) + losses[1](ps))(params)) / n
        eigenvalues = torch.linalg.eigvalsh(hessian)
        lam = max(-eigenvalues[0].item(), 0.0) + 1e-3 * eigenvalues[-1].item()  # cond ~1e3 at most
        # The operator's full product is the dense Hessian's (RMSNorm and RoPE of transformers
        # compute in float32 even in a float64 model: ~1e-6 relative).
        v = torch.randn(dim, generator=g, dtype=DT)
        assert (op.hvp_fn(v, None) - hessian @ v).norm() <= 1e-5 * (hessian @ v).norm()
        pair = torch.stack([v, b])  # K = 2 directions at once, on a minibatch
        torch.testing.assert_close(op.hvp_fn(pair, [1, 5]), torch.stack([op.hvp_fn(u, [1, 5]) for u in pair]))
        result = solve(op, b, "subsample_fcg", damping=lam, tol=1e-6, batch_size=3, inner_iters=6)
    want = torch.linalg.solve(hessian + lam * torch.eye(dim, dtype=DT), b)
    assert result.converged
    assert ((result.x - want).norm() / want.norm()).item() <= 1e-3


# ---------------------------------------------------------------------------------------------
# SVRG, the block solve, the renamed solver.


def test_svrg_converges_to_the_dense_solve():
    # Its variance-reduced gradient (H_B + λI)δ − r vanishes at the exact correction, so the
    # epochs converge linearly with no noise floor: 1e-8 within 60 passes (measured: ~25).
    prob = FiniteSum(n=400, d=60, rank=2, seed=3)
    lam = prob.damping_for(1e2)
    result = solve(prob.op, prob.b, "svrg", damping=lam, tol=1e-8, max_hvps=60 * prob.n, batch_size=2, memory=1)
    assert result.converged, result.residual_history[-5:]
    assert prob.relative_error(result.x, lam) <= 1e-6
    assert result.hvps_used == prob.examples  # every per-example product counted (power estimates too)


def test_svrg_with_a_preconditioner_and_memory():
    prob = FiniteSum(n=300, d=80, rank=3, seed=4)
    lam = prob.damping_for(1e3)
    dense = torch.linalg.cholesky(prob.hessian + lam * torch.eye(prob.d, dtype=DT))
    precondition = lambda v: torch.cholesky_solve(v[:, None], dense)[:, 0]  # noqa: E731
    exact = solve(prob.op, prob.b, "svrg", damping=lam, tol=1e-10, preconditioner=precondition, batch_size=30)
    assert exact.converged and prob.relative_error(exact.x, lam) <= 1e-8
    plain = solve(prob.op, prob.b, "svrg", damping=lam, tol=1e-6, max_hvps=200 * prob.n)
    assert plain.converged and prob.relative_error(plain.x, lam) <= 1e-4


def test_block_solve_equals_single_solves():
    prob = FiniteSum(n=200, d=50, rank=3, seed=5)
    lam = prob.damping_for(1e3)
    rhs = torch.randn(4, prob.d, dtype=DT, generator=torch.Generator().manual_seed(0))
    rhs[2] *= 1e-3  # columns of very different sizes: each stops on its own relative residual
    prob.calls = 0
    block = solve_block(prob.op, rhs, damping=lam, tol=1e-10)
    calls = prob.calls
    singles = torch.stack([solve(prob.op, b, "cg", damping=lam, tol=1e-10).x for b in rhs])
    assert block.converged and block.method == "block_cg"
    assert ((block.x - singles).norm(dim=1) / singles.norm(dim=1)).max() <= 1e-8
    assert calls == block.iterations  # one batched product per iteration, shared by the columns
    with pytest.raises(ValueError, match="block"):
        solve_block(prob.op, rhs[0], damping=lam)


def test_the_old_qp_name_is_refused_with_the_new_one(problem):
    with pytest.raises(ValueError, match="renamed 'subsample_fcg'"):
        solve(problem.op, problem.b, "qp", damping=0.1)
    assert DEFAULT_SOLVER in SOLVERS
