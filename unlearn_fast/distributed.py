"""Sums over a training set split across ``torch.distributed`` ranks.

When a process group is initialised (e.g. by ``torchrun``; gloo on CPU, NCCL on GPUs), each rank
takes every ``world_size``-th item of a list and the partial sums are all-reduced, so every rank
ends with the same total. Without a process group everything is a single-process no-op. All
ranks must make the same calls in the same order (collectives pair up by order).

For a model too large for one device, :func:`shard_layers` shards its decoder layers with FSDP;
the methods then reduce the gradients of sharded parameters through FSDP and the rest as above.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def unwrap_ddp(model: T) -> T:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise). The
    methods split the data and sum the gradients themselves; run directly, the inner module's
    parameters train as the wrapper's (DDP's gradient hooks stay idle outside its forward)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def all_equal(value: int, what: str) -> None:
    """Raise unless every rank passes the same integer ``value`` (e.g. the step of a checkpoint)."""
    if not is_distributed():
        return
    extremes = torch.tensor([value, -value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        extremes = extremes.cuda()
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    high, low = int(extremes[0]), -int(extremes[1])
    if high != low:
        raise RuntimeError(f"the ranks disagree on {what}: from {low} to {high}")


# --------------------------------------------------------------------------------------------
# Sharded models (FSDP): for a model that does not fit one device
# --------------------------------------------------------------------------------------------


def shard_layers(
    model: torch.nn.Module, *, device: str | torch.device | None = None, skip: Sequence[int] = ()
) -> torch.nn.Module:
    """Shard every decoder layer of ``model`` across the ranks with FSDP (torch's ``fully_shard``),
    in place; returns ``model``.

    Each rank holds 1/world_size of every layer's parameters (LoRA adapters included) and gathers
    a layer's whole weights only while it runs. The embeddings, the final norm and the LM head stay
    whole on every rank: the fused losses read the head's weight directly. Every rank must pass the
    same model (e.g. loaded from the same files). ``device``: where the shards live (default: where
    the model is); under NCCL call ``torch.cuda.set_device(local_rank)`` first and pass ``"cuda"``.
    ``skip``: indices of layers to keep whole (UOE's target layer, whose expert it trains).
    SOUL and UOE train such a model (``inplace=True``: FSDP models cannot be copied).
    """
    if not is_distributed():
        raise ValueError(
            "shard_layers needs a torch.distributed process group of 2 or more ranks "
            "(launch with torchrun and call torch.distributed.init_process_group first)"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from unlearn_fast.models.structure import decoder_layers

    device = torch.device(device) if device is not None else next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for i, layer in enumerate(decoder_layers(model)):
        if i not in skip:
            fully_shard(layer, mesh=mesh)
    return model.to(device)  # the unsharded rest follows the shards


def check_sharded_model(model: torch.nn.Module, who: str, inplace: bool) -> bool:
    """Whether ``model`` has FSDP-sharded parameters; an error if it has but cannot be trained
    that way (a sharded LM head, or a copy asked for)."""
    if not any(is_sharded(p) for p in model.parameters()):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and is_sharded(head.weight):
        raise ValueError(
            f"{who}: the LM head is FSDP-sharded, but the fused loss reads its weight whole; shard the "
            "decoder layers only, with unlearn_fast.distributed.shard_layers(model)"
        )
    if not inplace:
        raise ValueError(
            f"{who}: an FSDP-sharded model cannot be copied (FSDP does not support deepcopy, and a copy "
            "would take the memory sharding saves); pass inplace=True: an error or interrupt still "
            "restores the trained parameters"
        )
    return True


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter of an FSDP-sharded module, or its state)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach it), or ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@contextmanager
def summed_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Inside: the FSDP modules of ``model`` reduce gradients by summing over the ranks, not by
    averaging (the methods' losses are already each rank's share of the global mean), with a plain
    SUM (gloo has neither AVG nor PREMUL_SUM). Their settings come back on exit."""
    from torch.distributed.fsdp import FSDPModule

    keys = ("gradient_divide_factor", "force_sum_reduction_for_comms")
    groups = [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]
    before = [{k: getattr(g, k) for k in keys} for g in groups]
    for g in groups:
        g.gradient_divide_factor, g.force_sum_reduction_for_comms = 1.0, True
    try:
        yield
    finally:
        for g, settings in zip(groups, before):
            for k, v in settings.items():
                setattr(g, k, v)


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """The 2-norm of all ``tensors`` together, where DTensors count all their shards once (their
    local squares are summed over the ranks) and plain tensors, the same on every rank, once."""
    zero = torch.zeros((), dtype=torch.float64)
    sharded = sum((local(t).double().square().sum().cpu() for t in tensors if is_sharded(t)), zero)
    whole = sum((t.double().square().sum().cpu() for t in tensors if not is_sharded(t)), zero)
    if any(is_sharded(t) for t in tensors):
        sharded = global_sum(sharded)
    return float((sharded + whole).sqrt())
