"""A MIRAS rule is four choices (MIRAS §3): architecture, attentional bias, retention, algorithm.

Presets are values, not flags. Every model of MIRAS Table 1 that these axes express is one line
here; ``memory/README.md`` maps them to the papers.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .architectures import LinearMemory, MLPMemory
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

Architecture = LinearMemory | MLPMemory
Bias = L2 | DotProduct | Lp | Huber
Retention = NoRetention | Decay | PreDecay | LqNormalize | KLSoftmax | ElasticNet
Algorithm = GD | Momentum | ImplicitGD

# kind -> class, per axis: the single place a new axis value is registered for serialisation.
AXES: dict[str, dict[str, type]] = {
    "architecture": {c.kind: c for c in (LinearMemory, MLPMemory)},
    "bias": {c.kind: c for c in (L2, DotProduct, Lp, Huber)},
    "retention": {c.kind: c for c in (NoRetention, Decay, PreDecay, LqNormalize, KLSoftmax, ElasticNet)},
    "algorithm": {c.kind: c for c in (GD, Momentum, ImplicitGD)},
}


@dataclass(frozen=True)
class MemoryRule:
    """How the memory learns at test time: ``MemoryRule(architecture, bias, retention, algorithm)``."""

    architecture: Architecture
    bias: Bias
    retention: Retention
    algorithm: Algorithm

    def __post_init__(self):
        for axis, classes in AXES.items():
            value = getattr(self, axis)
            if type(value) not in classes.values():
                raise TypeError(f"{axis} must be one of {[c.__name__ for c in classes.values()]}, "
                                f"got {type(value).__name__}")
        # Two closed forms hold only for a matrix memory (see their docstrings).
        if self.retention.decay_first and not isinstance(self.architecture, LinearMemory):
            raise ValueError(f"{type(self.retention).__name__} needs LinearMemory (its gradient at retained weights "
                             f"is closed-form only for a matrix memory), got {type(self.architecture).__name__}")
        if isinstance(self.algorithm, ImplicitGD) and not (
                isinstance(self.architecture, LinearMemory) and isinstance(self.bias, L2)):
            raise ValueError("ImplicitGD (Longhorn) is closed-form for LinearMemory with the L2 bias only, "
                             f"got {type(self.architecture).__name__} with {type(self.bias).__name__}")

    def reading(self, device_type: str) -> contextlib.AbstractContextManager:
        """The context of this rule's memory reads: autocast as the caller set it, or off for a retention
        whose reads need full precision (``precise_reads``). The write path never runs under autocast."""
        return torch.autocast(device_type, enabled=False) if self.retention.precise_reads else contextlib.nullcontext()

    def needed_gates(self) -> set[str]:
        """Names of the Gates fields (besides lr) this rule reads."""
        return set(self.bias.gates | self.retention.gates | self.algorithm.gates)

    def name(self) -> str:
        return "MemoryRule(" + ", ".join(_describe(getattr(self, a)) for a in AXES) + ")"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {axis: {"kind": getattr(self, axis).kind, **asdict(getattr(self, axis))} for axis in AXES}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> MemoryRule:
        if set(data) != set(AXES):
            raise ValueError(f"a rule needs exactly the axes {list(AXES)}, got {list(data)}")
        values = {}
        for axis, spec in data.items():
            spec = dict(spec)
            kind = spec.pop("kind", None)
            if kind not in AXES[axis]:
                raise ValueError(f"unknown {axis} kind {kind!r}; valid: {sorted(AXES[axis])}")
            klass = AXES[axis][kind]
            allowed = {f.name for f in fields(klass)}
            unknown = set(spec) - allowed
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)} for {klass.__name__}; valid: {sorted(allowed)}")
            values[axis] = klass(**spec)
        return cls(**values)


def _describe(value) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in asdict(value).items())
    return f"{type(value).__name__}({args})"


# Titans (LMM): 2-layer MLP memory, L2 bias, weight-decay forgetting, momentum (surprise).
TITANS = MemoryRule(MLPMemory(depth=2, expansion=4), L2(), Decay(), Momentum())
# Titans with a matrix memory (L_M = 1, Titans §5.5 ablation).
TITANS_LINEAR = MemoryRule(LinearMemory(), L2(), Decay(), Momentum())
# The delta rule (DeltaNet): exact at chunk_size=1; larger chunks give its mini-batch form.
DELTANET = MemoryRule(LinearMemory(), L2(), NoRetention(), GD())
# Linear attention: Hebbian write M_t = M_{t−1} + θ_t v_t k_tᵀ.
LINEAR_ATTENTION = MemoryRule(LinearMemory(), DotProduct(), NoRetention(), GD())
# Mamba2-style / gated linear attention: M_t = (1 − α_t) M_{t−1} + θ_t v_t k_tᵀ.
MAMBA2 = MemoryRule(LinearMemory(), DotProduct(), Decay(), GD())
# TTT-Linear and TTT-MLP (Sun et al. 2024): mini-batch GD, no forgetting, no momentum. TTT-Linear is MIRAS
# Table 1's reading, a plain matrix memory: the same value as DELTANET (the models differ: ttt-linear runs the
# chunked mini-batch path at chunk 16, deltanet the exact online one). Sun et al.'s f(x) = x + LN(W x)
# (LayerNorm and residual around the matrix) is not on the axes: MLPMemory has depth >= 2.
TTT_LINEAR = MemoryRule(LinearMemory(), L2(), NoRetention(), GD())
TTT_MLP = MemoryRule(MLPMemory(depth=2, expansion=4), L2(), NoRetention(), GD())
# Gated DeltaNet: S_t = a_t S_{t−1} (I − θ_t k kᵀ) + θ_t v kᵀ for the [dv, dk] state read as S k (decay before
# the delta step; MIRAS Table 1 prints the product on the other side, defined only for dv = dk).
GATED_DELTANET = MemoryRule(LinearMemory(), L2(), PreDecay(), GD())
# Longhorn: the delta rule solved implicitly, θ'_t = θ_t / (1 + θ_t ‖k_t‖²).
LONGHORN = MemoryRule(LinearMemory(), L2(), NoRetention(), ImplicitGD())
# RetNet: M_t = γ M_{t−1} + v kᵀ; the Mamba2 rule with a fixed per-head decay (the layer's gating).
RETNET = MemoryRule(LinearMemory(), DotProduct(), Decay(), GD())
# MIRAS §5.3: 2-layer MLP memory (expansion 4), plain GD, retention decoupled from the lr. MONETA's
# LqNormalize (power 1) rescales every matrix to unit q-norm at each chunk end, and that forgets the scale
# the decay gate set: at chunk ends (θ_t, α_t) gives the same state as (θ_t / β_t, 0), β_t = Π(1 − α) since
# the chunk start, so its α acts as a rescaling of θ (and moves the reads inside a chunk). With power != 1
# (Eq. 24 prints q − 2) the scale is read and α is a retention of its own (objectives.py).
MONETA = MemoryRule(MLPMemory(depth=2, expansion=4), Lp(p=3.0), LqNormalize(q=4.0), GD())
YAAD = MemoryRule(MLPMemory(depth=2, expansion=4), Huber(per="token"), Decay(), GD())
MEMORA = MemoryRule(MLPMemory(depth=2, expansion=4), L2(), KLSoftmax(), GD())

PRESETS: dict[str, MemoryRule] = {
    "titans": TITANS,
    "titans-linear": TITANS_LINEAR,
    "deltanet": DELTANET,
    "gated-deltanet": GATED_DELTANET,
    "longhorn": LONGHORN,
    "linear-attention": LINEAR_ATTENTION,
    "mamba2": MAMBA2,
    "retnet": RETNET,
    "ttt-linear": TTT_LINEAR,
    "ttt-mlp": TTT_MLP,
    "moneta": MONETA,
    "yaad": YAAD,
    "memora": MEMORA,
}


def get_rule(name: str) -> MemoryRule:
    """The preset rule called ``name``; an unknown name is an error listing the valid ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown memory rule {name!r}; valid: {sorted(PRESETS)}") from None
