"""The compiled extension: which kernels it registered and for which GPUs it holds device code."""

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import unlearn_fast
from unlearn_fast.backend import has_kernel

# Every op whose schema csrc/ops.cpp defines must have a CPU kernel, and a CUDA one in CI.
OPS = tuple(re.findall(r'm\.def\("(\w+)\(', (Path(__file__).parents[1] / "csrc" / "ops.cpp").read_text()))
# CI builds with the CUDA build of torch and sets this: there a missing CUDA build is a failure.
EXPECT_CUDA = os.environ.get("UNLEARN_FAST_EXPECT_CUDA_BUILD") == "1"


def _cuobjdump() -> str | None:
    candidates = [
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
    ]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def test_ops_found():
    assert len(OPS) >= 5 and "token_logprobs" in OPS and "sophia_update" in OPS


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert has_kernel(op, "CPU"), "unlearn_fast._C is missing: run `bash scripts/setup.sh`"


@pytest.mark.skipif(not EXPECT_CUDA, reason="CUDA build checked only where UNLEARN_FAST_EXPECT_CUDA_BUILD=1 (CI)")
def test_cuda_kernels_registered_and_built_for_sm80_and_sm90_with_ptx():
    assert torch.version.cuda is not None, "CI must install the CUDA build of torch"
    for op in OPS:
        assert has_kernel(op, "CUDA"), f"{op} has no CUDA kernel"
    (library,) = glob.glob(str(Path(unlearn_fast.__file__).parent / "_C*.so"))
    tool = _cuobjdump()
    assert tool is not None, "cuobjdump not found (CUDA toolkit or triton's copy)"
    listing = subprocess.run([tool, "--list-elf", library], check=True, capture_output=True, text=True).stdout
    assert "sm_80" in listing and "sm_90" in listing, listing
    # PTX for forward compatibility (setup.py): a GPU newer than sm_90 JIT-compiles it.
    ptx = subprocess.run([tool, "--list-ptx", library], check=True, capture_output=True, text=True).stdout
    assert ".sm_90.ptx" in ptx, ptx


def test_available_backends_reports_reasons():
    report = unlearn_fast.available_backends()
    assert report["cpu"]["reference"] is None
    assert set(report) == {"cpu", "cuda"}
    for device, backends in report.items():
        for name, reason in backends.items():
            assert reason is None or isinstance(reason, str) and reason, (device, name)
