"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, with resource figures.

No GPU is needed: Triton's own compiler runs with an explicit ``GPUTarget`` and yields PTX and a
cubin, at every GPU launch configuration of each kernel (each config of its ``triton.autotune`` list, or
its module's fixed ``LAUNCH``; kernels/__init__.py). The cubin read with ``cuobjdump --dump-resource-usage``
(bundled with triton) gives registers, local memory (spills), stack and shared memory; the PTX, the
widest global load (16 bytes: vectorised). The
CUDA kernels' figures come from ``cuobjdump --dump-resource-usage`` on their compiled device code:
the objects of a CUDA build in build/ when there are some (CI builds them), otherwise each .cu
compiled once with ``nvcc --fatbin`` into build/aot/ (``--cuda``; ~40 s per file for both archs). Each must
embed PTX of the newest arch (setup.py's forward-compatibility flag), checked with ``cuobjdump --list-ptx``.

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
    """One Triton kernel, compiled at each of its GPU launch configurations: every config of its
    ``triton.autotune`` list, or the one fixed launch given here (``constexprs`` plus ``num_warps``)."""

    module: str  # under unlearn_fast.kernels
    name: str
    signature: dict[str, str]  # runtime arguments; "{T}" stands for the element type of the data
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4  # fixed launches only (an autotuned kernel's warps come from its configs)
    num_stages: int = 3
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    spill_budget: int = 0  # bytes of stack frame + local memory (where ptxas spills) allowed per thread
    suffix: str = ""  # which configuration, when a kernel is listed more than once
    # Integer arguments that are multiples of 16 at production sizes: Triton specialises such values at run time
    # (as it does 16-byte aligned pointers, all assumed here), which is what lets loads vectorise.
    aligned: tuple[str, ...] = ()


def _acc(dtype: str):
    import triton.language as tl

    return tl.float64 if dtype == "fp64" else tl.float32


def _kernels() -> list[Kernel]:
    """The table: every @triton.jit kernel launched by the library and its spill budget (0: no spills).

    Launch configurations are read from the kernels themselves (autotune configs, or the modules' fixed
    ``LAUNCH``), so the table compiles what a GPU runs. The budgets are the figures of today's configurations.
    """
    from unlearn_fast.kernels import moe_routing as moe
    from unlearn_fast.kernels import solver_update as solver
    from unlearn_fast.kernels import sophia_update as sophia

    rows = ("vocab", "stride")
    ffn_flags = dict(UPCAST=False, ROUND_BF16=False)
    # Mixtral (softmax top-2 of 8) and DeepSeek-V3 (sigmoid, bias, 8 groups, top-4 groups, top-8 of 256).
    mixtral = dict(TOP_K=2, SIGMOID=False, RENORM=True, N_GROUP=1, TOPK_GROUP=1, GROUP_SIZE=8, TOP2=False,
                   HAS_BIAS=False, E=8)  # fmt: skip
    deepseek = dict(TOP_K=8, SIGMOID=True, RENORM=True, N_GROUP=8, TOPK_GROUP=4, GROUP_SIZE=32, TOP2=True,
                    HAS_BIAS=True, E=256)  # fmt: skip
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
            aligned=rows,
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
            dict(HAS_GRAD_LSE=True, COMPUTE_LSE=True),
            aligned=rows,
        ),
        Kernel(
            "ce_curvature",
            "_lse_kernel",
            {"logits_ptr": "*{T}", "lse_ptr": "*fp32", "vocab": "i32", "stride": "i32"},
            aligned=rows,
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
            aligned=rows,
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
                dict(**ffn_flags, ACT=act, PRECISION=None),
                suffix=act_name,
                aligned=("H", "I"),
            ),
            Kernel(
                "expert_ffn",
                "_glu_backward_kernel",
                {"a_ptr": "*{T}", "dh_ptr": "*{T}", "h_ptr": "*{T}", "da_ptr": "*{T}", "N": "i32", "I": "i32"},
                dict(ACT=act, ROUND_BF16=False),
                suffix=act_name,
                aligned=("I",),
            ),
        ]
    out.append(
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
            dict(**ffn_flags, PRECISION=None),
            aligned=("H", "TWO_I"),
        )
    )
    for cfg_name, cfg in (("mixtral", mixtral), ("deepseek", deepseek)):
        experts = cfg.pop("E")
        block_t, block_e = moe.block_shape(experts)
        cfg.update(BLOCK_T=block_t, BLOCK_E=block_e)
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
            ),
        ]
        for k in routed:
            k.suffix, k.num_warps = cfg_name, moe.LAUNCH["num_warps"]
            if cfg_name == "deepseek":  # fp32 router logits; the unrolled group loops take ~15 s per compile
                k.dtypes = ("fp32",)
            out.append(k)
    flat = dict(BLOCK=solver.LAUNCH["BLOCK"])
    fixed = dict(dtypes=("fp32", "fp64"), num_warps=solver.LAUNCH["num_warps"], aligned=("numel",))
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
            **fixed,
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
            **fixed,
        ),
        Kernel(
            "solver_update",
            "_xpay_kernel",
            {"p_ptr": "*{T}", "r_ptr": "*{T}", "coef_ptr": "*fp64", "numel": "i64"},
            flat,
            **fixed,
        ),
        Kernel(
            "sophia_update",
            "_sophia_kernel",
            {"buffer": "*i64", "chunk_table": "*i64"},
            dict(
                HESSIAN_FROM_GRAD=True,
                SOUL_REFERENCE=False,
                P_DTYPE="{T}",
                N_CONSTS=9,
                ALIGNED=True,
                BLOCK=sophia.LAUNCH["BLOCK"],
            ),  # fmt: skip
            num_warps=sophia.LAUNCH["num_warps"],
        ),
    ]
    return out


def _tl_type(name: str):
    import triton.language as tl

    return {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[name]


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def launch_configs(kernel: Kernel) -> list[tuple[str, dict, int, int]]:
    """(label, constexprs, num_warps, num_stages) of each GPU launch of the kernel: one per autotune config."""
    import importlib

    fn = getattr(importlib.import_module(f"unlearn_fast.kernels.{kernel.module}"), kernel.name)
    if not hasattr(fn, "configs"):
        return [("fixed", dict(kernel.constexprs), kernel.num_warps, kernel.num_stages)]
    out = []
    for c in fn.configs:
        label = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in c.kwargs.items())
        out.append((label, dict(kernel.constexprs, **c.kwargs), c.num_warps, c.num_stages))
    return out


def compile_triton(kernel: Kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str, arch: int) -> dict:
    """Compile one kernel at one configuration; its figures from cuobjdump on the cubin (registers, spills...)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"unlearn_fast.kernels.{kernel.module}"), kernel.name)
    if hasattr(fn, "configs"):  # an autotuner: the @triton.jit function it wraps
        fn = fn.fn
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("TRITON_INTERPRET=1 replaces the kernels: run the AOT compile without it")
    consts = {k: (_tl_type(dtype) if v == "{T}" else v) for k, v in constexprs.items()}
    if "ACC" in fn.arg_names:
        consts["ACC"] = _acc(dtype)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = kernel.signature[name].replace("{T}", dtype)
        if sig[name].startswith("*") or name in kernel.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
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
    return dict(regs=regs, stack=stack, local=local, shared=max(shared, compiled.metadata.shared),
                load_bytes=widest_load(compiled.asm["ptx"]))  # fmt: skip


def widest_load(ptx: str) -> int:
    """Bytes of the widest global load per thread in the PTX (16: fully vectorised), direct or async to shared."""
    direct = [int(v or 1) * int(bits) // 8 for v, bits in re.findall(r"ld\.global\S*?(?:\.v(\d))?\.[bfsu](\d+)", ptx)]
    to_shared = [int(n, 0) for n in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*, (0x\w+|\d+)", ptx)]
    return max(direct + to_shared, default=0)


def triton_rows(archs=ARCHS, only: str | None = None) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for kernel in _kernels():
        label = kernel.name + (f"[{kernel.suffix}]" if kernel.suffix else "")
        if only and only not in f"{kernel.module}.{label}":
            continue
        for config, constexprs, warps, stages in launch_configs(kernel):
            for dtype in kernel.dtypes:
                for arch in archs:
                    row = dict(
                        kind="triton",
                        kernel=f"{kernel.module}.{label}",
                        config=config,
                        dtype=dtype,
                        arch=f"sm_{arch}",
                        warps=warps,
                        stages=stages,
                        budget=kernel.spill_budget,
                    )
                    where = f"{row['kernel']} ({config}) {dtype} sm_{arch}"
                    t0 = time.time()
                    try:
                        row.update(compile_triton(kernel, constexprs, warps, stages, dtype, arch))
                        row["seconds"] = time.time() - t0
                    except Exception as e:  # a compile error is a finding, reported with the others
                        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                        failures.append(f"{where}: {row['error']}")
                    else:
                        if row["stack"] + row["local"] > kernel.spill_budget:
                            failures.append(
                                f"{where}: {row['stack'] + row['local']} bytes of stack frame and local memory "
                                f"(spills) per thread above its budget of {kernel.spill_budget}"
                            )
                    rows.append(row)
    return rows, failures


# ------------------------------------------------------------------------------------------------
# CUDA kernels (csrc/cuda/*.cu): device code only, both archs, figures from cuobjdump.

CUDA_LOCAL_BUDGET = 0  # bytes of stack + local memory (spills, stack arrays) per thread for every CUDA kernel
# ... except these (kernel name prefix: bytes), today's figures: a small per-thread array on sm_90.
CUDA_BUDGET_EXCEPTIONS = {"moe_routing.moe_routing::attribution_kernel": 8}


def _nvcc_command(cu: str, out: str) -> list[str]:
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
    cmd += ["-gencode", f"arch=compute_{max(ARCHS)},code=compute_{max(ARCHS)}"]  # PTX, as setup.py embeds it
    return cmd + [cu, "-o", out]


def _nvcc_fatbin(cu: str, out: str) -> None:
    """Compile ``cu`` to ``out`` unless an up-to-date one was made by the same command (kept in ``out.cmd``)."""
    cmd = _nvcc_command(cu, out)
    stamp = out + ".cmd"
    fresh = os.path.exists(out) and os.path.getmtime(out) >= _newest_input(cu)
    if fresh and os.path.exists(stamp) and open(stamp).read() == " ".join(cmd):
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(stamp, "w") as f:
        f.write(" ".join(cmd))


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
            if build:
                _nvcc_fatbin(cu, binary)
            if not os.path.exists(binary):
                continue
            origin = "nvcc --fatbin"
        note.append(f"{stem}.cu: {origin}")
        # Forward compatibility: PTX of the newest arch, which a newer GPU's driver JIT-compiles.
        ptx = subprocess.run([_cuobjdump(), "--list-ptx", binary], capture_output=True, text=True).stdout
        if f".sm_{max(ARCHS)}.ptx" not in ptx:
            failures.append(f"{stem}.cu ({origin}): no sm_{max(ARCHS)} PTX embedded (cuobjdump --list-ptx)")
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


LAUNCH_SECTION = [
    "## Launch configurations",
    "",
    "One switch, `unlearn_fast.kernels.INTERPRET` (`TRITON_INTERPRET=1` when the kernels are defined), in "
    "kernels/__init__.py: under the interpreter every kernel gets one large block (the CPU tests; nothing is "
    "timed), otherwise its GPU configurations. No kernel file reads the variable itself (tests/test_aot.py).",
    "",
    "| kernels | GPU launch | autotune key |",
    "|---|---|---|",
    "| token_logprobs `_forward_kernel`, `_grad_kernel`; ce_curvature `_lse_kernel`, `_curvature_kernel` | "
    "`ROW_CONFIGS`: BLOCK_V 1024 (4 warps), 2048 and 4096 (8 warps); one program per row | `vocab` (in-place "
    "outputs restored between timed runs: `restore_value`) |",
    "| expert_ffn `_gather_glu_kernel` | 64x64x32 or 128x64x32 tiles, 8 warps, 3 stages | `H`, `I` (not the "
    "token count N, which changes with every routing) |",
    "| expert_ffn `_gather_wgrad_kernel` | 64x64x32 (4 warps) or 128x128x32 (8 warps) | `H`, `TWO_I` |",
    "| expert_ffn `_glu_backward_kernel` | 32x64 (4 warps) or 64x64 (8 warps) | `I` |",
    "| solver_update (3 kernels) | fixed: 1024 elements, 4 warps | none: the partial sums' order must not "
    "depend on a timing race (reproducible solves) |",
    "| sophia_update | fixed: 1024 elements, 4 warps; chunk table built once per list of sizes, kept on the "
    "device | none: it writes through a pointer table that autotuning could not restore |",
    "| moe_routing (3 kernels) | fixed: ~2048 values (rows x padded experts) per program, 4 warps | none: "
    "per-program partial sums, as the solver |",
    "",
    "Autotuned kernels pick their configuration by timing on first use of a key, once per process; their "
    "row reductions (log-sum-exp) may differ in the last bits between processes that pick different blocks. "
    "Before this table the kernels ran interpreter-sized blocks on GPUs too: 255 registers and up to 936 "
    "bytes of spills per thread (expert_ffn, sophia_update, solver_update, DeepSeek routing); every "
    "configuration below now runs without spills, and the spill budgets are 0.",
    "",
    "## On a GPU machine: scripts/gpu_check.sh",
    "",
    "`bash scripts/gpu_check.sh` builds the CUDA extension (SASS for sm_80/sm_90 and this GPU, plus sm_90 PTX "
    "that newer GPUs JIT), runs the property tests on GPU tensors, every registered op (csrc/ops.cpp) at real "
    "sizes in bf16 and fp32 against its PyTorch reference with a roofline table (`scripts/gpu_ops_check.py`: "
    "achieved GB/s and TFLOP/s against the device's peaks, bytes and flops counted per op, written to "
    "bench/results/gpu_ops.md), SOUL end to end per backend, FSDP over NCCL with 2+ GPUs, the whole suite "
    "and the benchmarks. `--dry-run` prints all of it without a GPU; tests/test_gpu_check.py fails if an op "
    "of the registry is missing from it and runs every op check at tiny size on the CPU backends. No GPU has "
    "run it yet.",
    "",
]


def markdown(triton: list[dict], cuda: list[dict], cuda_note: str, seconds: float) -> str:
    lines = [
        "# Kernels: ahead-of-time compilation and resource usage",
        "",
        "Generated by `python scripts/aot_compile.py --cuda --write docs/KERNELS.md` (no GPU needed); "
        "`tests/test_aot.py` compiles the same table in CI and fails on a compile error or spills above a "
        "kernel's budget (the table `_kernels()` in scripts/aot_compile.py). "
        f"Triton AOT compile of all rows: {seconds:.0f} s in this run (3-4 min on 2 cores with a cold Triton cache).",
        "",
        *LAUNCH_SECTION,
        "## Triton kernels (triton.compile with GPUTarget, cuobjdump --dump-resource-usage on its cubin)",
        "",
        "One row per kernel, GPU launch configuration (its autotune configs, or `fixed`), dtype and arch. Registers "
        "per thread; local memory (spills, stack arrays) and stack in bytes per thread; shared memory in bytes per "
        "program; the widest global load per thread in bytes (16: vectorised; direct or `cp.async` to shared), "
        "with 16-byte aligned pointers and the sizes named in `_kernels()` multiples of 16, as Triton specialises "
        "them at run time. MoE routing at Mixtral and DeepSeek-V3 shapes.",
        "",
        "| kernel | config | dtype | arch | warps | stages | regs | local | stack (spills) | shared | widest load (B) "
        "| spill budget | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in triton:
        head = f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['arch']} | {r['warps']} | {r['stages']} |"
        if "error" in r:
            lines.append(f"{head} **{r['error']}** | | | | | | |")
        else:
            lines.append(
                f"{head} {r['regs']} | {r['local']} | {r['stack']} | {r['shared']} | {r['load_bytes']} | "
                f"{r['budget']} | {r['seconds']:.1f} |"
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
    parser.add_argument("--only", metavar="TEXT", help="compile only the Triton kernels whose name contains TEXT")
    parser.add_argument(
        "--cuda", action="store_true", help="compile csrc/cuda/*.cu with nvcc when build/ holds no CUDA objects"
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    start = time.time()
    triton, failures = triton_rows(only=args.only)
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
