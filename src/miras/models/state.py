"""The recurrent state of a whole model: one mixer state per block, savable and loadable.

``ModelState.save(path)`` writes atomically (temp file + rename) a file of plain containers of
tensors, loaded back with ``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..files import atomic_write
from ..layers import KVCache, MemoryLayerState
from ..memory import MemoryState
from .hybrids import PairState
from .mac import MACState

# Every state type that can appear inside a ModelState, by name (for loading).
STATE_TYPES = {cls.__name__: cls for cls in (KVCache, MACState, MemoryLayerState, MemoryState, PairState)}


@dataclass(frozen=True)
class ModelState:
    """Per-block mixer states, in block order, and the number of tokens the model has seen."""

    layers: tuple[Any, ...]
    seen: int = 0

    def detach(self) -> ModelState:
        """Cut from the autograd graph (truncated backpropagation through time)."""
        return ModelState(tuple(s.detach() for s in self.layers), self.seen)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def save(self, path: str | os.PathLike) -> None:
        data = {"format": "miras.ModelState/1", "seen": self.seen, "layers": [_to_plain(s) for s in self.layers]}
        atomic_write(path, lambda handle: torch.save(data, handle))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelState:
        try:
            data = torch.load(path, weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is not a readable miras state file: {error}") from None
        if not isinstance(data, dict) or data.get("format") != "miras.ModelState/1":
            raise ValueError(f"{path} is not a miras state file (format 'miras.ModelState/1')")
        try:
            if not isinstance(data["layers"], list) or not isinstance(data["seen"], int):
                raise TypeError("'layers' must be a list and 'seen' an integer")
            return cls(tuple(_from_plain(s) for s in data["layers"]), data["seen"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} is a damaged miras state file ({type(error).__name__}: {error})") from None


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__,
                "fields": {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"type": "tuple", "items": [_to_plain(v) for v in value]}
    if value is None or isinstance(value, (Tensor, int, float)):
        return value
    raise TypeError(f"cannot save a state holding {type(value).__name__}")


def _from_plain(value):
    if isinstance(value, dict):
        if value["type"] == "tuple":
            return tuple(_from_plain(v) for v in value["items"])
        if value["type"] not in STATE_TYPES:
            raise ValueError(f"unknown state type {value['type']!r} in state file")
        return STATE_TYPES[value["type"]](**{k: _from_plain(v) for k, v in value["fields"].items()})
    return value
