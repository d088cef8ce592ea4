"""References the layer and model tests share, written out by hand."""

import math


def rotate_by_hand(x, positions, base=10000.0):
    """RoPE written out pair by pair: channel i and i + D/2 turn by the angle p · base^(−i/(D/2))."""
    half = x.shape[-1] // 2
    out = x.clone()
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            angle = p * base ** (-i / half)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out
