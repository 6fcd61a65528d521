"""Crash-safe writes: a file or a directory appears whole at its path or not at all.

Everything the library writes (checkpoints, fine-tuning cache entries, saved results and adapters)
goes through :func:`atomic_path`: the content is written to a temporary sibling, flushed to disk,
then renamed over the target (``os.replace`` is atomic within one file system), and the parent
directory is fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``.

    ``directory``: the temporary path is an (empty, existing) directory instead of a file name.
    ``overwrite=False``: an existing ``path`` is an error (``FileExistsError``). A replaced
    directory is moved aside first, then deleted, so ``path`` is never half of either. On any
    error (or an interrupt) the temporary path is removed and ``path`` is untouched.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """The file, or every file of the directory and the directory itself, onto the disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] + [path]
    for f in files:
        _fsync(f)
