import os

# Triton kernels run on CPU tensors only through the interpreter, which must be switched on
# before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from unlearn_fast.backend import ENV_VAR, available_backends  # noqa: E402


def cpu_backends() -> list[str]:
    """The backends that can run on CPU tensors here (the reference is the baseline)."""
    reasons = available_backends()["cpu"]
    return [b for b in ("cpp", "triton") if reasons[b] is None]


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend(name): run the ops of this test on one backend."""

    def force(name: str) -> None:
        monkeypatch.setenv(ENV_VAR, name)

    return force
