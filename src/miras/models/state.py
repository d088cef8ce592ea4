"""The recurrent state of a whole model: one mixer state per block, savable and loadable.

``ModelState.save(path)`` writes atomically (temp file + rename) a file of plain containers of
tensors, loaded back with ``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import atomic_write
from ..layers import KVCache, MemoryLayerState
from ..memory import MemoryState
from ..memory.state import iter_tensors, map_tensors
from .hybrids import PairState
from .mac import MACState

# Every state type that can appear inside a ModelState, by name (for loading).
STATE_TYPES = {cls.__name__: cls for cls in (KVCache, MACState, MemoryLayerState, MemoryState, PairState)}


@dataclass(frozen=True)
class ModelState:
    """Per-block mixer states, in block order, and the number of tokens the model has seen."""

    layers: tuple[Any, ...]
    seen: int = 0
    # the layout of the model that made it (LanguageModel.state_layout: the config fields that shape a
    # state, as JSON); a model refuses a state of another layout. "" (e.g. a state built by hand): unchecked.
    model: str = ""

    def detach(self) -> ModelState:
        """Cut from the autograd graph (truncated backpropagation through time). A state made under
        ``torch.inference_mode()`` comes out as ordinary tensors (copies, made outside that mode), which a
        training call can use: autograd refuses to save inference tensors for backward."""

        def ordinary(t: Tensor) -> Tensor:
            return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t

        return ModelState(tuple(map_tensors(s.detach(), ordinary) for s in self.layers), self.seen, self.model)

    def tensors(self) -> list[Tensor]:
        """Every tensor the state holds, in layer order."""
        return list(iter_tensors(self.layers))

    def to(self, *args, **kwargs) -> ModelState:
        """Every tensor moved as ``Tensor.to(*args, **kwargs)`` would (a device, a dtype): e.g. a float32
        state for a model turned float64, or a state saved on a GPU for a CPU model. A dtype applies to the
        floating-point tensors only: integer ones (a KV cache's positions) keep theirs and only move."""

        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            # the device that .to(...) picks for a float tensor on t's device (unchanged if none given)
            return t.to(t.new_empty(0, dtype=torch.float32).to(*args, **kwargs).device)

        return ModelState(tuple(map_tensors(s, move) for s in self.layers), self.seen, self.model)

    @staticmethod
    def layout(model: str) -> dict:
        """``model`` (a state's layout string, not "") as the dict it encodes; a ValueError if it is not one."""
        try:
            layout = json.loads(model)
        except (TypeError, ValueError):
            layout = None
        if not isinstance(layout, dict):
            raise ValueError(f"state.model must be \"\" or the layout of the model that made the state (a JSON "
                             f"object), got {model!r:.80}: a damaged or hand-built state")
        return layout

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def __repr__(self) -> str:
        """A summary, not every tensor (the dataclass's own repr printed ~30 KB for a tiny model's state)."""
        try:
            family = ModelState.layout(self.model).get("family", "?") if self.model else "no layout"
        except ValueError:
            family = "?"
        kinds = " / ".join(sorted({type(layer).__name__ for layer in self.layers})) or "none"
        batch = self.layers[0].batch if self.layers else 0
        return (f"ModelState({family}, seen={self.seen}, batch={batch}, {len(self.layers)} layers: {kinds}, "
                f"{self.nbytes():,} bytes)")

    def save(self, path: str | os.PathLike) -> None:
        target = Path(path)
        if str(path) == "" or target.is_dir():
            raise ValueError(f"state.save needs a file path, got {str(path)!r}" + (" (a folder)" if str(path) else ""))
        if not target.parent.is_dir():
            raise ValueError(f"state.save: the folder {target.parent} does not exist")
        data = {"format": "miras.ModelState/1", "seen": self.seen, "model": self.model,
                "layers": [_to_plain(s) for s in self.layers]}
        atomic_write(path, lambda handle: torch.save(data, handle))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None) -> ModelState:
        """A state written by ``save``; ``map_location`` as for ``torch.load`` (e.g. "cpu" for a state saved
        on a GPU)."""
        try:
            data = torch.load(path, weights_only=True, map_location=map_location)
        except Exception as error:
            from ..runs import load_failure  # (runs imports the models)

            raise ValueError(f"{path} is not a readable miras state file: {load_failure(error, path)}") from None
        if not isinstance(data, dict) or data.get("format") != "miras.ModelState/1":
            raise ValueError(f"{path} is not a miras state file (format 'miras.ModelState/1')")
        try:
            model = data.get("model", "")  # absent in files written before the layout was recorded
            if (not isinstance(data["layers"], list) or not isinstance(data["seen"], int)
                    or isinstance(data["seen"], bool) or data["seen"] < 0
                    or not isinstance(model, str)):
                raise TypeError("'layers' must be a list, 'seen' an integer >= 0 and 'model' a string")
            if model:
                cls.layout(model)
            return cls(tuple(_from_plain(s) for s in data["layers"]), data["seen"], model)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"{path} is a damaged miras state file ({type(error).__name__}: {error})") from None


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__,
                "fields": {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"type": "tuple", "items": [_to_plain(v) for v in value]}
    if isinstance(value, Tensor):  # the values only: a file holds no autograd graph
        return value.detach()
    if value is None or isinstance(value, (int, float)):
        return value
    raise TypeError(f"cannot save a state holding {type(value).__name__}")


def _from_plain(value):
    if isinstance(value, dict):
        if value["type"] == "tuple":
            return tuple(_from_plain(v) for v in value["items"])
        if value["type"] not in STATE_TYPES:
            raise ValueError(f"unknown state type {value['type']!r}; known: {', '.join(sorted(STATE_TYPES))}")
        return STATE_TYPES[value["type"]](**{k: _from_plain(v) for k, v in value["fields"].items()})
    # (files written before states were saved detached hold tensors that say requires_grad)
    return value.detach() if isinstance(value, Tensor) else value
