"""The one interface every token mixer implements (attention, memory layers, baselines)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class TokenMixer(Protocol):
    """``forward(x, state=None) -> (y, state)`` on ``x [B, T, dim]``; ``init_state(batch)``.

    The state is whatever the mixer carries between calls (memory weights, conv tails, KV caches);
    feeding a sequence in pieces with the state carried must equal one call on the whole sequence.
    """

    def forward(self, x: Tensor, state: Any | None = None) -> tuple[Tensor, Any]: ...

    def init_state(self, batch: int) -> Any: ...


def check_input(x: Tensor, dim: int, dtype: torch.dtype, state_batch: int | None) -> None:
    """A mixer's input: ``x [B >= 1, T, dim]``, floating point, in the layer's parameter ``dtype`` (or
    under autocast); ``state_batch``: the batch of the state it continues (None: no state given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor [B, T, dim={dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be [B, T, dim={dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x is {x.dtype} but the layer's parameters are {dtype}: convert one to the other "
                        "(layer.to(dtype)), or run under torch.autocast")
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one sequence (B >= 1)")
    if state_batch is not None and state_batch != x.shape[0]:
        raise ValueError(f"the state holds {state_batch} sequence(s) but x holds {x.shape[0]}: continue a state "
                         "with the batch it was made for (init_state(batch) or the previous call's state)")


def piece_sizes(tokens: int, size: int, filled: int = 0) -> list[int]:
    """Lengths of the pieces a call of ``tokens`` tokens is cut into at every ``size``-token boundary of
    the stream, when the current piece already holds ``filled`` tokens (0 <= filled < size): the rest
    of that piece, then whole pieces, then what is left. [] for no tokens."""
    if tokens <= 0:
        return []
    first = min(tokens, size - filled)
    whole, rest = divmod(tokens - first, size)
    return [first] + [size] * whole + ([rest] if rest else [])


def rms_norm(norm: torch.nn.RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)`` with the weight cast to ``x``'s dtype. Under bf16 autocast a linear layer's output is
    bf16, and a float32 weight takes RMSNorm off its fused kernel (with a warning); in float32 this is
    ``norm(x)`` exactly."""
    weight = None if norm.weight is None else norm.weight.to(x.dtype)
    return torch.nn.functional.rms_norm(x, norm.normalized_shape, weight, norm.eps)
