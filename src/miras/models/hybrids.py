"""Titans' hybrid mixers that combine the memory with sliding-window attention (Titans §4.2–4.3).

- MAG (memory as a gate, Eq. 26–28): y = SWA*(x̃), m = LMM(x̃), o = norm_a(y) ⊙ σ(norm_b(m)), where
  x̃ = P ‖ x (the block prepends the persistent tokens P at the stream start) and SWA* keeps P
  visible to every query (``sinks`` = N_p). The papers say only "normalise both with learnable
  vector weights, then a non-linearity" (PAPERS.md §4.6): we read it as RMSNorm with learnable
  gains and a sigmoid gate.
- MAL (memory as a layer, Eq. 29–31): o = SWA(LMM(x̃)), a plain sliding window (no sinks). One mixer
  under one pre-norm residual and one MLP, as DESIGN pins it, not two Samba-style blocks (each its own
  norm, residual and MLP; the papers say only that MAL "follows Samba"). The ``-h`` MIRAS hybrids are
  the Samba-style form: memory and attention blocks alternate.
Both stream exactly: the state is the pair of the two layers' states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import Attention, MemoryLayer
from ..layers.base import rms_norm


@dataclass(frozen=True)
class PairState:
    """The states of a mixer made of two layers."""

    memory: Any
    attention: Any

    @property
    def batch(self) -> int:
        return self.memory.batch

    def detach(self) -> PairState:
        return PairState(self.memory.detach(), self.attention.detach())

    def nbytes(self) -> int:
        return self.memory.nbytes() + self.attention.nbytes()


class _MemoryAndAttention(nn.Module):
    """A mixer of a memory layer and an attention layer, whose state is the pair of theirs."""

    def __init__(self, memory: MemoryLayer, attention: Attention):
        super().__init__()
        self.memory, self.attention = memory, attention

    def init_state(self, batch: int) -> PairState:
        return PairState(self.memory.init_state(batch), self.attention.init_state(batch))

    def _state(self, x: Tensor, state: PairState | None) -> PairState:
        """The state to continue (checked), or a fresh one. The layers check x and their own halves."""
        if state is None:
            return self.init_state(x.shape[0])
        if not isinstance(state, PairState):
            raise TypeError("state must be a PairState (from init_state or a previous call), "
                            f"got {type(state).__name__}")
        return state


class MemoryAsGate(_MemoryAndAttention):
    """MAG: the SWA* branch gated by the memory branch."""

    def __init__(self, memory: MemoryLayer, attention: Attention):
        super().__init__(memory, attention)
        self.attention_norm = nn.RMSNorm(attention.dim, eps=1e-6)
        self.memory_norm = nn.RMSNorm(attention.dim, eps=1e-6)

    def forward(self, x: Tensor, state: PairState | None = None) -> tuple[Tensor, PairState]:
        state = self._state(x, state)
        y, attention_state = self.attention(x, state.attention)
        m, memory_state = self.memory(x, state.memory)
        return (rms_norm(self.attention_norm, y) * torch.sigmoid(rms_norm(self.memory_norm, m)),
                PairState(memory_state, attention_state))


class MemoryAsLayer(_MemoryAndAttention):
    """MAL: the memory layer, then sliding-window attention over its output."""

    def forward(self, x: Tensor, state: PairState | None = None) -> tuple[Tensor, PairState]:
        state = self._state(x, state)
        m, memory_state = self.memory(x, state.memory)
        y, attention_state = self.attention(m, state.attention)
        return y, PairState(memory_state, attention_state)
