"""Triton kernels of unlearn_fast (installed as ``unlearn_fast.kernels``), one module per op family.

Importing a module here needs triton; the ops in ``unlearn_fast.ops`` import them lazily, only
when the Triton backend is selected. On CPU tensors they run under ``TRITON_INTERPRET=1``.

Launch sizes, one switch for every kernel: ``INTERPRET`` (``TRITON_INTERPRET=1``, read when the kernels are
defined) selects large blocks and a single configuration, since the interpreter is slow per program and timing
it would be meaningless; otherwise the GPU configurations (block sizes, warps, stages), autotuned over by
``triton.autotune`` where the kernel allows it. ``scripts/aot_compile.py`` compiles every GPU configuration.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch(gpu: dict, interpreter: dict) -> dict:
    """The fixed launch of a kernel that is not autotuned: constexprs plus ``num_warps`` (GPU only)."""
    return dict(interpreter) if INTERPRET else dict(gpu)


def autotune_configs(gpu: list[dict], interpreter: dict) -> list:
    """``triton.Config`` list for ``triton.autotune``: ``interpreter`` alone under the interpreter (one config:
    nothing is timed), ``gpu`` otherwise; ``num_warps`` / ``num_stages`` keys go to the config, the rest are
    constexprs."""
    import triton

    def config(c: dict):
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))

    return [config(interpreter)] if INTERPRET else [config(c) for c in gpu]
