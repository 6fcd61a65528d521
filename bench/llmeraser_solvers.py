"""The finite-sum solvers against CG on the same problems, counted in single-example HVPs.

    OMP_NUM_THREADS=1 python bench/llmeraser_solvers.py [--ns 500 2000 10000] [--dim 2000]

Synthetic finite sums shaped like LLMEraser's LoRA Gauss-Newton: H = (1/n) Σ_i J_iᵀJ_i with
J_i [rank, d] Gaussian rows on a power-law spectrum (eigenvalues of E[J_iᵀJ_i] ∝ k^-1.2, top 1)
and a log-normal scale per example (per-example gradient norms differ, as on real data); the
solvers are rotation invariant, so the spectrum lies on the coordinate axes. λ = 1e-3 (cond ≈ 1e3).
Each solver runs to relative residual 1e-3 (every method's residual is exact, from full
products it needs anyway); the count includes every per-example HVP (power estimates too).

"+ fisher": preconditioned by the fitted curvature of item 1's kind: one sampled-label row per
example, u_i = J_iᵀε_i (ε Rademacher, so E[u_i u_iᵀ] = J_iᵀJ_i), C = (1/n) Σ u_i u_iᵀ, applied as
(C + λI)⁻¹ (factored densely: d < n here; LLMEraser uses the Woodbury form of the same matrix).

``--lora N`` runs the same table on a real system instead: SmolLM2-135M with a rank-1 LoRA on the last
``down_proj`` (2,112 parameters; :func:`llmeraser_inverse_hvp.small_lora`) fine-tuned on N facts, H its
Gauss-Newton curvature (the model's own products), b the removal of 5% of the examples, λ = 1e-3 λ_max
(λ_max by power iteration, not counted), and "+ fisher" LLMEraser's own fitted Woodbury curvature
(``curvature_method="fisher"``, one sampled label per example). Writes bench/results/llmeraser_solvers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unlearn_fast.solvers import FiniteSumOperator, solve

TOL = 1e-3
METHODS = (
    ("cg", {}, False),
    ("cg", {}, True),
    ("svrg", {}, False),
    ("svrg", {"batch_size": 1}, False),
    ("svrg", {}, True),
    ("subsample_fcg", {}, False),
)


def problem(n: int, dim: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """J [n, rank, dim] float32 and b [dim] (a removal-like rhs: the mean row of 5% of the examples)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, dim + 1, dtype=torch.float64) ** -1.2
    scale = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    scale /= scale.pow(2).mean().sqrt()
    jac = torch.randn(n, rank, dim, generator=g, dtype=torch.float64) / rank**0.5
    jac = (jac * spectrum.sqrt() * scale[:, None, None]).float()
    removed = torch.randperm(n, generator=g)[: max(1, n // 20)]
    b = (jac[removed] * torch.randn(len(removed), rank, 1, generator=g)).sum((0, 1)) / n
    return jac, b


def operator(jac: torch.Tensor) -> FiniteSumOperator:
    flat = jac.reshape(-1, jac.shape[-1])  # [n·rank, d]: the full product as two matrix products

    def hvp_fn(v, indices):
        if indices is None:
            return ((v @ flat.T) @ flat) / jac.shape[0]
        rows = jac[list(indices)].reshape(-1, jac.shape[-1])
        return ((v @ rows.T) @ rows) / len(indices)

    return FiniteSumOperator(jac.shape[0], hvp_fn, jac.shape[-1])


def fisher_preconditioner(jac: torch.Tensor, damping: float, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    signs = torch.randint(0, 2, jac.shape[:2], generator=g).float() * 2 - 1
    rows = torch.einsum("nr,nrd->nd", signs, jac).double()
    factor = torch.linalg.cholesky(rows.T @ rows / len(rows) + damping * torch.eye(jac.shape[-1], dtype=torch.float64))
    return lambda v: torch.cholesky_solve(v.double().reshape(-1, v.shape[-1]).T, factor).T.reshape(v.shape).to(v)


def lora_problem(examples: int, seed: int):
    """(operator, b, λ, fisher preconditioner, its fit time) of a real LoRA's removal (module docstring)."""
    from llmeraser_inverse_hvp import small_lora

    from unlearn_fast.methods.llmeraser import LLMEraser, LLMEraserConfig

    model, tokenizer, facts, _ = small_lora(examples)
    config = LLMEraserConfig(curvature_method="fisher", curvature_samples=1, hvp_method="double_backward")
    eraser = LLMEraser(model, facts, config, tokenizer=tokenizer)
    op = eraser.operator
    removed = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed))[: max(1, len(facts) // 20)]
    b = eraser._gradient([eraser._term(eraser._encoded[i], 1.0, f"train_data[{i}]") for i in removed.tolist()])
    b = b / eraser.n
    v = torch.randn(eraser.dim, generator=torch.Generator().manual_seed(seed))
    for _ in range(20):  # power iteration: λ_max of the PSD Gauss-Newton
        w = op.hvp_fn(v / v.norm(), None)
        lam_max, v = float(w.norm()), w
    damping = 1e-3 * lam_max
    start = time.perf_counter()
    fitted = eraser.with_damping(damping).fit_curvature()
    return op, b, damping, lambda x: fitted.solve(x), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=[500, 2000, 10000])
    parser.add_argument("--dim", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=4, help="rows per example (answer tokens x labels)")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--budget-passes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0, metavar="N", help="a real LoRA fine-tuned on N facts instead")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/llmeraser_solvers[_lora]")
    args = parser.parse_args()
    args.out = args.out or Path("bench/results/llmeraser_solvers" + ("_lora" if args.lora else ""))
    rows, payload = [], {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for n in [args.lora] if args.lora else args.ns:
        if args.lora:
            op, b, args.damping, precondition, fit_time = lora_problem(args.lora, args.seed)
            print(f"real LoRA, n={n}, d={op.dim}, λ={args.damping:.3g}", flush=True)
        else:
            jac, b = problem(n, args.dim, args.rank, args.seed)
            op = operator(jac)
            start = time.perf_counter()
            precondition = fisher_preconditioner(jac, args.damping, args.seed)
            fit_time = time.perf_counter() - start
        baseline = None
        for method, options, preconditioned in METHODS:
            if preconditioned:  # preconditioned SVRG needs larger minibatches (measured: n/20)
                extra = {"batch_size": max(1, n // 20)} if method == "svrg" else {}
                options = {**options, **extra, "preconditioner": precondition}
            start = time.perf_counter()
            result = solve(op, b, method, damping=args.damping, tol=TOL, max_hvps=args.budget_passes * n, **options)
            seconds = time.perf_counter() - start
            name = method + "".join(f" {k}={v}" for k, v in options.items() if k != "preconditioner")
            name += " + fisher" if preconditioned else ""
            hvps = result.hvps_used if result.converged else None
            baseline = hvps if (method, preconditioned) == ("cg", False) else baseline
            ratio = f"{hvps / baseline:.2f}" if hvps and baseline else "-"
            run = {"n": n, "solver": name, "hvps": hvps, "passes": hvps / n if hvps else None, "ratio_to_cg": ratio}
            run.update(residual=result.relative_residual, iterations=result.iterations, seconds=seconds)
            payload["runs"].append(run)
            reached = f"{hvps:,} ({hvps / n:.1f})" if hvps else f"not reached ({result.relative_residual:.1e})"
            rows.append(f"| {n} | {name} | {reached} | {ratio} |")
            print(rows[-1], f"{seconds:.1f} s", flush=True)
        payload["runs"].append({"n": n, "fisher_fit_s": fit_time})
    what = "SmolLM2 LoRA r=1 on the last down_proj" if args.lora else f"d={args.dim}, {args.rank} rows per example"
    lines = [
        f"Single-example HVPs to relative residual {TOL:g}: {what}, "
        f"λ={args.damping:g}, budget {args.budget_passes} passes; (passes over the data); ratio to plain CG.",
        "",
        "| n | solver | HVPs to 1e-3 (passes) | / CG |",
        "|---:|---|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
