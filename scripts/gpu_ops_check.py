"""Every registered op on a GPU against its PyTorch reference at real sizes, in bf16 and fp32, with a roofline.

The registry is csrc/ops.cpp: each ``m.def`` schema is an op. ``CHECKS`` holds one check per op family and
names the schemas it covers; a schema no check covers is an error (also in ``--dry-run``, which
tests/test_gpu_check.py runs in CI), so no op can be forgotten.

For each check, dtype and fast backend that runs on the device (``cuda`` and ``triton`` on a GPU): the op on
inputs of that dtype, the reference on the same inputs in that dtype (plain torch) and in float64. It passes if
its relative error against float64 is at most twice plain torch's in the same dtype, plus a floor (the
flash-attention rule of docs/DESIGN). Time: the median of a few runs after a warm-up (which compiles and
autotunes). Roofline: the bytes each op must move and the flops it must do (counted per check, below) over
that time, against the device's peaks (a table of known GPUs).

    python scripts/gpu_ops_check.py                            # on a GPU: real sizes, bf16 and fp32
    python scripts/gpu_ops_check.py --dry-run                  # what would run; no GPU needed
    python scripts/gpu_ops_check.py --device cpu --size tiny   # the same code on the CPU (tests)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
FLOOR = {"bf16": 1e-2, "fp32": 1e-5, "fp64": 1e-12}  # relative error always accepted
# Dense peaks: (HBM GB/s, {dtype: TFLOP/s}); fp32 is the CUDA-core rate (the kernels use no TF32).
PEAKS = {
    "A100": (2039, {"bf16": 312, "fp32": 19.5, "fp64": 9.7}),
    "H100": (3350, {"bf16": 989, "fp32": 67, "fp64": 34}),
    "H200": (4800, {"bf16": 989, "fp32": 67, "fp64": 34}),
}


def registered_ops() -> list[str]:
    """The schemas of csrc/ops.cpp, the op registry."""
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        return re.findall(r'm\.def\("(\w+)\(', f.read())


@dataclass
class Case:
    """One op at one size and dtype. ``inputs()`` makes fresh inputs (same values each call); ``op`` and
    ``reference`` map inputs to a tuple of outputs (in-place ops work on the fresh inputs they are given)."""

    inputs: Callable[[], tuple]
    op: Callable[..., tuple]
    reference: Callable[..., tuple]
    bytes: int
    flops: int


@dataclass
class Check:
    name: str
    covers: tuple[str, ...]  # schemas of csrc/ops.cpp
    dtypes: tuple[str, ...]
    sizes: dict[str, dict]  # "real" and "tiny"
    make: Callable[..., Case]  # make(size dict, torch dtype, device)
    traffic: str  # how bytes and flops are counted, for the table's reader


def _gen(device, seed=0):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _token_logprobs(s, dtype, device) -> Case:
    import torch

    from unlearn_fast.ops import reference_token_logprobs, token_logprobs

    T, H, V = s["T"], s["H"], s["V"]

    def inputs():
        g = _gen(device)
        hidden = torch.randn(T, H, generator=g, device=device).to(dtype)
        weight = (torch.randn(V, H, generator=g, device=device) / H**0.5).to(dtype)
        labels = torch.randint(0, V, (T,), generator=g, device=device)
        labels[::7] = -100
        upstream = torch.randn(T, generator=g, device=device)
        return hidden.requires_grad_(), weight.requires_grad_(), labels, upstream

    def run(fn):
        def go(hidden, weight, labels, upstream):
            logp = fn(hidden, weight, labels).logp
            return (logp, *torch.autograd.grad((logp * upstream.to(logp.dtype)).sum(), (hidden, weight)))

        return go

    e = torch.finfo(dtype).bits // 8
    return Case(inputs, run(token_logprobs), run(reference_token_logprobs), (2 * T * H + 2 * V * H) * e + 24 * T,
                6 * T * H * V)  # fmt: skip


def _ce_curvature(s, dtype, device) -> Case:
    import torch

    from unlearn_fast.ops import ce_curvature, reference_ce_curvature

    T, H, V, K = s["T"], s["H"], s["V"], s["K"]

    def inputs():
        g = _gen(device)
        hidden = torch.randn(T, H, generator=g, device=device).to(dtype)
        weight = (torch.randn(V, H, generator=g, device=device) / H**0.5).to(dtype)
        tangents = torch.randn(K, T, H, generator=g, device=device).to(dtype)
        return hidden, weight, tangents, torch.rand(T, generator=g, device=device)

    def op(hidden, weight, tangents, w):
        out = ce_curvature(hidden, weight, tangent_hidden=tangents, token_weights=w, need_weight=True)
        return out.hidden, out.weight

    def reference(hidden, weight, tangents, w):
        out = reference_ce_curvature(hidden, weight, None, w, tangents)
        return out.hidden, out.weight

    e = torch.finfo(dtype).bits // 8
    return Case(inputs, op, reference, (T * H + V * H + 2 * K * T * H + K * V * H) * e + 4 * T,
                (2 + 6 * K) * T * H * V)  # fmt: skip


def _expert_ffn(s, dtype, device) -> Case:
    import torch

    from unlearn_fast.ops import expert_ffn, reference_expert_ffn

    T, N, H, I = s["T"], s["N"], s["H"], s["I"]

    def inputs():
        g = _gen(device)
        hidden = torch.randn(T, H, generator=g, device=device).to(dtype)
        index = torch.randint(0, T, (N,), generator=g, device=device)
        gate_up = (torch.randn(2 * I, H, generator=g, device=device) / H**0.5).to(dtype)
        down = (torch.randn(H, I, generator=g, device=device) / I**0.5).to(dtype)
        upstream = torch.randn(N, H, generator=g, device=device).to(dtype)
        return hidden.requires_grad_(), index, gate_up.requires_grad_(), down.requires_grad_(), upstream

    def run(fn):
        def go(hidden, index, gate_up, down, upstream):
            y = fn(hidden, index, gate_up, down)
            return (y, *torch.autograd.grad(y, (hidden, gate_up, down), upstream))

        return go

    e = torch.finfo(dtype).bits // 8
    return Case(inputs, run(expert_ffn), run(reference_expert_ffn), (5 * N * H + 6 * I * H) * e + 8 * N,
                18 * N * H * I)  # fmt: skip


def _moe_routing(s, dtype, device) -> Case:
    import torch

    from unlearn_fast.ops import Routing, expert_attribution, router_anchor_loss
    from unlearn_fast.ops.moe_routing import reference_anchor_residual, reference_expert_attribution

    T, E = s["T"], s["E"]
    routing = Routing(top_k=8, score="softmax", renormalize=True)  # Qwen3-MoE: top-8 of 128

    def inputs():
        g = _gen(device)
        # Logits on a 2^-6 grid, exact in bf16: a near-tie that float32 and float64 order differently would
        # change the chosen experts, which no kernel can be blamed for.
        logits = (torch.randint(-256, 256, (T, E), generator=g, device=device) / 64).to(dtype)
        return logits.requires_grad_(), torch.rand(T, generator=g, device=device)

    def run(attribution, anchor):
        def go(logits, w):
            loss = anchor(logits, w)
            return attribution(logits, w), loss, *torch.autograd.grad(loss, logits)

        return go

    op = run(lambda x, w: expert_attribution(x, w, routing), lambda x, w: router_anchor_loss(x, 3, w, routing))
    ref = run(
        lambda x, w: reference_expert_attribution(x, w, routing),
        lambda x, w: (w.to(x.dtype if x.dtype == torch.float64 else torch.float32)
                      * reference_anchor_residual(x, 3, routing)).sum(),
    )  # fmt: skip
    e = torch.finfo(dtype).bits // 8
    return Case(inputs, op, ref, 2 * T * E * e + 8 * T, 60 * T * E)


def _sophia(s, dtype, device) -> Case:
    import torch

    from unlearn_fast.ops import reference_sophia_update, sophia_update
    from unlearn_fast.ops.sophia_update import state_dtype

    sizes, hyper = s["sizes"], dict(lr=1e-3, beta1=0.9, beta2=0.99, rho=0.05, bs=8.0, weight_decay=0.1)

    def inputs():
        g = _gen(device)
        state = state_dtype(dtype)

        def rand(n, dt):
            return torch.randn(n, generator=g, device=device).to(dt)

        return ([rand(n, dtype) for n in sizes], [rand(n, dtype) for n in sizes], [rand(n, state) for n in sizes],
                [rand(n, state).abs() for n in sizes])  # fmt: skip

    def op(p, g, m, h):
        sophia_update(p, g, m, h, **hyper, hessian_from_grad=True)
        return tuple(p + m + h)

    def reference(p, g, m, h):
        reference_sophia_update(p, g, m, h, *hyper.values(), 1e-15, False, True, False)
        return tuple(p + m + h)

    e, n = torch.finfo(dtype).bits // 8, sum(sizes)
    return Case(inputs, op, reference, n * (3 * e + 16), 20 * n)


def _solver(s, dtype, device) -> Case:
    import torch

    from unlearn_fast.ops import cg_update, damped_dots, xpay
    from unlearn_fast.ops.solver_update import reference_cg_update, reference_damped_dots, reference_xpay

    n = s["n"]

    def inputs():
        g = _gen(device)
        return tuple(torch.randn(n, generator=g, device=device).to(dtype) for _ in range(4))

    def run(cg, dots, axpy):
        def go(x, r, p, q):
            rr = cg(x, r, p, q, 0.3)
            pq = dots(q, p, r, 0.1)
            axpy(p, r, 0.7)
            return x, r, rr, q, pq, p

        return go

    e = torch.finfo(dtype).bits // 8
    op, ref = run(cg_update, damped_dots, xpay), run(reference_cg_update, reference_damped_dots, reference_xpay)
    return Case(inputs, op, ref, 13 * n * e, 14 * n)


CHECKS = [
    Check("token_logprobs", ("token_logprobs", "token_logprobs_backward", "token_logprobs_fused_grad"),
          ("bf16", "fp32"), {"real": dict(T=4096, H=4096, V=128256), "tiny": dict(T=37, H=16, V=300)},
          _token_logprobs, "forward + backward: read x, W twice, write dx, dW; 6TVH flops"),
    Check("ce_curvature", ("ce_curvature",), ("bf16", "fp32"),
          {"real": dict(T=2048, H=4096, V=128256, K=2), "tiny": dict(T=9, H=12, V=300, K=2)},
          _ce_curvature, "K hidden-tangent probes, hidden and weight products; (2 + 6K) TVH flops"),
    Check("expert_ffn", ("expert_ffn", "expert_ffn_backward"), ("bf16", "fp32"),
          {"real": dict(T=16384, N=4096, H=4096, I=14336), "tiny": dict(T=23, N=17, H=24, I=40)},
          _expert_ffn, "one Mixtral-sized expert, forward + backward; 18 NHI flops"),
    Check("moe_routing", ("moe_expert_attribution", "moe_anchor_residual", "moe_anchor_residual_backward"),
          ("bf16", "fp32"), {"real": dict(T=65536, E=128), "tiny": dict(T=41, E=16)},
          _moe_routing, "attribution + anchor loss + its gradient; logits read twice, gradient written"),
    Check("sophia_update", ("sophia_update",), ("bf16", "fp32"),
          {"real": dict(sizes=[4096 * 4096, 4096 * 14336, 4096, 1]), "tiny": dict(sizes=[1, 97, 5000])},
          _sophia, "one step: p, m, h read and written, g read"),
    Check("solver_update", ("solver_cg_update", "solver_damped_dots", "solver_xpay"), ("fp32", "fp64"),
          {"real": dict(n=64 * 2**20), "tiny": dict(n=9001)},
          _solver, "cg_update + damped_dots + xpay: 13 vector passes; float32/64 only (the solvers' dtypes)"),
]  # fmt: skip


def uncovered() -> list[str]:
    covered = {op for c in CHECKS for op in c.covers}
    return [op for op in registered_ops() if op not in covered]


def rel_error(got, want) -> float:
    import torch

    got, want = got.detach().double().reshape(-1), want.detach().double().reshape(-1)
    return ((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def fast_backends(device) -> list[str]:
    from unlearn_fast.backend import available_backends

    return [b for b, why in available_backends()[device.type].items() if why is None and b != "reference"]


def timed(run: Callable[[], object], device, reps: int) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up: compiles and autotunes
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peaks(device):
    import torch

    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_properties(device).name
    return name, next((v for k, v in PEAKS.items() if k in name), None)


def check_one(check: Check, size: str, dt: str, backend: str, device, reps: int) -> dict:
    import torch

    from unlearn_fast.backend import use_backend

    case = check.make(check.sizes[size], getattr(torch, DTYPES[dt]), device)
    with use_backend(backend):
        got = case.op(*case.inputs())
    with use_backend("reference"):
        plain = case.reference(*case.inputs())
        exact = case.reference(*_float64(case.inputs()))
    err = max(rel_error(a, b) for a, b in zip(got, exact))
    err_plain = max(rel_error(a, b) for a, b in zip(plain, exact))
    row = dict(op=check.name, dtype=dt, backend=backend, error=err, plain_error=err_plain,
               ok=err <= 2 * err_plain + FLOOR[dt])  # fmt: skip
    fresh = case.inputs()
    with use_backend(backend):
        row["seconds"] = timed(lambda: case.op(*fresh), device, reps)
    row["gbs"] = case.bytes / row["seconds"] / 1e9
    row["tflops"] = case.flops / row["seconds"] / 1e12
    return row


def _is_float(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _float64(inputs) -> list:
    """Float64 copies of the inputs (leaves again where they required a gradient); lists kept as lists."""
    out = []
    for x in inputs:
        if isinstance(x, list):
            out.append([t.double() for t in x])
        elif _is_float(x):
            out.append(x.detach().double().requires_grad_(x.requires_grad))
        else:
            out.append(x)
    return out


def table(rows: list[dict], device) -> str:
    name, peak = peaks(device)
    head = f"Device: {name or device.type}; peaks: " + (
        f"{peak[0]} GB/s, {peak[1]} TFLOP/s (dense)" if peak else "unknown (no roofline fractions)"
    )
    lines = [head, "", "| op | dtype | backend | rel. error | plain torch's | ok | ms | GB/s | % of BW | TFLOP/s "
             "| % of peak |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        bw = f"{100 * r['gbs'] / peak[0]:.0f}" if peak else "-"
        fl = f"{100 * r['tflops'] / peak[1][r['dtype']]:.0f}" if peak else "-"
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['backend']} | {r['error']:.1e} | {r['plain_error']:.1e} | "
            f"{'yes' if r['ok'] else '**NO**'} | {1e3 * r['seconds']:.2f} | {r['gbs']:.0f} | {bw} | "
            f"{r['tflops']:.1f} | {fl} |"
        )
    lines += ["", "Bytes and flops counted per op:"] + [f"- {c.name}: {c.traffic}" for c in CHECKS]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit (no GPU needed)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", help="run only the check of this name")
    parser.add_argument("--write", metavar="PATH", help="also write the table there")
    args = parser.parse_args(argv)
    missing = uncovered()
    if missing:
        print(f"gpu_ops_check: no check covers {missing} (csrc/ops.cpp): add one to CHECKS", file=sys.stderr)
        return 1
    checks = [c for c in CHECKS if args.only in (None, c.name)]
    if args.dry_run:
        for c in checks:
            print(f"op {c.name} [{', '.join(c.covers)}] dtypes={','.join(c.dtypes)} {args.size}={c.sizes[args.size]}")
        return 0
    sys.path.insert(0, ROOT)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_ops_check: no CUDA device (use --device cpu --size tiny to exercise the script)", file=sys.stderr)
        return 2
    rows = []
    for c in checks:
        for dt in c.dtypes:
            for backend in fast_backends(device):
                rows.append(check_one(c, args.size, dt, backend, device, args.reps))
                r = rows[-1]
                print(f"{c.name} {dt} {backend}: error {r['error']:.1e} (plain torch {r['plain_error']:.1e}) "
                      f"{'ok' if r['ok'] else 'FAIL'}, {1e3 * r['seconds']:.2f} ms", flush=True)  # fmt: skip
    text = table(rows, device)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
