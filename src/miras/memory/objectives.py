"""The other three MIRAS axes: attentional bias, retention, learning algorithm.

Each is a frozen dataclass with no parameters. The engine uses them only through:

- bias: ``loss(pred, target)`` (the reference differentiates it with autograd) and
  ``output_grad(pred, target)`` = ∂ℓ/∂pred elementwise (the chunked path's closed form);
- retention: ``log_retain(gates)`` = log(1 − α_t) per token, ``[B, T, H]``, or None when nothing
  is forgotten, and ``chunk_end(weights)``, the projection applied at chunk ends (identity for
  linear retention; non-linear retentions of MIRAS §5.2 override it);
- algorithm: ``uses_momentum``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class L2:
    """ℓ(ŷ, v) = ½‖ŷ − v‖², summed over features (the delta rule / Titans Eq. 12 with ½)."""

    kind: ClassVar[str] = "l2"
    gates: ClassVar[frozenset[str]] = frozenset()

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (pred - target).pow(2).sum(-1)

    def output_grad(self, pred: Tensor, target: Tensor) -> Tensor:
        return pred - target


@dataclass(frozen=True, kw_only=True)
class DotProduct:
    """ℓ(ŷ, v) = −⟨ŷ, v⟩: the Hebbian bias (linear attention, RetNet, Mamba2; MIRAS §4)."""

    kind: ClassVar[str] = "dot"
    gates: ClassVar[frozenset[str]] = frozenset()

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return -(pred * target).sum(-1)

    def output_grad(self, pred: Tensor, target: Tensor) -> Tensor:
        return -target.expand_as(pred)


# Gates in [0, 1] are clamped one eps away from the end that logs to −inf before taking logs: a
# saturated sigmoid (exactly 0 or 1 in float32 beyond |logit| ≈ 17) would otherwise give log 0 and
# an infinite gradient, which turns into NaN further back (inf · 0).
def _log_gate(eta: Tensor) -> Tensor:
    """log η, with η >= eps."""
    return torch.log(eta.clamp_min(torch.finfo(eta.dtype).eps))


def _log_complement(alpha: Tensor) -> Tensor:
    """log(1 − α), with α <= 1 − eps (log1p keeps small α exact)."""
    return torch.log1p(-alpha.clamp_max(1.0 - torch.finfo(alpha.dtype).eps))


@dataclass(frozen=True, kw_only=True)
class NoRetention:
    """Nothing is forgotten: W_t = W_{t−1} + S_t."""

    kind: ClassVar[str] = "none"
    gates: ClassVar[frozenset[str]] = frozenset()

    def log_retain(self, gates) -> Tensor | None:
        return None

    def chunk_end(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return weights


@dataclass(frozen=True, kw_only=True)
class Decay:
    """Titans forgetting (weight decay, Eq. 13): W_t = (1 − α_t) W_{t−1} + S_t."""

    kind: ClassVar[str] = "decay"
    gates: ClassVar[frozenset[str]] = frozenset({"decay"})

    def log_retain(self, gates) -> Tensor:
        return _log_complement(gates.decay)

    def chunk_end(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return weights


@dataclass(frozen=True, kw_only=True)
class GD:
    """Plain gradient descent: S_t = −θ_t g_t (η ≡ 0)."""

    kind: ClassVar[str] = "gd"
    gates: ClassVar[frozenset[str]] = frozenset()
    uses_momentum: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class Momentum:
    """Titans surprise (Eq. 10): S_t = η_t S_{t−1} − θ_t g_t."""

    kind: ClassVar[str] = "momentum"
    gates: ClassVar[frozenset[str]] = frozenset({"momentum"})
    uses_momentum: ClassVar[bool] = True

    @staticmethod
    def log_momentum(gates) -> Tensor:
        return _log_gate(gates.momentum)
