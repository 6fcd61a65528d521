"""Where things are inside a transformers causal LM (a PEFT wrapper looked through)."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The outermost transformers model inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no transformers PreTrainedModel.")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order: the first ``ModuleList`` named ``layers``."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise TypeError(f"{type(model).__name__} has no `layers` ModuleList of decoder layers.")
