"""Which implementation of an op runs: the one dispatch rule of the library.

* CUDA tensor -> the CUDA extension if it was built with CUDA kernels, else Triton.
* CPU tensor  -> the C++ extension if it was built, else the plain PyTorch reference.

``UNLEARN_FAST_BACKEND=reference|cpp|cuda|triton`` forces one backend (tests and benchmarks);
a forced backend that cannot run on the tensor's device is an error, never a silent fallback.
Triton runs on CPU tensors only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

ENV_VAR = "UNLEARN_FAST_BACKEND"
BACKENDS = ("reference", "cpp", "cuda", "triton")

try:
    from unlearn_fast import _C  # noqa: F401  (loading it registers the compiled kernels)

    _EXTENSION_ERROR: str | None = None
except ImportError as exc:  # a pure-Python install, or a build for another torch
    _EXTENSION_ERROR = f"the compiled extension unlearn_fast._C did not load ({exc})"
    warnings.warn(
        f"unlearn_fast: {_EXTENSION_ERROR}; running on the PyTorch reference (and Triton on GPUs). "
        "Reinstall with `pip install --no-build-isolation .` to build the kernels.",
        stacklevel=2,
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel of ``unlearn_fast::<op>`` for the key."""
    if _EXTENSION_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"unlearn_fast::{op}", dispatch_key)
    except RuntimeError:  # an extension built from older sources lacks the op: not available
        return False


def _unavailable_reason(backend: str, op: str, device_type: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device_type`` here, else why not."""
    if backend == "reference":
        return None
    if backend in ("cpp", "cuda"):
        key = "CPU" if backend == "cpp" else "CUDA"
        if device_type != key.lower():
            return f"the {backend} backend runs on {key.lower()} tensors, not {device_type}"
        if _EXTENSION_ERROR is not None:
            return _EXTENSION_ERROR
        if not has_kernel(op, key):
            return f"unlearn_fast._C was built without {key} kernels"
        if key == "CUDA" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def available_backends(op: str = "token_logprobs") -> dict[str, dict[str, str | None]]:
    """For each device type and backend: None if it can run ``op`` here, else the reason why not."""
    return {
        device: {backend: _unavailable_reason(backend, op, device) for backend in BACKENDS}
        for device in ("cpu", "cuda")
    }


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("unlearn_fast_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops of the block on one backend, like ``UNLEARN_FAST_BACKEND`` but scoped.

    The library uses ``use_backend("reference")`` where it differentiates twice or in forward
    mode through an op whose fast kernels have first-order gradients only (Hessian products).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select_backend(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device`` (see the module docstring)."""
    forced = _FORCED.get() or os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; choose one of {BACKENDS} or 'auto'")
        reason = _unavailable_reason(forced, op, device.type)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run {op} on {device}: {reason}")
        return forced
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    return next(b for b in order if _unavailable_reason(b, op, device.type) is None)
