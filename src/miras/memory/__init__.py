"""Tier 1 of miras: the memory engine, pure functions on tensors (no parameters).

>>> from miras.memory import TITANS, Gates, chunked, recurrent, read
"""

from .architectures import LinearMemory, MLPMemory
from .chunked import chunked
from .delta import delta, supports_delta
from .objectives import (
    GD,
    L2,
    Decay,
    DotProduct,
    ElasticNet,
    Huber,
    ImplicitGD,
    KLSoftmax,
    Lp,
    LqNormalize,
    Momentum,
    NoRetention,
    PreDecay,
)
from .recurrent import initial_state, read, recurrent
from .rules import (
    DELTANET,
    GATED_DELTANET,
    LINEAR_ATTENTION,
    LONGHORN,
    MAMBA2,
    MEMORA,
    MONETA,
    PRESETS,
    RETNET,
    TITANS,
    TITANS_LINEAR,
    TTT_LINEAR,
    TTT_MLP,
    YAAD,
    MemoryRule,
    get_rule,
)
from .state import Gates, MemoryState

__all__ = [
    "LinearMemory", "MLPMemory", "L2", "DotProduct", "Lp", "Huber", "NoRetention", "Decay", "PreDecay",
    "LqNormalize", "KLSoftmax", "ElasticNet", "GD", "Momentum", "ImplicitGD",
    "MemoryRule", "Gates", "MemoryState", "recurrent", "chunked", "delta", "supports_delta", "read",
    "initial_state",
    "get_rule", "PRESETS", "TITANS", "TITANS_LINEAR", "DELTANET", "LINEAR_ATTENTION", "MAMBA2",
    "TTT_LINEAR", "TTT_MLP", "GATED_DELTANET", "LONGHORN", "RETNET", "MONETA", "YAAD", "MEMORA",
]
