"""Prefix caching: skip the frozen bottom layers of a decoder, reading their output from a cache.

When only layers ``layer..L-1`` of a decoder train (UOE trains one expert of layer l*), the
hidden states entering ``layer`` are the same at every step for a given batch. :func:`prefix_cached`
computes them once per batch and, inside the context, makes every forward of the model on one of
those batches skip layers ``0..layer-1``: their ``forward`` returns its input untouched, and the
cached hidden states replace what reaches ``layer``. The embedding lookup and the rotary tables
still run (cheap); the attention mask and positions are rebuilt by the model as usual, so the
result equals the full forward (a test checks every MoE family).

Batches are recognised by what the cached states depend on: a hash of ``input_ids`` and the
``attention_mask`` (:func:`input_key`), read where the decoder (the module holding the layers)
receives them; a forward by ``inputs_embeds`` has no key. A forward on inputs the cache was not
built for is an error, never a silent recomputation through skipped layers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from unlearn_fast.models.structure import decoder_layers, unwrap


class _Stop(Exception):
    """Ends a forward once the cached layer's input is known."""


def input_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bytes:
    """A hash of a batch's token ids and attention mask (None hashes as all ones: the model reads
    them alike), the two inputs the hidden states of a decoder's layers depend on."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.detach().to("cpu", torch.int64)
    mask = mask.contiguous()
    return hashlib.sha1(
        repr((tuple(ids.shape), tuple(mask.shape))).encode() + ids.numpy().tobytes() + mask.numpy().tobytes()
    ).digest()


def _decoder(base: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module whose ``layers`` are ``layers`` (e.g. ``model.model``): it receives ids and mask."""
    for module in base.modules():
        if getattr(module, "layers", None) is layers:
            return module
    raise TypeError(f"prefix_cached: no module of {type(base).__name__} holds its decoder layers as `layers`")


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _passthrough(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@dataclass
class PrefixCache:
    """What :func:`prefix_cached` holds: the hidden states entering ``layer`` per batch."""

    layer: int
    states: dict[bytes, torch.Tensor] = field(default_factory=dict)
    hits: int = 0
    skipped: list[nn.Module] = field(default_factory=list, repr=False)
    active: bool = False

    def _skip(self, on: bool) -> None:
        for layer in self.skipped:
            if on:
                layer.forward = _passthrough  # an instance attribute: nn.Module.__call__ runs it
            else:
                layer.__dict__.pop("forward", None)
        self.active = on

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Full forwards inside (e.g. an evaluation on other data during training)."""
        was = self.active
        self._skip(False)
        try:
            yield
        finally:
            self._skip(was)


@contextmanager
def prefix_cached(
    model: nn.Module,
    layer: int,
    batches: Iterable[Mapping[str, torch.Tensor]],
    states: Mapping[bytes, torch.Tensor] | None = None,
) -> Iterator[PrefixCache]:
    """Inside the context, forwards of ``model`` on ``batches`` skip decoder layers below ``layer``.

    The cache is built on entry (one forward per batch, stopped at ``layer``, without gradients):
    the bottom layers must stay frozen while it is in use. ``layer == 0`` caches nothing and
    changes nothing. On exit the model's own forwards come back, even after an exception; inside,
    :meth:`PrefixCache.paused` brings them back for a while.

    ``states``: hidden states entering ``layer`` already known, by :func:`input_key` (another
    cache's :attr:`PrefixCache.states`, of a model whose layers below ``layer`` compute the same
    function, e.g. the dense model an MoE was upcycled from); those batches are not recomputed.
    """
    base = unwrap(model)
    layers = decoder_layers(base)
    if not 0 <= layer < len(layers):
        raise ValueError(f"prefix_cached: layer must be in [0, {len(layers)}), got {layer}")
    cache = PrefixCache(layer)
    if layer == 0:
        yield cache
        return
    current: dict[str, bytes | None] = {}

    def remember_inputs(module, args, kwargs):  # the decoder's forward(input_ids, attention_mask, ...)
        ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        current["key"] = None if ids is None else input_key(ids, mask)

    def record(module, args, kwargs):
        cache.states[current["key"]] = _hidden_arg(args, kwargs).detach()
        raise _Stop

    handles = [_decoder(base, layers).register_forward_pre_hook(remember_inputs, with_kwargs=True)]
    try:
        handle = layers[layer].register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    key = input_key(batch["input_ids"], batch.get("attention_mask"))
                    if states is not None and key in states:
                        cache.states[key] = states[key]
                        continue
                    try:
                        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()

        def replace(module, args, kwargs):
            if not cache.active:
                return None
            key = current.get("key")
            if key not in cache.states:
                raise KeyError(
                    f"prefix_cached: a forward on token ids and mask the cache of layer {layer} was not "
                    "built for (or by inputs_embeds); "
                    "pass every batch to prefix_cached, or run this forward outside the context"
                )
            cached = cache.states[key]
            if cached.shape != _hidden_arg(args, kwargs).shape:
                raise RuntimeError(
                    f"prefix_cached: cached hidden states {tuple(cached.shape)} do not match "
                    f"{tuple(_hidden_arg(args, kwargs).shape)}"
                )
            cache.hits += 1
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        handles.append(layers[layer].register_forward_pre_hook(replace, with_kwargs=True))
        cache.skipped = list(layers[:layer])
        cache._skip(True)
        yield cache
    finally:
        cache._skip(False)
        for handle in handles:
            handle.remove()
