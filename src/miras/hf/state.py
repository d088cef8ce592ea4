"""Selecting sequences out of a batch of recurrent states (beam search, ``num_return_sequences``).

Every state type keeps its batch on dim 0 of its tensors, except the fields listed in
``SHARED_FIELDS``, which hold the same value for every sequence (token counts, the KV cache's
absolute positions). ``select_state(state, index)`` gathers the batch rows ``index`` of every
batched tensor, however deeply nested; a state type missing from the tables is an error, never
passed through unselected (a test checks that the tables cover every field of every type).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..layers import KVCache, MemoryLayerState
from ..memory import MemoryState
from ..models import ModelState
from ..models.hybrids import PairState
from ..models.mac import MACState

# type -> (fields with a batch dim or holding nested states, fields shared by the whole batch)
BATCHED_FIELDS: dict[type, tuple[str, ...]] = {
    ModelState: ("layers",),
    MemoryLayerState: ("memory", "conv"),
    MemoryState: ("weights", "momentum", "chunk_start", "retained"),
    KVCache: ("keys", "values"),
    MACState: ("memory", "before", "keys", "values"),
    PairState: ("memory", "attention"),
}
SHARED_FIELDS: dict[type, tuple[str, ...]] = {
    ModelState: ("seen", "model"),
    MemoryLayerState: (),
    MemoryState: ("position", "chunk_size"),
    KVCache: ("positions", "seen"),
    MACState: ("filled",),
    PairState: (),
}


def select_state(state, index: Tensor):
    """The state of the sequences ``index`` ([N] long) of the batch: ``state[index]`` for every tensor."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.index_select(0, index.to(state.device))
    if isinstance(state, tuple):
        return tuple(select_state(part, index) for part in state)
    if type(state) not in BATCHED_FIELDS:
        raise TypeError(f"cannot select batch rows of a {type(state).__name__}: not a known state type "
                        f"({sorted(cls.__name__ for cls in BATCHED_FIELDS)})")
    return dataclasses.replace(state, **{name: select_state(getattr(state, name), index)
                                         for name in BATCHED_FIELDS[type(state)]})


def state_batch(state: ModelState) -> int:
    """The number of sequences a model state holds."""
    return state.layers[0].batch
