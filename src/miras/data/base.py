"""What the trainer asks of any data source: deterministic batches by step, sliced by rank.

A source is a pure function of (its seed, step, rank, world): resuming at step s reproduces the
batches an uninterrupted run would have seen, and the ``world`` ranks of a DDP run receive
disjoint row slices whose union is exactly the single-process global batch.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

IGNORE = -100  # target id that the loss skips (torch.nn.functional.cross_entropy's ignore_index)


@runtime_checkable
class Batches(Protocol):
    """A deterministic source of training batches."""

    batch_size: int  # the global batch (rows per step over all ranks)
    seq_len: int     # tokens per row

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """Rows ``[rank * b, (rank + 1) * b)`` of step ``step``'s global batch, b = batch_size // world:
        ``inputs [b, seq_len]`` int64 and ``targets [b, seq_len]`` int64 (``IGNORE`` where no loss)."""
        ...
