"""What every method returns: :class:`UnlearnResult`, saved and loaded one way.

A result holds the unlearned model, the config it was run with, per-step metrics (``history``),
final metrics, timing and the names of the tensors that changed. ``save(dir)`` writes exactly
those tensors (``weights.safetensors``), the config (``config.json``) and the metrics
(``result.json``), atomically (:func:`unlearn_fast.io.atomic_path`); ``UnlearnResult.load(dir,
model)`` applies the saved tensors to a copy of the model the method started from.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unlearn_fast.io import atomic_path

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"


def _json_safe(value: Any) -> Any:
    """NaN/inf as strings (JSON has neither), tensors and tuples as lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if torch.is_tensor(value):
        return _json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class UnlearnResult:
    """The outcome of one unlearning run (SOUL, UOE) or edit (LLMEraser)."""

    method: str  # "soul" | "uoe" | "llmeraser"
    model: torch.nn.Module  # the unlearned model (a copy unless the run was in place)
    config: Any  # the method's config (a Config dataclass; a dict after load)
    history: list[dict[str, float]] = field(default_factory=list)  # per-step metrics
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics
    wall_time_s: float = 0.0
    trained: list[str] = field(default_factory=list)  # names of the parameters that changed

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the changed tensors, the config and the metrics to the directory ``path``, atomically."""
        params = dict(self.model.named_parameters())
        missing = [name for name in self.trained if name not in params]
        if missing:
            raise ValueError(f"save: the result's model has no parameter(s) {missing[:3]}")
        tensors = {name: params[name].detach().to("cpu").contiguous() for name in self.trained}
        config = self.config.to_dict() if hasattr(self.config, "to_dict") else dict(self.config)
        summary = {
            "method": self.method,
            "trained": self.trained,
            "metrics": self.metrics,
            "history": self.history,
            "wall_time_s": self.wall_time_s,
            **self._extra(),
        }
        with atomic_path(path, directory=True, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"method": self.method})
            (tmp / CONFIG_FILE).write_text(json.dumps(_json_safe(config), indent=2))
            (tmp / RESULT_FILE).write_text(json.dumps(_json_safe(summary), indent=2))
        return Path(path)

    def _extra(self) -> dict[str, Any]:
        """Method-specific fields to record beside the metrics (subclasses)."""
        return {}

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module, *, inplace: bool = False) -> UnlearnResult:
        """The result saved at ``path``, its tensors applied to ``model`` (a copy unless ``inplace``):
        pass the model the method started from (the same architecture and adapters)."""
        path = Path(path)
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no saved result ({WEIGHTS_FILE} is missing)")
        summary = json.loads((path / RESULT_FILE).read_text())
        config = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_file(str(path / WEIGHTS_FILE))
        target = model if inplace else copy.deepcopy(model)
        params = dict(target.named_parameters())
        missing = sorted(set(tensors) - set(params))
        if missing:
            raise ValueError(
                f"{path} was saved from another model: this one has no parameter(s) {missing[:3]}; "
                "pass the model the method started from"
            )
        with torch.no_grad():
            for name, value in tensors.items():
                if params[name].shape != value.shape:
                    raise ValueError(
                        f"{path}: {name} has shape {tuple(value.shape)} there, "
                        f"{tuple(params[name].shape)} in this model"
                    )
                params[name].copy_(value)
        return UnlearnResult(
            method=summary["method"],
            model=target,
            config=config,
            history=summary["history"],
            metrics=summary["metrics"],
            wall_time_s=summary["wall_time_s"],
            trained=summary["trained"],
        )
