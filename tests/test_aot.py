"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 within its spill budget; so do the CUDA
kernels when a CUDA build left its objects in build/ (CI builds them).

The interpreter (TRITON_INTERPRET=1, which the other tests use) accepts code that Triton's compiler rejects,
so the compile runs in a subprocess without it: scripts/aot_compile.py, the same command that writes
docs/KERNELS.md. About 3 minutes on 2 cores with a cold Triton cache, seconds with a warm one.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm80_and_sm90_within_its_budget():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "aot_compile.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    table = run.stdout
    for kernel in ("_curvature_kernel", "_gather_wgrad_kernel", "_sophia_kernel", "_residual_backward_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert any(kernel in line and arch in line for line in table.splitlines()), (kernel, arch)


def test_one_launch_switch_for_every_kernel(monkeypatch):
    """kernels/__init__.py is the only place that reads TRITON_INTERPRET; under the interpreter every autotuned
    kernel has one config (nothing timed), on a GPU its GPU list."""
    import glob

    import unlearn_fast.kernels as kernels
    from unlearn_fast.kernels import ce_curvature, expert_ffn, token_logprobs

    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        if not path.endswith("__init__.py"):
            assert 'TRITON_INTERPRET")' not in open(path).read().replace("'", '"'), path
    assert kernels.INTERPRET  # tests/conftest.py switches the interpreter on
    tuned = [token_logprobs._forward_kernel, token_logprobs._grad_kernel, ce_curvature._lse_kernel,
             ce_curvature._curvature_kernel, expert_ffn._gather_glu_kernel, expert_ffn._glu_backward_kernel,
             expert_ffn._gather_wgrad_kernel]  # fmt: skip
    assert all(len(k.configs) == 1 for k in tuned)
    gpu = [dict(BLOCK=1024, num_warps=4), dict(BLOCK=2048, num_warps=8, num_stages=2)]
    monkeypatch.setattr(kernels, "INTERPRET", False)
    configs = kernels.autotune_configs(gpu=gpu, interpreter=dict(BLOCK=4096))
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in configs] == [
        ({"BLOCK": 1024}, 4, 3),
        ({"BLOCK": 2048}, 8, 2),
    ]
    assert kernels.launch(gpu=gpu[0], interpreter=dict(BLOCK=4096)) == gpu[0]
