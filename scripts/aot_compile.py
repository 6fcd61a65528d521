"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, with resource figures.

No GPU is needed: Triton's own compiler runs with an explicit ``GPUTarget`` and yields PTX and a
cubin; ``its cubin read with ``cuobjdump --dump-resource-usage`` (bundled with triton) gives registers,
local memory (spills), stack and shared memory. The
CUDA kernels' figures come from ``cuobjdump --dump-resource-usage`` on their compiled device code:
the objects of a CUDA build in build/ when there are some (CI builds them), otherwise each .cu
compiled once with ``nvcc --fatbin`` into build/aot/ (``--cuda``; ~40 s per file for both archs).

    python scripts/aot_compile.py                       # compile, print the table, exit 1 on a failure
    python scripts/aot_compile.py --cuda --write docs/KERNELS.md   # regenerate the docs table

A failure is a compile error or local memory (spills) above the kernel's budget in ``_kernels()``.
Run with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


@dataclass
class Kernel:
    """One Triton kernel at one production launch configuration."""

    module: str  # under unlearn_fast.kernels
    name: str
    signature: dict[str, str]  # runtime arguments; "{T}" stands for the element type of the data
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    spill_budget: int = 0  # bytes of stack frame + local memory (where ptxas spills) allowed per thread
    suffix: str = ""  # which configuration, when a kernel is listed more than once


def _acc(dtype: str):
    import triton.language as tl

    return tl.float64 if dtype == "fp64" else tl.float32


def _kernels() -> list[Kernel]:
    """The table: every @triton.jit kernel launched by the library, its configuration and its spill budget.

    Budgets of 0 are kernels that do not spill. The non-zero ones are today's figures (the maximum over dtypes
    and archs), so that CI catches any growth: these kernels still use interpreter-sized blocks (4096-element
    programs, 64x64 fp32 tiles with the GLU in the epilogue) and spill; GPU-sized launches lower them.
    """
    from unlearn_fast.kernels import expert_ffn as ffn
    from unlearn_fast.kernels import solver_update as solver
    from unlearn_fast.kernels import sophia_update as sophia

    row = dict(BLOCK_V=4096)  # kernels/token_logprobs.py _launch_args at a real vocabulary
    gemm = dict(BLOCK_M=ffn.BLOCK_M, BLOCK_N=ffn.BLOCK_N, BLOCK_K=ffn.BLOCK_K)
    ffn_flags = dict(UPCAST=False, ROUND_BF16=False)
    # Mixtral (softmax top-2 of 8) and DeepSeek-V3 (sigmoid, bias, 8 groups, top-4 groups, top-8 of 256).
    mixtral = dict(
        TOP_K=2,
        SIGMOID=False,
        RENORM=True,
        N_GROUP=1,
        TOPK_GROUP=1,
        GROUP_SIZE=8,
        TOP2=False,
        HAS_BIAS=False,
        BLOCK_T=128,
        BLOCK_E=8,
    )
    deepseek = dict(
        TOP_K=8,
        SIGMOID=True,
        RENORM=True,
        N_GROUP=8,
        TOPK_GROUP=4,
        GROUP_SIZE=32,
        TOP2=True,
        HAS_BIAS=True,
        BLOCK_T=16,
        BLOCK_E=256,
    )
    route = {"x_ptr": "*{T}", "bias_ptr": "*fp32", "consts_ptr": "*fp64"}
    out = [
        Kernel(
            "token_logprobs",
            "_forward_kernel",
            {
                "logits_ptr": "*{T}",
                "labels_ptr": "*i64",
                "logp_ptr": "*fp32",
                "lse_ptr": "*fp32",
                "vocab": "i32",
                "stride": "i32",
                "ignore_index": "i32",
            },
            row,
        ),
        Kernel(
            "token_logprobs",
            "_grad_kernel",
            {
                "logits_ptr": "*{T}",
                "labels_ptr": "*i64",
                "grad_logp_ptr": "*fp32",
                "grad_lse_ptr": "*fp32",
                "lse_ptr": "*fp32",
                "logp_ptr": "*fp32",
                "vocab": "i32",
                "stride": "i32",
                "ignore_index": "i32",
            },
            dict(row, HAS_GRAD_LSE=True, COMPUTE_LSE=True),
        ),
        Kernel(
            "ce_curvature",
            "_lse_kernel",
            {"logits_ptr": "*{T}", "lse_ptr": "*fp32", "vocab": "i32", "stride": "i32"},
            row,
        ),
        Kernel(
            "ce_curvature",
            "_curvature_kernel",
            {
                "logits_ptr": "*{T}",
                "lse_ptr": "*fp32",
                "weights_ptr": "*fp32",
                "tangents_ptr": "*{T}",
                "rows": "i32",
                "vocab": "i32",
                "stride": "i32",
            },
            row,
        ),
    ]
    for act, act_name in ((0, "silu"), (1, "gelu_tanh")):
        out += [
            Kernel(
                "expert_ffn",
                "_gather_glu_kernel",
                {
                    "hidden_ptr": "*{T}",
                    "index_ptr": "*i64",
                    "w_ptr": "*{T}",
                    "a_ptr": "*{T}",
                    "h_ptr": "*{T}",
                    "N": "i32",
                    "H": "i32",
                    "I": "i32",
                },
                dict(gemm, **ffn_flags, ACT=act, PRECISION=None),
                spill_budget=104,
            ),
            Kernel(
                "expert_ffn",
                "_glu_backward_kernel",
                {"a_ptr": "*{T}", "dh_ptr": "*{T}", "h_ptr": "*{T}", "da_ptr": "*{T}", "N": "i32", "I": "i32"},
                dict(ACT=act, ROUND_BF16=False, BLOCK_M=ffn.BLOCK_M, BLOCK_N=ffn.BLOCK_N),
                spill_budget=304,
            ),
        ]
        out[-2].suffix = out[-1].suffix = act_name
    out += [
        Kernel(
            "expert_ffn",
            "_gather_wgrad_kernel",
            {
                "da_ptr": "*{T}",
                "hidden_ptr": "*{T}",
                "index_ptr": "*i64",
                "out_ptr": "*{T}",
                "N": "i32",
                "H": "i32",
                "TWO_I": "i32",
            },
            dict(gemm, **ffn_flags, PRECISION=None),
        ),
    ]
    for cfg_name, cfg in (("mixtral", mixtral), ("deepseek", deepseek)):
        routed = [
            Kernel(
                "moe_routing",
                "_attribution_kernel",
                dict(route, w_ptr="*fp32", part_ptr="*fp32", T="i32", E="i32"),
                dict(cfg),
            ),
            Kernel(
                "moe_routing",
                "_residual_kernel",
                dict(route, out_ptr="*fp32", target="i32", T="i32", E="i32"),
                dict(cfg),
            ),
            Kernel(
                "moe_routing",
                "_residual_backward_kernel",
                dict(route, grad_ptr="*fp32", dx_ptr="*{T}", target="i32", T="i32", E="i32"),
                dict(cfg, OUT="{T}"),
                spill_budget=160 if cfg_name == "deepseek" else 0,
            ),
        ]
        for k in routed:
            k.suffix = cfg_name
            if cfg_name == "deepseek":  # fp32 router logits; the unrolled group loops take ~15 s per compile
                k.dtypes = ("fp32",)
            out.append(k)
    flat = dict(BLOCK=solver.BLOCK)
    out += [
        Kernel(
            "solver_update",
            "_cg_update_kernel",
            {
                "x_ptr": "*{T}",
                "r_ptr": "*{T}",
                "p_ptr": "*{T}",
                "q_ptr": "*{T}",
                "coef_ptr": "*fp64",
                "partial_ptr": "*fp64",
                "numel": "i64",
            },
            flat,
            dtypes=("fp32", "fp64"),
            spill_budget=480,
        ),
        Kernel(
            "solver_update",
            "_damped_dots_kernel",
            {
                "q_ptr": "*{T}",
                "p_ptr": "*{T}",
                "r_ptr": "*{T}",
                "coef_ptr": "*fp64",
                "partial_ptr": "*fp64",
                "numel": "i64",
                "n_programs": "i32",
            },
            dict(flat, DAMP=True, HAS_R=True),
            dtypes=("fp32", "fp64"),
            spill_budget=72,
        ),
        Kernel(
            "solver_update",
            "_xpay_kernel",
            {"p_ptr": "*{T}", "r_ptr": "*{T}", "coef_ptr": "*fp64", "numel": "i64"},
            flat,
            dtypes=("fp32", "fp64"),
        ),
        Kernel(
            "sophia_update",
            "_sophia_kernel",
            {"buffer": "*i64", "n_tensors": "i32"},
            dict(HESSIAN_FROM_GRAD=True, SOUL_REFERENCE=False, P_DTYPE="{T}", N_CONSTS=9, BLOCK=sophia.CHUNK),
            spill_budget=936,
        ),
    ]
    return out


def _tl_type(name: str):
    import triton.language as tl

    return {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[name]


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_triton(kernel: Kernel, dtype: str, arch: int) -> dict:
    """Compile one kernel; its figures from ptxas -v on the PTX (registers, spills, stack, shared)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"unlearn_fast.kernels.{kernel.module}"), kernel.name)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("TRITON_INTERPRET=1 replaces the kernels: run the AOT compile without it")
    consts = {k: (_tl_type(dtype) if v == "{T}" else v) for k, v in kernel.constexprs.items()}
    if "ACC" in fn.arg_names:
        consts["ACC"] = _acc(dtype)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = kernel.signature[name].replace("{T}", dtype)
    src = ASTSource(fn=fn, signature=sig, constexprs={k: v for k, v in consts.items()})
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:  # the cubin triton's own ptxas made
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        dump = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
    m = _RESOURCES.search(dump)
    regs, stack, shared, local = (int(g) for g in m.groups())
    return dict(regs=regs, stack=stack, local=local, shared=max(shared, compiled.metadata.shared))


def triton_rows(archs=ARCHS) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for kernel in _kernels():
        label = kernel.name + (f"[{kernel.suffix}]" if kernel.suffix else "")
        for dtype in kernel.dtypes:
            for arch in archs:
                row = dict(
                    kind="triton",
                    kernel=f"{kernel.module}.{label}",
                    dtype=dtype,
                    arch=f"sm_{arch}",
                    warps=kernel.num_warps,
                    budget=kernel.spill_budget,
                )
                t0 = time.time()
                try:
                    row.update(compile_triton(kernel, dtype, arch))
                    row["seconds"] = time.time() - t0
                except Exception as e:  # a compile error is a finding, reported with the others
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                    failures.append(f"{row['kernel']} {dtype} sm_{arch}: {row['error']}")
                else:
                    if row["stack"] + row["local"] > kernel.spill_budget:
                        failures.append(
                            f"{row['kernel']} {dtype} sm_{arch}: {row['stack']} bytes of stack frame "
                            f"(spills) per thread above its budget of {kernel.spill_budget}"
                        )
                rows.append(row)
    return rows, failures


# ------------------------------------------------------------------------------------------------
# CUDA kernels (csrc/cuda/*.cu): device code only, both archs, figures from cuobjdump.

CUDA_LOCAL_BUDGET = 0  # bytes of stack + local memory (spills, stack arrays) per thread for every CUDA kernel
# ... except these (kernel name prefix: bytes), today's figures: a small per-thread array on sm_90.
CUDA_BUDGET_EXCEPTIONS = {"moe_routing.moe_routing::attribution_kernel": 8}


def _nvcc_fatbin(cu: str, out: str) -> None:
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cmd = [
        os.path.join(cuda, "bin", "nvcc"),
        "--fatbin",
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-DUNLEARN_FAST_WITH_CUDA=1",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{ROOT}/csrc",
        f"-I{site}/torch/include",
        f"-I{site}/torch/include/torch/csrc/api/include",
        f"-I{site}/nvidia/cu13/include",
    ]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    subprocess.run(cmd + [cu, "-o", out], check=True, capture_output=True, text=True)


def _short_name(mangled: str) -> str:
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = name.replace("(anonymous namespace)::", "").replace("unlearn_fast::", "").replace("c10::", "")
    name = re.sub(r"\([^()]*\)$", "", name)  # drop the parameter list
    return name.removeprefix("void ")


def cuda_rows(build: bool) -> tuple[list[dict], list[str], str]:
    """Figures of every CUDA kernel, from build/ objects or (build=True) fresh fatbins; source said in the note."""
    objects = {os.path.basename(p)[:-2]: p for p in glob.glob(f"{ROOT}/build/temp.*/csrc/cuda/*.o")}
    sources = sorted(glob.glob(f"{ROOT}/csrc/cuda/*.cu"))
    aot_dir = os.path.join(ROOT, "build", "aot")
    note = []
    rows, failures = [], []
    for cu in sources:
        stem = os.path.basename(cu)[:-3]
        if stem in objects and os.path.getmtime(objects[stem]) >= os.path.getmtime(cu):
            binary, origin = objects[stem], "build object"
        else:
            binary = os.path.join(aot_dir, stem + ".fatbin")
            if build and not (os.path.exists(binary) and os.path.getmtime(binary) >= _newest_input(cu)):
                os.makedirs(aot_dir, exist_ok=True)
                _nvcc_fatbin(cu, binary)
            if not os.path.exists(binary):
                continue
            origin = "nvcc --fatbin"
        note.append(f"{stem}.cu: {origin}")
        dump = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", binary], capture_output=True, text=True, check=True
        ).stdout
        arch = None
        for line in dump.splitlines():
            if m := re.match(r"\s*arch = (sm_\d+)", line):
                arch = m.group(1)
            elif m := re.match(r"\s*Function (\S+):", line):
                func = _short_name(m.group(1))
            elif m := re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
                regs, stack, shared, local = (int(g) for g in m.groups())
                kernel = f"{stem}.{func}"
                budget = next((b for k, b in CUDA_BUDGET_EXCEPTIONS.items() if kernel.startswith(k)), CUDA_LOCAL_BUDGET)
                row = dict(
                    kind="cuda",
                    kernel=kernel,
                    arch=arch,
                    regs=regs,
                    stack=stack,
                    shared=shared,
                    local=local,
                    budget=budget,
                )
                rows.append(row)
                if local + stack > budget:
                    failures.append(f"{kernel} {arch}: {local + stack} bytes of local memory and stack above {budget}")
    return rows, failures, "; ".join(note)


def _newest_input(cu: str) -> float:
    headers = glob.glob(f"{ROOT}/csrc/common/*.h") + glob.glob(f"{ROOT}/csrc/cuda/*.cuh")
    return max(os.path.getmtime(p) for p in [cu] + headers)


def markdown(triton: list[dict], cuda: list[dict], cuda_note: str, seconds: float) -> str:
    lines = [
        "# Kernels: ahead-of-time compilation and resource usage",
        "",
        "Generated by `python scripts/aot_compile.py --cuda --write docs/KERNELS.md` (no GPU needed); "
        "`tests/test_aot.py` compiles the same table in CI and fails on a compile error or spills above a "
        "kernel's budget (the table `_kernels()` in scripts/aot_compile.py). "
        f"Triton AOT compile of all rows: {seconds:.0f} s in this run (3-4 min on 2 cores with a cold Triton cache).",
        "",
        "## Triton kernels (triton.compile with GPUTarget, cuobjdump --dump-resource-usage on its cubin)",
        "",
        "Registers per thread; local memory (spills, stack arrays) and stack in bytes per thread; shared memory "
        "in bytes per "
        "program; production constexprs (kernels/*.py launchers; MoE routing at Mixtral and DeepSeek-V3 "
        "shapes).",
        "",
        "| kernel | dtype | arch | warps | regs | local | stack (spills) | shared | spill budget | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in triton:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['warps']} | **{r['error']}** | | | | | |")
        else:
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['warps']} | {r['regs']} | "
                f"{r['local']} | {r['stack']} | {r['shared']} | {r['budget']} | {r['seconds']:.1f} |"
            )
    lines += [
        "",
        "## CUDA kernels (csrc/cuda, cuobjdump --dump-resource-usage)",
        "",
        f"Device code from: {cuda_note or 'none found (run with --cuda)'}. stack and local memory per thread "
        f"(where spills go); budget {CUDA_LOCAL_BUDGET} bytes (stack + local) for every kernel but "
        f"{CUDA_BUDGET_EXCEPTIONS}. 256 threads per block.",
        "",
        "| kernel | arch | regs | stack | local | shared |",
        "|---|---|---|---|---|---|",
    ]
    for r in cuda:
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['stack']} | {r['local']} | {r['shared']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="PATH", help="write the Markdown table there")
    parser.add_argument(
        "--cuda", action="store_true", help="compile csrc/cuda/*.cu with nvcc when build/ holds no CUDA objects"
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    start = time.time()
    triton, failures = triton_rows()
    seconds = time.time() - start
    cuda, cuda_failures, note = cuda_rows(build=args.cuda)
    failures += cuda_failures
    text = markdown(triton, cuda, note, seconds)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    else:
        print(text)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
