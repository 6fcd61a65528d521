"""Crash-safe checkpoint files: written whole or not at all, fingerprints to match a resume, and
:class:`CheckpointFile` (a method's file and what it was made from: LLMEraser's solve) and
:class:`CheckpointedRun`, the save/resume of a training loop that SOUL and UOE share.

``atomic_save`` writes through :func:`unlearn_fast.io.atomic_path`, so a reader (or a resumed run
after a crash, an interrupt or a power cut) sees either the previous checkpoint or the new one,
never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from unlearn_fast import distributed
from unlearn_fast.io import atomic_path

_FORMAT = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (:func:`unlearn_fast.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`atomic_save`, on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file this library did not write, or another format
        raise ValueError(
            f"{path} is not a readable unlearn_fast checkpoint ({error}); delete it to start over"
        ) from error


def tensor_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of names, shapes, dtypes and exact values: tells whether a resume starts from the
    same model (or data) as the run that wrote the checkpoint."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in named:
        t = distributed.local(t.detach()).to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batches_fingerprint(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """:func:`tensor_fingerprint` of a list of collated batches, in order."""
    return tensor_fingerprint(
        (f"{i}.{key}", batch[key])
        for i, batch in enumerate(batches)
        for key in sorted(batch)
        if torch.is_tensor(batch[key])
    )


def check_every(checkpoint_every: Any, where: str) -> None:
    """``checkpoint_every`` must be an integer >= 1 (checked with or without a checkpoint_dir)."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"{where}: checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")


class CheckpointFile:
    """One method's checkpoint file: what was saved at ``path`` (if anything) and what it was made
    from, so that resuming another run from it is an error, never a silent mix of two runs.

    ``settings``: the run's settings (compared as text). :meth:`check` adds more of what the run is
    made from (hashes of the initial model and of the data). :meth:`write` saves a state dict with
    ``step`` atomically. Under torch.distributed rank 0 writes and every rank reads; with
    ``sharded`` (an FSDP-sharded model) every rank writes and reads its own file, and all must be
    at one step.
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any], *, sharded: bool = False):
        path = Path(path)
        self.sharded = sharded
        if sharded:  # every rank holds other shards of the state: one file per rank
            rank, world_size = distributed.rank_and_world_size()
            path = path.with_name(f"{path.stem}.rank{rank}of{world_size}{path.suffix}")
        self.path = path
        self.identity: dict[str, Any] = {"config": {k: repr(v) for k, v in settings.items()}}
        self.saved: dict[str, Any] | None = None  # the checkpoint found at ``path``, if any
        if self.path.exists():
            state = load(self.path)
            if state.get("format") != _FORMAT:
                raise ValueError(
                    f"{self.path}: checkpoint format {state.get('format')!r} is not {_FORMAT}; delete it to start over"
                )
            self.saved = state
        if sharded:  # a crash between two ranks' writes leaves files of different steps
            distributed.all_equal(
                self.saved["step"] if self.saved is not None else -1,
                f"the step of their checkpoints {self.path.name} (delete them to start over)",
            )

    def check(self, **identity: Any) -> None:
        """Record more of what the run is made from, and compare all of it recorded so far (the
        settings included) with the checkpoint's: called as soon as each part is known, so that
        nothing read from a checkpoint of another run is used."""
        self.identity.update(identity)
        if self.saved is None:
            return
        saved, mine = self.saved["identity"], self.identity
        different = [f"setting {k}" for k in mine["config"] if saved["config"].get(k) != mine["config"][k]]
        different += [what for what in mine if what != "config" and saved.get(what) != mine[what]]
        if different:
            raise ValueError(
                f"{self.path} was written by another run (different {', '.join(different)}); pass "
                "another checkpoint_dir, or delete the checkpoint to start over"
            )

    def write(self, state: Mapping[str, Any]) -> None:
        """Save ``state`` (with its ``step``) and the identity, atomically."""
        # Every rank holds the same state (one writer), or its own shards (one file each).
        if self.sharded or distributed.rank_and_world_size()[0] == 0:
            atomic_save({"format": _FORMAT, "identity": self.identity, **state}, self.path)
        # No rank goes on (say, to a next run that resumes from this file) before it is written.
        distributed.barrier()


class CheckpointedRun(CheckpointFile):
    """Saves and restores everything a training loop's next step depends on: the trained tensors,
    the optimizer state, the step, the random generator, the data-order positions (objects with
    ``state_dict`` / ``load_state_dict``), the history, and ``extra`` (what the method needs to
    rebuild the run before it can restore it, e.g. UOE's target expert).

    ``config``: the run's settings, a dataclass with a ``steps`` field (every field but ``steps``
    must match on a resume; ``steps`` may be raised to continue a finished run).
    """

    def __init__(self, path: str | os.PathLike, config: Any, *, sharded: bool = False):
        super().__init__(
            path,
            {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "steps"},
            sharded=sharded,
        )
        self.steps = config.steps
        self.extra: dict[str, Any] = {}  # saved as is; the method sets it before the first save
        self._live: tuple = ()

    @property
    def saved_extra(self) -> dict[str, Any]:
        """The ``extra`` of the checkpoint found (empty without one)."""
        return dict(self.saved.get("extra", {})) if self.saved is not None else {}

    def check(self, **identity: Any) -> None:
        super().check(**identity)
        if self.saved is not None and self.saved["step"] > self.steps:
            raise ValueError(
                f"{self.path} is at step {self.saved['step']}, past steps={self.steps}; raise steps to at "
                "least that, or pass another checkpoint_dir"
            )

    def resume(
        self,
        named: Sequence[tuple[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        streams: Sequence[Any],
        history: list[dict[str, float]],
    ) -> int:
        """Bind the run's live state (what :meth:`save` writes) and load the checkpoint into it, if
        there is one: returns its step (0 without one). Call :meth:`check` first."""
        self._live = (named, optimizer, generator, streams)
        if self.saved is None:
            return 0
        state = self.saved
        with torch.no_grad():
            for (_, p), value in zip(named, state["params"]):
                distributed.local(p).copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        for stream, stream_state in zip(streams, state["streams"]):
            stream.load_state_dict(stream_state)
        history.extend(state["history"])
        return int(state["step"])

    def save(self, step: int, history: list[dict[str, float]]) -> None:
        named, optimizer, generator, streams = self._live
        self.write(
            {
                "step": step,
                "history": history,
                "extra": self.extra,
                "params": [distributed.local(p.detach()) for _, p in named],
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "streams": [s.state_dict() for s in streams],
            }
        )
