"""Crash-safe checkpoint files: written whole or not at all, and fingerprints to match a resume.

``atomic_save`` writes to a temporary file in the target's directory, fsyncs it, renames it over
the target (``os.replace`` is atomic within one file system) and fsyncs the directory, so a
reader (or a resumed run after a crash, an interrupt or a power cut) sees either the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see the module docstring)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:  # the rename itself must reach the disk too
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`atomic_save`, on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file this library did not write, or another format
        raise ValueError(f"{path} is not a readable unlearn_fast checkpoint ({error}); delete it to start over") from error


def tensor_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of names, shapes, dtypes and exact values: tells whether a resume starts from the
    same model (or data) as the run that wrote the checkpoint."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in named:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batches_fingerprint(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """:func:`tensor_fingerprint` of a list of collated batches, in order."""
    return tensor_fingerprint((f"{i}.{key}", batch[key]) for i, batch in enumerate(batches)
                              for key in sorted(batch) if torch.is_tensor(batch[key]))
