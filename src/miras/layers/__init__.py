"""Tier 2 of miras: nn.Modules that own parameters."""

from .attention import Attention, KVCache, rotary
from .base import TokenMixer, piece_sizes
from .memory_layer import MemoryLayer, MemoryLayerState

__all__ = ["Attention", "KVCache", "rotary", "TokenMixer", "piece_sizes", "MemoryLayer", "MemoryLayerState"]
