"""The one form of every method's settings: a frozen dataclass with :class:`Config` mixed in.

Each field is a knob with its documented default; the same fields are the command line's flags
(:mod:`unlearn_fast.cli`), the keys of a ``--config`` YAML/JSON file and what a saved result
records (:meth:`Config.to_dict`). An objective field holds an objective instance
(``NPO(beta=0.1)``) or its name; it is written as ``{"name": "npo", "beta": 0.1, ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


class Config:
    """Serialisation shared by the method configs (mixed into their frozen dataclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-able values (objectives as their spec, tuples as lists)."""
        from unlearn_fast.objectives import objective_spec

        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "objective":
                value = objective_spec(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """The config with ``values`` over the defaults; an unknown key is an error naming the fields."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}; the settings are {names}")
        hints = typing.get_type_hints(cls)
        converted = {}
        for name, value in values.items():
            if name == "objective" and isinstance(value, Mapping):
                from unlearn_fast.objectives import make_objective

                spec = dict(value)
                value = make_objective(spec.pop("name"), **spec)
            elif isinstance(value, list) and "tuple" in str(hints.get(name, "")):
                value = tuple(value)
            converted[name] = value
        return cls(**converted)

    @classmethod
    def from_file(cls: type[C], path: str | os.PathLike, **overrides: Any) -> C:
        """The config in a YAML or JSON file (a mapping of field names to values), with ``overrides``."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml (or pass a .json file)") from error
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{path}: a config file holds a mapping of setting names to values, got {type(values).__name__}"
            )
        return cls.from_dict({**values, **overrides})
