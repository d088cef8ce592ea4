"""The one interface every token mixer implements (attention, memory layers, baselines)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class TokenMixer(Protocol):
    """``forward(x, state=None) -> (y, state)`` on ``x [B, T, dim]``; ``init_state(batch)``.

    The state is whatever the mixer carries between calls (memory weights, conv tails, KV caches);
    feeding a sequence in pieces with the state carried must equal one call on the whole sequence.
    """

    def forward(self, x: Tensor, state: Any | None = None) -> tuple[Tensor, Any]: ...

    def init_state(self, batch: int) -> Any: ...
