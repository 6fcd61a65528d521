"""Inverse-HVP accuracy on a real LoRA: the solvers against the exact dense solve.

    OMP_NUM_THREADS=2 python bench/llmeraser_inverse_hvp.py [--examples 16] [--rank 1]

SmolLM2-135M with a LoRA small enough for its dense Hessian (rank 1 on the last layer's
down_proj: 2,112 parameters), fine-tuned on fictitious facts. The per-example Hessians H_i (exact
second derivatives, or the Gauss-Newton matrices) are formed column by column from the model's
own curvature products (LLMEraser's operator, K directions per pass), then

    x* = (H + λI)⁻¹ b,  H = (1/n) Σ_i H_i,  b = the removal right-hand side of one example,

by a dense float64 solve. Each solver (svrg, subsample_fcg, cg, lissa, the reference Adam recipe) then runs on the
same finite sum through products with the stored H_i (identical to the model's products up to
float32 rounding; the script checks this on random vectors), and its relative error
‖x − x*‖/‖x*‖ is recorded after every iteration with the single-example HVPs spent so far.
Reported: the HVPs each solver needs to reach relative error 1e-3 (or its error when its budget
ran out). Two systems: the exact Hessian (indefinite) with λ = |λ_min| + 1e-3·λ_max, and the
Gauss-Newton matrix with λ = 1e-3·λ_max. Writes bench/results/llmeraser_inverse_hvp.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unlearn_fast.data import make_fictitious_facts
from unlearn_fast.finetune import FinetuneConfig, finetune_cached
from unlearn_fast.methods.llmeraser import LLMEraser
from unlearn_fast.solvers import FiniteSumOperator, IterationInfo, solve

TARGET = 1e-3


def small_lora(examples: int, rank: int = 1, module: str = "layers.29.mlp.down_proj", epochs: int = 40):
    """SmolLM2-135M with a LoRA of ``rank`` on ``module`` only, fine-tuned full-batch (lr 1e-2, ``epochs``
    steps) on ``examples`` fictitious facts, through the fine-tuning cache: (model, tokenizer, facts, report)."""
    facts = make_fictitious_facts(num_people=max(1, examples // 4), questions_per_person=4, seed=0)[:examples]
    config = FinetuneConfig(
        lora_rank=rank,
        lora_alpha=2 * rank,
        target_modules=(module,),
        lr=1e-2,
        batch_size=len(facts),
        max_epochs=epochs,
        target_answer_prob=None,
    )
    model, tokenizer, ft, _ = finetune_cached("smollm2", facts, config, progress=False)
    return model, tokenizer, facts, ft


def per_example_matrices(eraser: LLMEraser, chunk: int) -> torch.Tensor:
    """[n, d, d] float64: column blocks of H_i from the model's curvature products."""
    op, d = eraser.operator, eraser.dim
    out = torch.empty(eraser.n, d, d, dtype=torch.float64)
    eye = torch.eye(d)
    for i in range(eraser.n):
        start = time.perf_counter()
        for first in range(0, d, chunk):
            out[i, first : first + chunk] = op.hvp_fn(eye[first : first + chunk], [i]).double()
        out[i] = (out[i] + out[i].T) / 2  # rows are H_i e_j; symmetric up to float32 rounding
        print(f"  H_{i}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def dense_operator(matrices: torch.Tensor) -> FiniteSumOperator:
    def hvp_fn(v: torch.Tensor, indices):
        chosen = matrices if indices is None else matrices[list(indices)]
        return (v.double() @ chosen.mean(0)).to(v.dtype)  # symmetric: v H = (H v)ᵀ

    return FiniteSumOperator(n=matrices.shape[0], hvp_fn=hvp_fn, dim=matrices.shape[1])


def run_solver(op, b, x_star, method, damping, budget, **options) -> dict:
    errors: list[tuple[int, float]] = []

    def track(info: IterationInfo) -> None:
        errors.append((info.hvps_used, ((info.x.double() - x_star).norm() / x_star.norm()).item()))

    result = solve(op, b, method, damping=damping, tol=1e-12, max_hvps=budget, callback=track, **options)
    reached = next((hvps for hvps, err in errors if err <= TARGET), None)
    final = ((result.x.double() - x_star).norm() / x_star.norm()).item()
    return {
        "hvps_to_1e-3": reached,
        "final_error": final,
        "hvps_used": result.hvps_used,
        "iterations": result.iterations,
        "damping": result.damping,
        "errors": errors[:: max(1, len(errors) // 200)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4, help="fictitious facts (n; each costs d curvature products)")
    parser.add_argument(
        "--curvatures", nargs="+", default=["hessian", "gauss_newton"], choices=["hessian", "gauss_newton"]
    )
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--module", default="layers.29.mlp.down_proj")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=128, help="directions per curvature pass")
    parser.add_argument("--budget", type=int, default=200_000, help="single-example HVPs per solver run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llmeraser_inverse_hvp"))
    args = parser.parse_args()

    model, tokenizer, examples, ft = small_lora(args.examples, args.rank, args.module, args.epochs)
    print(
        f"LoRA r={args.rank} on {args.module}, {len(examples)} examples, final answer prob {ft.final_answer_prob:.3f}"
    )

    rows, payload = [], {"settings": {**vars(args), "out": str(args.out)}, "systems": {}}
    for curvature in args.curvatures:
        eraser = LLMEraser(model, examples, tokenizer=tokenizer, curvature=curvature, examples_per_pass=1)
        start = time.perf_counter()
        matrices = per_example_matrices(eraser, args.chunk)
        build_time = time.perf_counter() - start
        op = dense_operator(matrices)
        # The stored matrices give the model's own products (float32 rounding apart).
        v = torch.randn(3, eraser.dim, generator=torch.Generator().manual_seed(0))
        model_products = eraser.operator.hvp_fn(v, None).double()
        check = ((op.hvp_fn(v.double(), None) - model_products).norm() / model_products.norm()).item()
        H = matrices.mean(0)
        eig = torch.linalg.eigvalsh(H)
        lam_min, lam_max = eig[0].item(), eig[-1].item()
        damping = max(0.0, -lam_min) + 1e-3 * lam_max
        b = (eraser._gradient([eraser._term(eraser._encoded[0], 1.0, "train_data[0]")]) / eraser.n).double()
        x_star = torch.linalg.solve(H + damping * torch.eye(eraser.dim, dtype=torch.float64), b)
        print(
            f"{curvature}: d={eraser.dim}, eigenvalues [{lam_min:.3g}, {lam_max:.3g}], λ={damping:.3g}, "
            f"dense matrices in {build_time:.0f} s, stored-vs-model product error {check:.2g}"
        )
        system = {
            "lambda_min": lam_min,
            "lambda_max": lam_max,
            "damping": damping,
            "build_time_s": build_time,
            "product_check": check,
            "solvers": {},
        }
        for method, options in (
            ("svrg", {}),
            ("subsample_fcg", {}),
            ("cg", {}),
            ("lissa", {"batch_size": 1}),
            ("reference_adam", {"max_iters": 20}),
        ):
            if method in ("cg", "svrg", "subsample_fcg"):
                options = {**options, "on_indefinite": "raise"}
            out = run_solver(op, b.float(), x_star, method, damping, args.budget, **options)
            system["solvers"][method] = out
            reached = out["hvps_to_1e-3"]
            rows.append(
                f"| {curvature} | {method} | {reached if reached is not None else 'not reached'} | "
                f"{out['final_error']:.2e} | {out['hvps_used']} |"
            )
            print(
                f"  {method}: HVPs to 1e-3 {reached}, final error {out['final_error']:.2e} "
                f"after {out['hvps_used']} HVPs",
                flush=True,
            )
        payload["systems"][curvature] = system
        write(args, payload, rows, eraser.dim, len(examples))  # after each system: a long run keeps its results


def write(args, payload, rows, dim, n) -> None:
    lines = [
        f"Inverse HVP on SmolLM2-135M, LoRA r={args.rank} on {args.module} ({dim} parameters), "
        f"n={n} fine-tuned facts, b = removal of example 0; error = ‖x − x*‖/‖x*‖ against the "
        f"dense float64 solve; HVPs in single-example products (budget {args.budget}).",
        "",
        "| curvature | solver | HVPs to error 1e-3 | final error | HVPs used |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]
    for curvature, system in payload["systems"].items():
        lines.append(
            f"\n{curvature}: eigenvalues of H in [{system['lambda_min']:.3g}, {system['lambda_max']:.3g}], "
            f"λ = {system['damping']:.3g}; stored-vs-model product error {system['product_check']:.2g}."
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
