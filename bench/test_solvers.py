"""Inverse-HVP solvers: the fused vector kernels, and HVPs needed to reach 1e-3 relative error.

1. One CG iteration's vector work on a 10M-element float32 vector (an adapter-sized flat vector):
   the fused ops of unlearn_fast.ops.solver_update against the unfused torch sequence, for the
   update alone (x += αp; r −= αq; ‖r‖²) and for the whole iteration (plus q += λp, pᵀq and
   p = r + βp). One thread and all threads, as in bench/test_sophia.py.
2. Single-example HVPs until the relative error against the dense solve first drops to 1e-3, on
   a synthetic finite sum with n = 2000 (d = 200, per-example Hessians A_iᵀA_i of rank 4, or of
   rank 1, the hard case for subsampling; eigenvalues of E[H_i] log-spaced over 1..1e-4,
   λ = λ_max/1e3): QP vs CG vs LiSSA vs the reference Adam recipe. The counts are in extra_info
   (``hvps_to_1e-3``; None if the budget of 200 full passes ran out first, with the best error
   reached in ``final_error``); the times are only those of this toy operator.

Run with ``make bench`` (or ``pytest bench/test_solvers.py --benchmark-only``).
"""

import functools
import math

import pytest
import torch

from unlearn_fast.ops.solver_update import cg_update, damped_dots, xpay
from unlearn_fast.solvers import FiniteSumOperator, solve

N_ELEMENTS = 10_000_000
THREADS = sorted({1, torch.get_num_threads()})
ALPHA, BETA, DAMPING = 1e-3, 0.5, 1e-2  # keep the values bounded over many rounds


def unfused_update(x, r, p, q):
    x.add_(p, alpha=ALPHA)
    r.sub_(q, alpha=ALPHA)
    return torch.dot(r, r)


def unfused_iteration(x, r, p, q):
    q.add_(p, alpha=DAMPING)
    torch.dot(p, q)
    rr = unfused_update(x, r, p, q)
    p.mul_(BETA).add_(r)
    return rr


def fused_iteration(x, r, p, q):
    damped_dots(q, p, None, DAMPING)
    rr = cg_update(x, r, p, q, ALPHA)
    xpay(p, r, BETA)
    return rr


CASES = {
    ("update", "torch"): unfused_update,
    ("update", "fused"): lambda x, r, p, q: cg_update(x, r, p, q, ALPHA),
    ("iteration", "torch"): unfused_iteration,
    ("iteration", "fused"): fused_iteration,
}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("part,impl", list(CASES))
def test_cg_vector_work(benchmark, part, impl, threads):
    g = torch.Generator().manual_seed(0)
    x, r, p, q = (torch.randn(N_ELEMENTS, generator=g) for _ in range(4))
    step = CASES[(part, impl)]
    benchmark.group = f"CG {part} vector work, 10M float32, {threads} thread(s)"
    benchmark.extra_info.update(
        op="solver_cg_update", impl=impl, baseline="torch", threads=threads, shape=f"{N_ELEMENTS} float32"
    )
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.pedantic(step, args=(x, r, p, q), rounds=20, warmup_rounds=2)
    finally:
        torch.set_num_threads(default_threads)


# ---------------------------------------------------------------------------------------------
# HVPs to 1e-3 relative error.

N, DIM, COND = 2000, 200, 1e3
BUDGET_PASSES = 200


@functools.cache
def finite_sum(rank: int):
    """A, the dense H, λ (cond(H + λI) ~ 1e3), b and the exact solution."""
    g = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(0, -4, DIM, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    a = torch.randn(N, rank, DIM, generator=g, dtype=torch.float64) / math.sqrt(rank) * spectrum.sqrt() @ basis.T
    hessian = torch.einsum("nri,nrj->ij", a, a) / N
    lam = torch.linalg.eigvalsh(hessian)[-1].item() / COND
    b = torch.randn(DIM, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(hessian + lam * torch.eye(DIM, dtype=torch.float64), b)
    return a, lam, b, exact


def operator(a) -> FiniteSumOperator:
    def hvp_fn(v, indices):
        rows = a if indices is None else a[list(indices)]
        return torch.einsum("nri,...nr->...i", rows, torch.einsum("nrj,...j->...nr", rows, v)) / rows.shape[0]

    return FiniteSumOperator(N, hvp_fn, DIM)


SOLVERS = {
    "cg": {},
    "svrg": {},
    "subsample_fcg": {},  # defaults: batch_size n/20 = 100, inner_iters 20, memory 10
    "lissa": {"batch_size": 10, "max_iters": 10**6, "monitor_every": N // 10},  # residual checked every pass
    "reference_adam": {},
}


@pytest.mark.parametrize("rank", [4, 1])
@pytest.mark.parametrize("method", list(SOLVERS))
def test_hvps_to_1e3(benchmark, method, rank):
    a, lam, b, exact = finite_sum(rank)
    op = operator(a)
    outcome = {}

    def run():
        first = []

        def callback(info):
            error = ((info.x - exact).norm() / exact.norm()).item()
            outcome["final_error"] = error
            if error <= 1e-3:
                first.append(info.hvps_used)
                return True
            return False

        result = solve(
            op, b, method, damping=lam, tol=1e-9, max_hvps=BUDGET_PASSES * N, callback=callback, **SOLVERS[method]
        )
        outcome.update(hvps=first[0] if first else None, result=result)

    benchmark.group = f"inverse HVP to 1e-3 error, n={N} d={DIM} rank(H_i)={rank} cond 1e3"
    benchmark.pedantic(run, rounds=1, iterations=1)
    result = outcome["result"]
    benchmark.extra_info.update(
        op="solvers",
        impl=method,
        baseline="cg",
        shape=f"n={N} d={DIM} rank={rank}",
        **{"hvps_to_1e-3": outcome["hvps"]},
        final_error=outcome.get("final_error"),
        iterations=result.iterations,
        hvps_used=result.hvps_used,
        monitor_hvps=result.monitor_hvps,
        relative_residual=result.relative_residual,
    )
