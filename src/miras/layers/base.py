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


def piece_sizes(tokens: int, size: int, filled: int = 0) -> list[int]:
    """Lengths of the pieces a call of ``tokens`` tokens is cut into at every ``size``-token boundary of
    the stream, when the current piece already holds ``filled`` tokens (0 <= filled < size): the rest
    of that piece, then whole pieces, then what is left. [] for no tokens."""
    if tokens <= 0:
        return []
    first = min(tokens, size - filled)
    whole, rest = divmod(tokens - first, size)
    return [first] + [size] * whole + ([rest] if rest else [])
