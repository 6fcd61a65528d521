"""Sums over a training set split across ``torch.distributed`` ranks.

When a process group is initialised (e.g. by ``torchrun``; gloo on CPU, NCCL on GPUs), each rank
takes every ``world_size``-th item of a list and the partial sums are all-reduced, so every rank
ends with the same total. Without a process group everything is a single-process no-op. All
ranks must make the same calls in the same order (collectives pair up by order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one, starting at its rank.

    Strided rather than contiguous, so that a list sorted by cost (e.g. sequence length) gives
    every rank a similar load.
    """
    rank, world_size = rank_and_world_size()
    return list(items[rank::world_size])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks, as a new tensor outside the autograd graph; ``value``
    itself without a process group. For the normalisers of losses whose batch is split across
    the ranks (e.g. the answer-token count of a mean cross-entropy)."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    if total.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        total = total.cuda()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place; returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if is_distributed():
        dist.barrier()
