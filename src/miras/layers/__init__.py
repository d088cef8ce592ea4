"""Tier 2 of miras: nn.Modules that own parameters."""

from .base import TokenMixer
from .memory_layer import MemoryLayer, MemoryLayerState

__all__ = ["TokenMixer", "MemoryLayer", "MemoryLayerState"]
