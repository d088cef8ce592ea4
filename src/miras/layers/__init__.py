"""Tier 2 of miras: nn.Modules that own parameters."""

from .attention import Attention, KVCache, rotary
from .base import TokenMixer
from .memory_layer import MemoryLayer, MemoryLayerState

__all__ = ["Attention", "KVCache", "rotary", "TokenMixer", "MemoryLayer", "MemoryLayerState"]
