"""The other three MIRAS axes: attentional bias, retention, learning algorithm.

Each is a frozen dataclass with no parameters. The engine uses them only through:

- bias: ``loss(pred, target, **gates)`` (the reference differentiates it with autograd) and
  ``output_grad(pred, target, **gates)`` = ∂ℓ/∂pred elementwise (the chunked path's closed form).
  ``gates`` are the per-token values of the gates the bias names in ``gates`` (Huber's threshold
  δ_t), each shaped to broadcast against ``pred`` (``[..., N, 1]``);
- retention: ``log_retain(gates)`` = log(1 − α_t) per token, ``[B, T, H]`` (``[B, T, H, F]`` for
  channel-wise gates), or None when nothing
  is forgotten. A non-linear retention (MIRAS §5.2) has ``projects = True`` and
  ``chunk_end(weights, start, keep)``: at the end of every complete chunk the state is projected
  (``start``: the chunk-start weights, ``keep``: Π(1 − α) over the chunk, ``[B, H]``), and the
  chunk's last token reads the projected state. ``decay_first`` (Gated DeltaNet's order) takes
  each token's gradient at the retained weights instead of the chunk-start ones;
- algorithm: ``uses_momentum`` and ``effective_lr(lr, k)`` (implicit GD rescales θ_t).

``memory/README.md`` states each one's exact semantics and where it comes from in the papers.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True, kw_only=True)
class Lp:
    """ℓ(ŷ, v) = Σ_j |ŷ_j − v_j|_ε^p with the smooth |x|_ε = sqrt(x² + ε) (Moneta, MIRAS §5.1, p = 3).

    Its gradient p · sgn_ε(e) ⊙ |e|_ε^{p−1} uses the smooth sign sgn_ε(e) = e / |e|_ε, the exact
    derivative of the smooth |·|^p (the paper's tanh(a·e) surrogate has no closed-form loss, and
    the reference differentiates the loss; both surrogates tend to sign(e) as ε, 1/a → 0).
    """

    p: float = 3.0
    eps: float = 1e-6
    kind: ClassVar[str] = "lp"
    gates: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self):
        check_real("Lp", "p", self.p)
        check_real("Lp", "eps", self.eps)
        if not self.p >= 1:
            raise ValueError(f"Lp needs p >= 1, got {self.p}")
        if not self.eps > 0:
            raise ValueError(f"Lp needs eps > 0 (the smooth |x| = sqrt(x^2 + eps)), got {self.eps}")

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return ((pred - target).pow(2) + self.eps).pow(self.p / 2).sum(-1)

    def output_grad(self, pred: Tensor, target: Tensor) -> Tensor:
        error = pred - target
        return self.p * error * (error.pow(2) + self.eps).pow(self.p / 2 - 1)


HUBER_MODES = ("token", "coordinate")


@dataclass(frozen=True, kw_only=True)
class Huber:
    """Yaad's Huber bias (MIRAS §5.1, Eq. 14/16) with the data-dependent threshold δ_t (``threshold`` gate).

    ``per="token"`` (Eq. 16, the Yaad rule): the ℓ2 step e = ŷ − v if the token's RMS error
    ‖e‖₂/√d ≤ δ_t, else δ_t · sign(e) (δ_t times the ℓ1 step). ``per="coordinate"`` (Eq. 14, the
    classic Huber loss per feature): e_j where |e_j| ≤ δ_t, else δ_t · sign(e_j), i.e. the error
    clipped to [−δ_t, δ_t]. δ_t is in RMS units in both, so one gate init suits both; the per-token
    rule switches a whole token to sign steps, the per-coordinate one clips each outlier feature.
    """

    per: str = "token"
    kind: ClassVar[str] = "huber"
    gates: ClassVar[frozenset[str]] = frozenset({"threshold"})

    def __post_init__(self):
        if self.per not in HUBER_MODES:
            raise ValueError(f"Huber per must be one of {HUBER_MODES}, got {self.per!r}")

    def _small(self, error: Tensor, threshold: Tensor) -> Tensor:
        if self.per == "token":
            return error.pow(2).mean(-1, keepdim=True).sqrt() <= threshold
        return error.abs() <= threshold

    def loss(self, pred: Tensor, target: Tensor, threshold: Tensor) -> Tensor:
        error = pred - target
        small = self._small(error.detach(), threshold.detach())
        if self.per == "token":
            return torch.where(small.squeeze(-1), 0.5 * error.pow(2).sum(-1), (threshold * error.abs()).sum(-1))
        return torch.where(small, 0.5 * error.pow(2), threshold * (error.abs() - 0.5 * threshold)).sum(-1)

    def output_grad(self, pred: Tensor, target: Tensor, threshold: Tensor) -> Tensor:
        error = pred - target
        return torch.where(self._small(error.detach(), threshold.detach()), error, threshold * torch.sign(error))


def check_real(owner: str, name: str, value) -> None:
    """A rule's numeric field: a finite real number (not a bool, not a string), or a TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner} {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner} {name} must be finite, got {value}")


# Gates in [0, 1] are clamped one eps away from the end that logs to −inf before taking logs: a
# saturated sigmoid (exactly 0 or 1 in float32 beyond |logit| ≈ 17) would otherwise give log 0 and
# an infinite gradient, which turns into NaN further back (inf · 0).
def _log_gate(eta: Tensor) -> Tensor:
    """log η, with η >= eps."""
    return torch.log(eta.clamp_min(torch.finfo(eta.dtype).eps))


def _log_complement(alpha: Tensor) -> Tensor:
    """log(1 − α), with α <= 1 − eps (log1p keeps small α exact)."""
    return torch.log1p(-alpha.clamp_max(1.0 - torch.finfo(alpha.dtype).eps))


class _Retention:
    """What every retention shares: the memory that a chunk's gradients and reads use is the state itself.
    ``LqNormalize(carry="A")`` alone keeps a state (Eq. 24's unnormalised A) that is not that memory, and
    overrides these three; a retention of one's own subclasses ``NoRetention`` or ``Decay`` to get them."""

    def gradient_point(self, start: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The weights a chunk's gradients are taken at, from the chunk-start state ``start``."""
        return start

    def read_scales(self, start: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        """One factor per weight matrix (``[B, H, 1, 1]``) that the reads inside a chunk scale the state by,
        from the chunk-start state; None: read the state as it is."""
        return None

    def read_point(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The weights a chunk's last token reads, from the state after ``chunk_end``."""
        return weights

    @property
    def nonzero_start(self) -> bool:
        """Whether a zero state is singular for this retention, so that a matrix memory starts random (N(0,
        1/fan_in), as the MLP's layers do) instead of at zero."""
        return False


@dataclass(frozen=True, kw_only=True)
class NoRetention(_Retention):
    """Nothing is forgotten: W_t = W_{t−1} + S_t."""

    kind: ClassVar[str] = "none"
    gates: ClassVar[frozenset[str]] = frozenset()
    projects: ClassVar[bool] = False
    decay_first: ClassVar[bool] = False
    tracks_keep: ClassVar[bool] = False  # the chunk step needs Π(1 − α) since the chunk start
    precise_reads: ClassVar[bool] = False  # reads stay in the inputs' precision under autocast

    def log_retain(self, gates) -> Tensor | None:
        return None


@dataclass(frozen=True, kw_only=True)
class Decay(_Retention):
    """Titans forgetting (weight decay, Eq. 13): W_t = (1 − α_t) W_{t−1} + S_t."""

    kind: ClassVar[str] = "decay"
    gates: ClassVar[frozenset[str]] = frozenset({"decay"})
    projects: ClassVar[bool] = False
    decay_first: ClassVar[bool] = False
    tracks_keep: ClassVar[bool] = False  # the chunk step needs Π(1 − α) since the chunk start
    precise_reads: ClassVar[bool] = False  # reads stay in the inputs' precision under autocast

    def log_retain(self, gates) -> Tensor:
        return _log_complement(gates.decay)


@dataclass(frozen=True, kw_only=True)
class PreDecay(Decay):
    """Gated DeltaNet's order (MIRAS Eq. 9): decay first, then the gradient step at the decayed weights.

    Online: W_t = a_t W_{t−1} − θ_t ∇ℓ(a_t W_{t−1}), a_t = 1 − α_t; for the L2 bias that is
    S_t = a_t S_{t−1} (I − θ_t k kᵀ) + θ_t v kᵀ for the [dv, dk] state (Yang et al. 2025; MIRAS Table 1
    prints the product on the other side). Within a chunk the gradient is
    taken at β_t W⁰ (the chunk-start weights retained up to t). Linear memory only: the gradient
    at scaled weights is then the gradient at W⁰ with the prediction scaled by β_t.
    """

    kind: ClassVar[str] = "predecay"
    decay_first: ClassVar[bool] = True
    tracks_keep: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class LqNormalize(Decay):
    """Moneta's ℓ_q retention, with the state kept normalised: the linear step
    A_t = (1 − α_t) W_{t−1} − θ_t g_t from the normalised weights, then W_t = A_t / ‖A_t‖_q^power.

    The normalisation is non-linear, so (as MIRAS §5.4 trains it) it is applied at chunk ends only:
    within a chunk the memory evolves linearly from the normalised chunk-start weights; at the
    chunk end each weight matrix (per sequence and head) is divided by ‖A‖_q^power, ‖·‖_q being
    the entrywise q-norm of that matrix. The state is W: there is no other.

    **Not MIRAS Eq. 24 as printed.** Eq. 24 carries the unnormalised A as the state,
    A_t = α_t A_{t−1} − η_t ∇ℓ(W_{t−1}), W_t = A_t / ‖A_t‖_q^{q−2}; here A_{t−1} is replaced by W_{t−1}.
    With power = 1 the two differ only in step size: Eq. 24 is this rule with each matrix's step
    θ_t g_t scaled by 1/‖A_{t−1}‖_q, a running norm this rule does not carry (the outputs part from
    the first token on; a review measured by hand 0.78 apart within 40 tokens for a linear memory, 3.0 for the
    MONETA preset). ``carry="A"`` (below) is Eq. 24; the default stays W, which MONETA and the models use.

    ``power=1`` (default) leaves every matrix with unit q-norm at each chunk end. Eq. 24 prints
    power = q − 2; with q = 4 that maps a matrix of q-norm s to one of q-norm 1/s, so the scale
    flips between s and 1/s at every chunk end, and with the writes in between it wanders over
    orders of magnitude (measured at chunk_size=1: q-norms from 0.01 to 24 within 37 tokens, and
    rounding differences grew from 1e-15 to 1e-7). ``power=q - 2`` gives the printed exponent (with
    the normalised state above). (MIRAS §5.2's derivation, valid for 1 < q <= 2, has the conjugate exponent
    q/(q − 1) in place of q − 2; ``power`` takes either.) A unit norm forgets the scale the decay gate set:
    at chunk ends (θ_t, α_t) gives the same state as (θ_t / β_t, 0), β_t = Π(1 − α) since the chunk start,
    so with ``power=1`` α acts as a rescaling of the learning rates (the old state's share shrinks as the
    writes' grows, all that forgetting can do to a memory whose scale is normalised away); with
    ``power != 1`` the scale is read, and α is a retention of its own.

    ``carry="A"`` is Eq. 24 itself: the state is the unnormalised A, A_t = (1 − α_t) A_{t−1} − θ_t g_t
    with g_t taken at W⁰ = A⁰ / ‖A⁰‖_q^power (A⁰ the chunk-start state), and the chunk's last token reads
    W_t = A_t / ‖A_t‖_q^power. The norm, as every non-linearity here, is taken at chunk ends only: the
    reads inside a chunk use A_t / ‖A⁰‖_q^power, the chunk-start norm (so the memory read is W⁰ at the
    chunk's start and moves linearly from there). At ``chunk_size=1`` that is Eq. 24 token by token
    (``power=q - 2``: as printed).
    """

    q: float = 4.0
    power: float = 1.0
    carry: str = "W"  # the state: "W" the normalised weights, "A" Eq. 24's unnormalised sum
    kind: ClassVar[str] = "lq"
    projects: ClassVar[bool] = True

    def __post_init__(self):
        check_real("LqNormalize", "q", self.q)  # (q = inf would make every entry's 1/q-th root 1: no norm)
        check_real("LqNormalize", "power", self.power)
        if not self.q > 1:
            raise ValueError(f"LqNormalize needs q > 1, got {self.q}")
        if not self.power > 0:
            raise ValueError(f"LqNormalize needs power > 0, got {self.power}")
        if self.carry not in ("W", "A"):
            raise ValueError(f"LqNormalize carry must be 'W' (the normalised weights) or 'A' (MIRAS Eq. 24's "
                             f"unnormalised sum), got {self.carry!r}")

    def _normalised(self, weights):
        return tuple(w / _norm_power(w, self.q, self.power) for w in weights)

    def gradient_point(self, start):
        return self._normalised(start) if self.carry == "A" else start

    def read_scales(self, start):
        return tuple(1 / _norm_power(w, self.q, self.power) for w in start) if self.carry == "A" else None

    @property
    def nonzero_start(self) -> bool:
        # A / ‖A‖^power has no limit at A = 0 (a unit direction at power 1, unbounded above it), and a zero
        # learned start would take its gradient there.
        return self.carry == "A"

    def chunk_end(self, weights, start, keep):
        return weights if self.carry == "A" else self._normalised(weights)

    def read_point(self, weights):
        return self._normalised(weights) if self.carry == "A" else weights


@dataclass(frozen=True, kw_only=True)
class KLSoftmax(Decay):
    """Memora's KL retention (MIRAS Eq. 21, 27): W_t = Softmax((1 − α_t) log W_{t−1} − θ_t g_t).

    The softmax runs over each weight matrix's rows (each output is a convex combination of its
    inputs), so the weights stay on the simplex: positive, rows summing to one. In logits the
    rule is linear, Z_t = (1 − α_t) Z_{t−1} − θ_t g_t with W = softmax(Z); so a chunk's exact step
    (gradients at the chunk-start weights W⁰, as every rule here) is, at the chunk end,
    W = softmax(β log W⁰ + Σ_i (β/β_i)(−θ_i g_i)) with β = Π(1 − α) over the chunk, and the sum
    is the linear update the engine already computed: (W_lin − β W⁰). Within a chunk the reads use
    that linear (first-order) update; at ``chunk_size=1`` every read is exact. ``initial`` maps
    any given initial weights (read as logits) onto the simplex.
    """

    kind: ClassVar[str] = "kl"
    projects: ClassVar[bool] = True
    tracks_keep: ClassVar[bool] = True
    # Rows on the simplex make the last layer's output nearly constant across features (its mean ~20x its
    # spread), and the layer norm after it amplifies a bf16 read's rounding by as much: reads stay float32.
    precise_reads: ClassVar[bool] = True

    def initial(self, weights):
        return tuple(torch.softmax(w, dim=-1) for w in weights)

    def chunk_end(self, weights, start, keep):
        keep = keep[..., None, None]
        tiny = torch.finfo(start[0].dtype).tiny
        return tuple(torch.softmax(keep * torch.log(w0.clamp_min(tiny)) + (w - keep * w0), dim=-1)
                     for w, w0 in zip(weights, start))


@dataclass(frozen=True, kw_only=True)
class ElasticNet(Decay):
    """Hard plus soft forgetting (MIRAS §5.2, elastic net): the decay gate α_t shrinks every weight
    (hard, ℓ2), and at chunk ends the smooth soft-threshold S_γ(w) = w · (2/π) arctan(|w|/γ) pulls
    small weights to zero (soft, ℓ1). ``gamma`` is the threshold: a constant, not §5.2's γ made of the
    gates, applied once per chunk (so per token it forgets by an amount that depends on the chunk size)."""

    gamma: float = 1e-3
    kind: ClassVar[str] = "elastic"
    projects: ClassVar[bool] = True

    def __post_init__(self):
        check_real("ElasticNet", "gamma", self.gamma)
        if not self.gamma > 0:
            raise ValueError(f"ElasticNet needs gamma > 0, got {self.gamma}")

    def chunk_end(self, weights, start, keep):
        return tuple(w * torch.atan(w.abs() / self.gamma) * (2 / math.pi) for w in weights)


def _norm_power(w: Tensor, q: float, power: float) -> Tensor:
    """‖w‖_q^power, the entrywise q-norm of each matrix of ``w [..., out, in]``, as ``[..., 1, 1]``. Kept
    >= tiny, and so is the sum under the root: a zero matrix normalises to zero, with finite gradients
    (the root's and the power's derivatives are infinite at 0), however large ``power`` is."""
    tiny = torch.finfo(w.dtype).tiny
    return w.abs().pow(q).sum((-2, -1), keepdim=True).clamp_min(tiny).pow(power / q).clamp_min(tiny)


@dataclass(frozen=True, kw_only=True)
class GD:
    """Plain gradient descent: S_t = −θ_t g_t (η ≡ 0)."""

    kind: ClassVar[str] = "gd"
    gates: ClassVar[frozenset[str]] = frozenset()
    uses_momentum: ClassVar[bool] = False
    channelwise: ClassVar[bool] = True  # takes channel-wise gates (memory/state.py)

    @staticmethod
    def effective_lr(lr: Tensor, k: Tensor) -> Tensor:
        return lr


@dataclass(frozen=True, kw_only=True)
class ImplicitGD(GD):
    """Implicit (proximal) GD, Longhorn (MIRAS Table 1): W_t = argmin_W θ_t ℓ(W; k_t, v_t) + ½‖W − W_{t−1}‖².

    For a linear memory and the L2 bias it is GD with θ'_t = θ_t / (1 + θ_t ‖k_t‖²):
    W_t = W_{t−1} − θ'_t (W_{t−1} k_t − v_t) k_tᵀ, exact at ``chunk_size=1``.
    """

    kind: ClassVar[str] = "implicit"
    channelwise: ClassVar[bool] = False  # θ' = θ/(1 + θ‖k‖²) rescales a token-level θ

    @staticmethod
    def effective_lr(lr: Tensor, k: Tensor) -> Tensor:
        return lr / (1 + lr * k.pow(2).sum(-1))


@dataclass(frozen=True, kw_only=True)
class Momentum:
    """Titans surprise (Eq. 10): S_t = η_t S_{t−1} − θ_t g_t."""

    kind: ClassVar[str] = "momentum"
    gates: ClassVar[frozenset[str]] = frozenset({"momentum"})
    uses_momentum: ClassVar[bool] = True
    channelwise: ClassVar[bool] = True

    @staticmethod
    def effective_lr(lr: Tensor, k: Tensor) -> Tensor:
        return lr

    @staticmethod
    def log_momentum(gates) -> Tensor:
        return _log_gate(gates.momentum)
