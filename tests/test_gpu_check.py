"""scripts/gpu_check.sh and scripts/gpu_ops_check.py, the GPU machine's one command, as far as a CPU can run them:
the dry run lists every op of the registry (csrc/ops.cpp), and the op checks run end to end at tiny sizes on
the CPU backends, passing on the real ops and failing on a broken one."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import cpu_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_ops_check", os.path.join(ROOT, "scripts", "gpu_ops_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_registered_op():
    ops = _load().registered_ops()
    assert len(ops) >= 13 and "expert_ffn_backward" in ops and "moe_anchor_residual" in ops
    run = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    listed = " ".join(line for line in run.stdout.splitlines() if line.startswith("op "))
    missing = [op for op in ops if f"{op}," not in listed + "," and f"{op}]" not in listed]
    assert not missing, f"ops of csrc/ops.cpp missing from gpu_check.sh --dry-run: {missing}"
    for step in ("build_ext.sh", "pytest tests ", "gpu_ops_check.py --write", "make bench-report"):
        assert step in run.stdout, step


def test_an_op_without_a_check_fails(monkeypatch, capsys):
    module = _load()
    monkeypatch.setattr(module, "CHECKS", [c for c in module.CHECKS if c.name != "expert_ffn"])
    assert module.uncovered() == ["expert_ffn", "expert_ffn_backward"]
    assert module.main(["--dry-run"]) == 1
    assert "expert_ffn" in capsys.readouterr().err


@pytest.mark.skipif(not cpu_backends(), reason="no fast CPU backend (C++ extension or Triton) here")
def test_every_check_runs_on_the_cpu_at_tiny_size(capsys):
    assert _load().main(["--device", "cpu", "--size", "tiny", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for check in _load().CHECKS:
        for backend in cpu_backends():
            assert f"| {check.name} | {check.dtypes[0]} | {backend} |" in out


@pytest.mark.skipif(not cpu_backends(), reason="no fast CPU backend (C++ extension or Triton) here")
def test_a_wrong_op_fails_its_check(monkeypatch):
    module = _load()
    import unlearn_fast.ops as ops

    xpay = ops.xpay
    monkeypatch.setattr(ops, "xpay", lambda p, r, beta: xpay(p, r, beta * (1 + 1e-3)))  # a 0.1% error in beta
    (check,) = [c for c in module.CHECKS if c.name == "solver_update"]
    row = module.check_one(check, "tiny", "fp32", cpu_backends()[0], torch.device("cpu"), reps=1)
    assert not row["ok"] and row["error"] > 1e-5 > row["plain_error"]
