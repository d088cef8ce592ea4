"""The Titans neural long-term memory as a token mixer (Titans §3.1, §4.4; MIRAS §5.4).

    x ─ Linear ─ causal depthwise conv (kernel 4) ─ SiLU ─┬─ q, k (L2-normalised per head), v
    x ─ Linear ─ sigmoid ─ θ_t = max_lr·σ, η_t = σ, α_t = σ   (per token and head)
    y = engine(rule, q, k, v, gates, state)                   (read after write, §2.2)
    out = Linear( RMSNorm_head(y) ⊙ SiLU(Linear(x)) )

Choices where the papers are silent (PAPERS.md §4), and why:
- Gates are token-level, per head, from one linear map of x_t. The gate projection's weight starts
  at zero, so at initialisation every gate equals its bias, set to give ``GATE_INIT``
  (θ = 0.1, η = 0.9, α = 0.001) whatever ``max_lr`` (the upper bound of θ) is. With unit-norm
  keys the inner problem's curvature is O(1),
  so these values keep momentum GD stable (θ < 2(1 + η)); the default config runs 16K tokens
  without NaN (tested). That bound is per token. Inside a chunk every gradient is taken at the
  chunk-start weights, so tokens with the same key add up to one step: a chunk of b equal unit keys
  is one GD step of b·θ, stable only for b·θ < 2. A matrix memory trained by plain GD (``ttt-linear``:
  no retention, nothing bounding its prediction) then diverges on a run of one repeated byte once θ
  passes 2/b: ttt-linear-tiny (chunk 8) with every θ set to 0.2 stays bounded over 768 such
  tokens, with θ = 0.3 its state reaches 1.8e13 (by hand). Its θ starts at 0.1 but may train up to
  ``max_lr`` (1); ``max_lr`` < 2/``chunk_size`` rules this out for it. With momentum the chunk's
  step is θ·Σ_{t≤b} (1 − η^t)/(1 − η), ~87θ at b = 16 and η = 0.9: a Titans matrix memory
  (``memory_depth=1``) blew up from θ = 0.1, so it starts at 0.01 (models/config.py
  ``LINEAR_MOMENTUM_GATES``). The MLP memories' output LayerNorm bounds their error, and the exact
  online path (``impl="delta"``, chunk 1) has b = 1.
- α starts at 0.001 (a retention half-life of ~700 tokens). It was 0.01 until the demo's design
  runs: with 0.01 a tiny titans-lmm trained at 32 tokens forgot within ~2K tokens, and one seed's
  memory blew up between 1K and 2K (``OMP_NUM_THREADS=1 miras train titans-lmm-tiny`` with the
  demo's settings, ``seed=3 model.decay_init=0.01 eval_every=0``, then ``miras eval --seed 123
  --segment 32``: 0.97 at 1K, 0.00 at 2K; trained with two threads, the same seed gave 0.91 / 0.94:
  float summation order alone decides). With 0.001 it recalled at 256x (``docs/demo``).
  ``gate_init`` overrides any starting value (model config ``decay_init``, ``lr_init``).
- θ starts at 0.01 in the titans-mac presets (``lr_init``, models/config.py ``MAC_GATES``). MAC writes
  this memory with an attention output that reads the memory; from θ = 0.1 (with η = 0.9, an
  effective step of 1) that loop amplified rounding until an untrained titans-mac-tiny's float32
  logits were 0.15 off its float64 ones after 384 tokens. From 0.01 they stay within 1e-5 there, as
  every other Titans model's do from 0.1 (``test_untrained_titans_models_are_not_chaotic_in_float32``).
  The loop still amplifies rounding, only more slowly: on 8K random bytes the untrained float32
  titans-mac-tiny drifts from float64 by 1.2e-3 at 4K tokens and 0.25 at 8K (titans-lmm-tiny: under
  1e-5 throughout), and float64 itself drifts between one call and segments of 1000 tokens by
  5e-10 at 8K (by hand in a review). Streaming is exact; the untrained MAC is sensitive to rounding,
  so its float32 results over long streams depend on the summation order (thread count, batch).
- Huber's threshold δ_t (Yaad) is a fourth token-level gate, δ = softplus(·), initialised to 1
  (RMS units, see ``miras.memory.Huber``).
- ``gating="channel"`` (MIRAS §5.4, Titans-NeurIPS's channel-wise α): θ, η, α per token, head and
  memory input channel (``miras.memory.Gates``: F = the input widths of the memory's weight
  matrices). Logit = the token-level logit + a low-rank term U tanh(D x_t), D: dim → ``gate_rank``
  (MIRAS: 32 or 64, after RWKV-7), U: gate_rank → heads·F, with U zero at initialisation, so a
  fresh layer's gates equal token gating's. Rules needing a scalar gate (PreDecay, KLSoftmax,
  implicit GD) and ``impl="delta"`` take token-level gates only; Huber's δ_t stays token-level.
- ``gating="fixed"`` (RetNet): no data-dependent gates; θ ≡ 1 and a fixed decay per head,
  α_h = 2^(−5−h) (γ_h = 1 − 2^(−5−h), Sun et al. 2023), for rules whose gates are lr and decay.
- The initial memory weights are learned, one set per head (meta-learned M_0): N(0, 1/fan_in)
  for MLP memories, zero for matrix memories; a constrained memory maps them onto its set
  (KLSoftmax: row softmax, so the learned parameters are logits, initialised N(0, 1) so that the
  rows start peaked rather than uniform). The initial momentum is zero.
- ``impl="delta"`` computes the online rule (``chunk_size=1``) exactly, in blocks of
  ``block_size`` tokens (``miras.memory.delta``): DeltaNet, Gated DeltaNet, Longhorn.
- The engine runs in the dtype of the initial weights (float32 by default), also under bf16
  autocast: the projections and the memory reads then run in bf16, while the write path (inner
  gradients, gate algebra, state update) stays float32 (see ``memory/chunked.py``). A layer cast to
  half precision (float16, bfloat16) runs its engine and keeps its memory state in float32 too
  (``engine_dtype``); the projections run in half precision (and MAC's retrieval reads the memory
  in the model's dtype, as under autocast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..memory import TITANS, Gates, MemoryRule, MemoryState, chunked, recurrent
from ..memory.chunked import check_fused, check_recompute
from ..memory.delta import delta, supports_delta
from ..memory.state import (
    CHANNEL_GATES,
    InputRangeError,
    channel_widths,
    check_count,
    check_rule,
    supports_channel_gates,
)
from .base import check_input, piece_sizes

IMPLS = ("chunked", "compiled", "recurrent", "delta")
GATINGS = ("token", "fixed", "channel")
# Gate values at initialisation (before any training): the biases are set to produce these.
GATE_INIT = {"lr": 0.1, "momentum": 0.9, "decay": 0.001, "threshold": 1.0}


@dataclass(frozen=True)
class MemoryLayerState:
    """What a MemoryLayer carries between calls: the memory and the conv inputs' tail."""

    memory: MemoryState
    conv: Tensor  # [B, kernel - 1, 3 * heads * head_dim], the last pre-conv projections

    @property
    def batch(self) -> int:
        return self.conv.shape[0]

    def detach(self) -> MemoryLayerState:
        return MemoryLayerState(self.memory.detach(), self.conv.detach())

    def nbytes(self) -> int:
        return self.memory.nbytes() + self.conv.numel() * self.conv.element_size()


def recompute_tokens(recompute: int, impl: str, chunk_size: int, block_size: int) -> int:
    """The tokens of one ``recompute`` group (0: off): ``recompute`` chunks, or blocks on the delta path
    (``impl="delta"``, whose chunk is one token: groups of a few tokens would be too small to run fast)."""
    return recompute * (block_size if impl == "delta" else chunk_size)


class MemoryLayer(nn.Module):
    """A MIRAS/Titans memory layer: ``forward(x [B, T, dim], state=None) -> (y [B, T, dim], state)``.

    ``impl``: "chunked" (the dual-form fast path), "compiled" (the same with each chunk step under
    ``torch.compile``: fastest after a one-off compile per shape), "recurrent" (the reference), or
    "delta" (the exact online delta rule in blocks of ``block_size``; needs ``chunk_size=1``).
    ``recompute=G``: under autograd the call runs in checkpointed groups of G chunks' tokens (G blocks'
    on the delta path, whose chunk is one token), so backward keeps only each group's input and start
    state and recomputes one group at a time (less memory, one more forward; ``_in_groups``).
    ``fused``: None (default) differentiates the Titans/TTT-MLP memory with the hand-written
    backward of ``miras.memory.fused`` under ``recompute``, autograd otherwise; True/False force it
    on (where covered) or off. Same values and gradients either way.
    ``gating``: "token" (data-dependent gates per token and head), "channel" (per token, head and
    memory input channel, through a rank-``gate_rank`` projection) or "fixed" (RetNet's constants).
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int | None = None, rule: MemoryRule = TITANS,
                 chunk_size: int = 16, *, max_lr: float = 1.0, conv_size: int = 4, impl: str = "chunked",
                 block_size: int = 64, gating: str = "token", gate_rank: int = 32, recompute: int = 0,
                 gate_init: dict[str, float] | None = None, fused: bool | None = None):
        super().__init__()
        check_rule(rule)
        for name, value in (("dim", dim), ("heads", heads), ("chunk_size", chunk_size), ("conv_size", conv_size),
                            ("block_size", block_size)) + (() if head_dim is None else (("head_dim", head_dim),)):
            check_count(name, value)
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not 0 < max_lr < math.inf:
            raise ValueError(f"max_lr must be a finite number > 0, got {max_lr!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
        if impl == "delta" and (chunk_size != 1 or not supports_delta(rule)):
            raise ValueError("impl='delta' computes the online rule (chunk_size=1) of a LinearMemory + L2 + "
                             f"linear-retention + (implicit) GD rule; got chunk_size={chunk_size}, {rule.name()}")
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {list(GATINGS)}, got {gating!r}")
        if gating == "fixed" and not rule.needed_gates() <= {"decay"}:
            raise ValueError(f"gating='fixed' sets lr and decay only; the rule {rule.name()} needs "
                             f"{sorted(rule.needed_gates())}")
        if gating == "channel" and (impl == "delta" or not supports_channel_gates(rule)):
            raise ValueError(f"gating='channel' needs a rule without PreDecay/KLSoftmax/implicit GD and impl other "
                             f"than 'delta'; got {rule.name()} with impl={impl!r} (use gating='token')")
        if gating == "channel" and (not isinstance(gate_rank, int) or isinstance(gate_rank, bool) or gate_rank < 1):
            raise ValueError(f"gate_rank must be an integer >= 1, got {gate_rank!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}; pass head_dim explicitly")
            head_dim = dim // heads
        self.gate_init = {**GATE_INIT, **(gate_init or {})}
        if set(self.gate_init) != set(GATE_INIT):
            raise ValueError(f"gate_init keys must be among {sorted(GATE_INIT)}, got {sorted(gate_init)}")
        for name, value in self.gate_init.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"gate_init[{name!r}] must be a number, got {value!r}")
            bounded = name in ("momentum", "decay")
            if not (0 < value < 1 if bounded else value > 0):
                raise ValueError(f"gate_init[{name!r}] must be in {'(0, 1)' if bounded else '(0, inf)'}, got {value}")
        if max_lr <= self.gate_init["lr"]:
            raise ValueError(f"max_lr must exceed the initial lr {self.gate_init['lr']}, got {max_lr}")
        self.dim, self.heads, self.head_dim, self.rule = dim, heads, head_dim, rule
        self.chunk_size, self.max_lr, self.impl = chunk_size, max_lr, impl
        self.block_size, self.gating = block_size, gating
        check_recompute(recompute)
        check_fused(fused)
        self.recompute, self.fused = recompute, fused
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, conv_size))
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(conv_size), 1 / math.sqrt(conv_size))
        self.gate_names = ["lr"] + sorted(rule.needed_gates())
        self.gate_proj = nn.Linear(dim, heads * len(self.gate_names)) if gating != "fixed" else None
        # Channel-wise gates: a low-rank per-channel term added to the token-level logits.
        self.channel_gates = [name for name in self.gate_names if name in CHANNEL_GATES] if gating == "channel" else []
        self.channels = sum(channel_widths(rule, head_dim, head_dim))
        if self.channel_gates:
            self.gate_down = nn.Linear(dim, gate_rank, bias=False)
            self.gate_up = nn.Linear(gate_rank, len(self.channel_gates) * heads * self.channels)
        shapes = rule.architecture.weight_shapes(head_dim, head_dim)
        self.initial_weights = nn.ParameterList(nn.Parameter(self._initial_weight(out, inp)) for out, inp in shapes)
        self.out_norm_weight = nn.Parameter(torch.ones(head_dim))
        self.out_gate = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_gates()

    def _initial_weight(self, out: int, inp: int) -> Tensor:
        if hasattr(self.rule.retention, "initial"):
            # Logits of a simplex-constrained memory: N(0, 1) gives peaked rows. With N(0, 1/fan_in)
            # the rows are near uniform, every output averages the same inputs, and Memora did not
            # learn the recall task in 200 steps (loss 2.46 vs 0.98 with this init; chance 2.77).
            return torch.randn(self.heads, out, inp)
        if self.rule.architecture.kind == "linear" and not self.rule.retention.nonzero_start:
            return torch.zeros(self.heads, out, inp)
        return torch.randn(self.heads, out, inp) / math.sqrt(inp)

    def reset_gates(self) -> None:
        """Zero gate weights and biases that give ``gate_init`` (default ``GATE_INIT``) at every token (and channel)."""
        if self.gate_proj is None:
            return
        nn.init.zeros_(self.gate_proj.weight)
        if self.channel_gates:
            nn.init.zeros_(self.gate_up.weight)
            nn.init.zeros_(self.gate_up.bias)
        bias = []
        for name in self.gate_names:
            value = self.gate_init[name] / (self.max_lr if name == "lr" else 1.0)
            # softplus⁻¹ for the unbounded threshold, logit for the gates in (0, 1)
            inverse = math.log(math.expm1(value)) if name == "threshold" else math.log(value / (1 - value))
            bias.append(torch.full((self.heads,), inverse))
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.cat(bias))

    @property
    def engine_dtype(self) -> torch.dtype:
        """The dtype the memory's state and write path run in: the layer's own (float32 by default, float64),
        but float32 for a half-precision layer (``model.half()``, ``.to(torch.bfloat16)``), as under autocast:
        in half precision the inner updates lose the state (Moneta's Lp bias with its q-norm retention was
        off by the size of its output)."""
        return torch.promote_types(self.initial_weights[0].dtype, torch.float32)

    def init_state(self, batch: int) -> MemoryLayerState:
        """The learned initial memory for ``batch`` sequences, zero momentum, an empty conv tail."""
        weights = tuple(w.to(self.engine_dtype).unsqueeze(0).expand(batch, *w.shape) for w in self.initial_weights)
        if hasattr(self.rule.retention, "initial"):  # a constrained memory (KLSoftmax: the simplex)
            weights = self.rule.retention.initial(weights)
        momentum = tuple(torch.zeros_like(w) for w in weights) if self.rule.algorithm.uses_momentum else None
        conv = self.conv_weight.new_zeros(batch, self.conv_weight.shape[1] - 1, self.conv_weight.shape[0])
        return MemoryLayerState(MemoryState(weights, momentum), conv)

    def forward(self, x: Tensor, state: MemoryLayerState | None = None) -> tuple[Tensor, MemoryLayerState]:
        check_input(x, self.dim, self.qkv.weight.dtype, None)
        batch = x.shape[0]
        if state is None:
            state = self.init_state(batch)
        elif not isinstance(state, MemoryLayerState) or state.conv.shape[0] != batch:
            got = state.conv.shape[0] if isinstance(state, MemoryLayerState) else type(state).__name__
            raise ValueError(f"state must be a MemoryLayerState for a batch of {batch} (from init_state or a "
                             f"previous call on the same batch), got {got}")
        elif state.conv.shape[1:] != (self.conv_weight.shape[1] - 1, self.conv_weight.shape[0]):
            raise ValueError(f"state comes from another layer: its conv tail is {list(state.conv.shape[1:])}, "
                             f"this layer's is {[self.conv_weight.shape[1] - 1, self.conv_weight.shape[0]]} "
                             f"(conv_size - 1, 3 x heads x head_dim)")
        if x.shape[1] == 0:  # nothing to read or write: no output, the state as it was
            return x.new_zeros(batch, 0, self.dim), state
        if self.recompute and torch.is_grad_enabled():
            return self._in_groups(x, state)
        y, state = self._call(x, state, fused=self.fused)
        # Without autograd the state is detached: nothing in it is then a view of a parameter (a memory still at
        # its learned initial weights), so changing the layer in place later leaves the state as it was.
        return y, (state if torch.is_grad_enabled() else state.detach())

    def _call(self, x: Tensor, state: MemoryLayerState, *, fused: bool | None):
        q, k, v, gates, conv_tail = self._engine_inputs(x, state.conv)
        memory = state.memory
        if memory.weights[0].dtype == self.initial_weights[0].dtype != self.engine_dtype:
            # a half layer's state (``state.to(model dtype)``): its engine keeps float32. (A float32 layer is
            # given no half state: that would lose precision unsaid; the engine's dtype check refuses it.)
            memory = memory.to(self.engine_dtype)
        try:
            y, memory = self._engine(q, k, v, gates, memory, fused=fused)
        except InputRangeError as error:  # NaN gates or q, k, v: say where they come from (only on this error path)
            if not bool(torch.isfinite(x).all()):
                raise InputRangeError(f"{error}: this memory layer's input holds NaN or inf, so an earlier layer, or "
                                      "the state carried into the model, has diverged") from None
            raise
        return self._output(y, x), MemoryLayerState(memory, conv_tail)

    def _in_groups(self, x: Tensor, state: MemoryLayerState) -> tuple[Tensor, MemoryLayerState]:
        """``recompute=G`` under autograd: the call runs in groups of G chunks' tokens (G blocks' for
        impl="delta": groups of G single-token chunks would be too small to run fast; the first group
        ends at a chunk boundary), each checkpointed whole: projections, engine and output, carrying the
        state. Backward keeps each group's input and start state and recomputes one group at a time,
        so activation memory is one group's, at any length. Inside a group the engine keeps every
        chunk's state (the fused backward where it covers the rule), so backward recomputes nothing
        twice. Exact: streaming gives the same outputs, state and gradients as one call."""
        group = recompute_tokens(self.recompute, self.impl, self.chunk_size, self.block_size)
        fused = True if self.fused is None else self.fused
        outputs = []
        # split, not sliced per group: a slice's backward fills a zero gradient the size of all of x
        for piece in x.split(piece_sizes(x.shape[1], group, state.memory.position), dim=1):
            y, state = checkpoint(self._call, piece, state, fused=fused, use_reentrant=False)
            outputs.append(y)
        return torch.cat(outputs, dim=1), state

    def _engine_inputs(self, x: Tensor, conv_tail: Tensor):
        """q, k, v (unit-norm q and k) and the gates for the engine, and the conv tail to carry."""
        batch, tokens, _ = x.shape
        qkv, conv_tail = self._conv(self.qkv(x), conv_tail)
        engine_dtype = self.engine_dtype
        q, k, v = F.silu(qkv).to(engine_dtype).view(batch, tokens, 3, self.heads, self.head_dim).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k, v, self._gates(x, engine_dtype), conv_tail

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head norm of the memory's read, the output gate, the output projection."""
        y = F.rms_norm(y, (self.head_dim,), self.out_norm_weight.to(y.dtype), eps=1e-6)
        y = y.reshape(*x.shape[:2], -1).to(x.dtype) * F.silu(self.out_gate(x))
        return self.out_proj(y)

    def _conv(self, u: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv over time, continuing from the previous call's last inputs."""
        kernel = self.conv_weight.shape[1]
        padded = torch.cat([tail.to(u.dtype), u], dim=1)
        out = F.conv1d(padded.transpose(1, 2), self.conv_weight.unsqueeze(1).to(u.dtype), groups=u.shape[-1])
        # cloned: a view would keep the whole call's padded projections alive in the state (and in its file)
        return out.transpose(1, 2), padded[:, padded.shape[1] - (kernel - 1):].clone()

    # A whole-model torch.compile (``compile=true`` in training) leaves the engine out: tracing it would unroll
    # its loop over every chunk of the call (titans-lmm-tiny, 256-token rows: no step within 10 minutes of
    # compiling on CPU). Its own compilation is ``impl="compiled"``, one chunk step, which still applies here.
    @torch.compiler.disable
    def _engine(self, q, k, v, gates: Gates, memory: MemoryState, *, fused: bool | None):
        if self.impl == "delta":
            return delta(self.rule, q, k, v, gates, memory, self.block_size)
        if self.impl == "recurrent":
            return recurrent(self.rule, q, k, v, gates, memory, self.chunk_size)
        return chunked(self.rule, q, k, v, gates, memory, self.chunk_size, compile=self.impl == "compiled",
                       fused=fused)

    def _gates(self, x: Tensor, dtype: torch.dtype) -> Gates:
        shape = (*x.shape[:2], self.heads)
        if self.gate_proj is None:  # RetNet: θ = 1, α_h = 2^(−5−h)
            values = {"lr": torch.ones(shape, dtype=dtype, device=x.device)}
            if "decay" in self.gate_names:
                alpha = 2.0 ** (-5.0 - torch.arange(self.heads, dtype=dtype, device=x.device))
                values["decay"] = alpha.expand(shape)
            return Gates(**values)
        raw = self.gate_proj(x).to(dtype).view(*x.shape[:2], len(self.gate_names), self.heads)
        values = dict(zip(self.gate_names, raw.unbind(2)))
        if self.channel_gates:  # [B, T, H] + [B, T, H, F]
            low_rank = self.gate_up(torch.tanh(self.gate_down(x))).to(dtype)
            low_rank = low_rank.view(*x.shape[:2], len(self.channel_gates), self.heads, self.channels)
            for name, term in zip(self.channel_gates, low_rank.unbind(2)):
                values[name] = values[name].unsqueeze(-1) + term
        values = {name: F.softplus(g) if name == "threshold" else torch.sigmoid(g) for name, g in values.items()}
        values["lr"] = self.max_lr * values["lr"]
        return Gates(**values)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}, "
                f"impl={self.impl!r}, gating={self.gating!r}, rule={self.rule.name()}")
