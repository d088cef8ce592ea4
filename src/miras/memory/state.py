"""Gates and recurrent state of the memory engine, and the input checks both paths share.

Conventions (memory/README.md, "The pinned update"): per token and head, θ_t = ``lr``, η_t = ``momentum``,
α_t = ``decay``, δ_t = ``threshold`` (Huber), each ``[B, T, H]``. The state is the memory's weights, a tuple of
``[B, H, out, in]`` tensors in application order, plus the momentum S (same shapes) or None.

Channel-wise gates (Titans-NeurIPS's α_t ∈ [0, 1]^{d_in}; MIRAS §5.4): ``lr``, ``momentum`` and
``decay`` may instead be ``[B, T, H, F]``, one value per *input channel* of every weight matrix,
F = Σ_l in_l (the layers' input widths concatenated in layer order; ``channel_widths``). Gate
channel c of layer l scales column c of W_l: the step is −θ ⊙ (δ ⊗ a) = −δ ⊗ (θ ⊙ a), the decay
W diag(1 − α), the momentum S diag(η). All three are diagonal on the same side, so they commute
and the chunked algebra holds per channel. For a matrix memory this is GLA's per-key-channel
decay. Any mix of token-level and channel-wise gates is allowed. Rules that need Π(1 − α) as a
scalar (PreDecay, KLSoftmax) or a per-token lr rescaling (ImplicitGD) take token-level gates only
(``supports_channel_gates``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .architectures import batch_shared
from .rules import MemoryRule

# The range of each gate (Gates' docstring): (low, high, whether low itself is allowed).
GATE_RANGES = {"lr": (0.0, None, True), "momentum": (0.0, 1.0, True), "decay": (0.0, 1.0, True),
               "threshold": (0.0, None, False)}


@dataclass(frozen=True)
class Gates:
    """Per-token, per-head gates, each ``[B, T, H]``; lr, momentum and decay may be channel-wise,
    ``[B, T, H, F]`` (module docstring).

    lr: θ_t, the inner learning rate (>= 0).
    momentum: η_t in [0, 1], the weight of past surprise; None for rules without momentum.
    decay: α_t in [0, 1], the forgetting rate; None for rules without retention.
    threshold: δ_t > 0, the Huber bias's switching threshold (Yaad); None for other biases.
    """

    lr: Tensor
    momentum: Tensor | None = None
    decay: Tensor | None = None
    threshold: Tensor | None = None

    def slice(self, start: int, stop: int) -> Gates:
        """The gates of tokens ``start:stop``."""
        return Gates(**{f.name: _maybe(getattr(self, f.name), lambda g: g[:, start:stop]) for f in fields(self)})

    def present(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def channelwise(self) -> bool:
        """Whether any gate is channel-wise (``[B, T, H, F]``)."""
        return any(g.dim() == 4 for g in self.present().values())


def _maybe(x, fn):
    return None if x is None else fn(x)


def _maybe_tuple(x) -> tuple:
    return () if x is None else (x,)


CHANNEL_GATES = frozenset({"lr", "momentum", "decay"})


def supports_channel_gates(rule) -> bool:
    """Whether the rule takes channel-wise gates (``[B, T, H, F]``); see the module docstring."""
    return not rule.retention.tracks_keep and not rule.retention.decay_first and rule.algorithm.channelwise


def channel_widths(rule, dk: int, dv: int) -> list[int]:
    """The input width of each weight matrix: the channels of a channel-wise gate, in layer order."""
    return [inp for _, inp in rule.architecture.weight_shapes(dk, dv)]


def per_layer(gate: Tensor, widths: list[int], channelwise: bool) -> list[Tensor]:
    """A gate at one token, ``[B, H]`` (token-level) or ``[B, H, F]`` (channel-wise), as one factor
    per weight matrix that broadcasts against ``[B, H, out, in_l]``."""
    if not channelwise:
        return [gate[..., None, None]] * len(widths)
    return [g.unsqueeze(-2) for g in gate.split(widths, dim=-1)]


def needs_retained(rule) -> bool:
    """Whether a state left mid-chunk must carry Π(1 − α) since the chunk start (``retained``)."""
    return rule.retention.tracks_keep


def detached(t: Tensor) -> Tensor:
    """``t.detach()``, copied if it is a view of a parameter (one row kept if it is expanded over the batch)."""
    parameter = isinstance(t._base, torch.nn.Parameter)
    t = t.detach()
    if not parameter:
        return t
    if batch_shared(t):
        return t[:1].clone().expand_as(t)
    return t.clone()


@dataclass(frozen=True)
class MemoryState:
    """The memory's recurrent state.

    weights: ``[B, H, out, in]`` each, first layer first: the memory after the last token.
    momentum: the surprise S, same shapes, or None when the rule has no momentum.
    chunk_start, position: a call may end inside a chunk; then ``position`` (0 < position <
    chunk_size) tokens of the current chunk are already written and ``chunk_start`` holds the
    weights at the chunk start, where the rest of the chunk takes its gradients. At a chunk
    boundary, position is 0 and chunk_start None. This makes streaming exact: any split of a
    sequence into calls gives the same outputs and state as one call.
    retained: ``[B, H]``, Π(1 − α) over those ``position`` tokens, kept (mid-chunk only) for the
    retentions whose chunk step needs it (KLSoftmax, PreDecay; ``needs_retained(rule)``).
    chunk_size: mid-chunk, the chunk size of the call that left it there (a call continuing it must use
    the same); 0 at a chunk boundary, or unrecorded (states saved before it was kept).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] | None = None
    chunk_start: tuple[Tensor, ...] | None = None
    position: int = 0
    retained: Tensor | None = None
    chunk_size: int = 0

    def _map(self, fn) -> MemoryState:
        return MemoryState(tuple(map(fn, self.weights)), _maybe(self.momentum, lambda m: tuple(map(fn, m))),
                           _maybe(self.chunk_start, lambda m: tuple(map(fn, m))), self.position,
                           _maybe(self.retained, fn), self.chunk_size)

    def detach(self) -> MemoryState:
        """The same state cut from the autograd graph (truncated backpropagation through time). Weights
        that are still a layer's learned initial memory (a view of the parameter, expanded over the
        batch) are copied: an optimizer step or ``load_state_dict`` changes the parameter in place, and
        must not change a state that was made before it."""
        return self._map(detached)

    def to(self, *args, **kwargs) -> MemoryState:
        return self._map(lambda t: t.to(*args, **kwargs))

    def tensors(self) -> tuple[Tensor, ...]:
        return self.weights + (self.momentum or ()) + (self.chunk_start or ()) + _maybe_tuple(self.retained)

    def nbytes(self) -> int:
        """Size of the state in bytes (for the whole batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def check_inputs(rule, q: Tensor, k: Tensor, v: Tensor, gates: Gates, state: MemoryState | None,
                 chunk_size: int) -> None:
    """Raise a ValueError/TypeError that says what is wrong and what is allowed."""
    check_rule(rule)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, T, H, D], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    tensors = {"q": q, "k": k, "v": v, **{f"gates.{n}": g for n, g in getattr(gates, "present", dict)().items()
                                          if isinstance(g, Tensor)}}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"q, k, v and the gates must be on one device, got {listed} (.to(q.device) moves one)")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must match k in [B, T, H] (batch, tokens, heads), got v {tuple(v.shape)} and k {tuple(k.shape)}")
    check_count("chunk_size", chunk_size)
    batch, tokens, heads = k.shape[:3]
    if batch < 1 or heads < 1:
        raise ValueError(f"q, k, v need at least one sequence and one head, got B={batch}, H={heads}")
    rule.architecture.check_dims(k.shape[-1], v.shape[-1])
    _check_gates(rule, gates, (batch, tokens, heads), sum(channel_widths(rule, k.shape[-1], v.shape[-1])), k.dtype)
    _check_finite({"q": q, "k": k, "v": v})
    if state is not None:
        check_state(rule, state, batch, heads, k.shape[-1], v.shape[-1], k.dtype, k.device)
        if state.position and state.chunk_size and state.chunk_size != chunk_size:
            raise ValueError(f"the state was left {state.position} tokens into a chunk of {state.chunk_size}; "
                             f"continue it with chunk_size={state.chunk_size}, got {chunk_size}")
        if not 0 <= state.position < chunk_size:
            raise ValueError(f"state.position is {state.position}: the state was left inside a chunk of a larger "
                             f"chunk_size; continue it with the chunk_size it was made with, got {chunk_size}")


STATE_COUNTS = {"position": "tokens into the current chunk",
                "chunk_size": "the chunk size of a state left mid-chunk; 0 at a chunk boundary"}


def check_count(name: str, value) -> None:
    """``value`` is an integer >= 1 (a size: chunk, batch, heads, dims), or a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_rule(rule) -> None:
    if not isinstance(rule, MemoryRule):
        raise TypeError(f"rule must be a miras.memory.MemoryRule (e.g. get_rule('titans')), got {type(rule).__name__}")


def _check_gates(rule, gates: Gates, shape: tuple[int, int, int], channels: int, dtype: torch.dtype) -> None:
    if not isinstance(gates, Gates):
        raise TypeError(f"gates must be a miras.memory.Gates, got {type(gates).__name__}")
    needed = {"lr"} | rule.needed_gates()
    for name, gate in gates.present().items():
        if not isinstance(gate, Tensor) or gate.dtype != dtype:
            got = gate.dtype if isinstance(gate, Tensor) else type(gate).__name__
            raise TypeError(f"gates.{name} must be a tensor of q, k and v's dtype {dtype}, got {got}")
        _check_gate_values(name, gate)
        if name not in needed:
            raise ValueError(f"gates.{name} was given but the rule {rule.name()} does not use it; "
                             f"it uses {sorted(needed)}")
        if gate.dim() == 4 and name in CHANNEL_GATES and tuple(gate.shape) == (*shape, channels):
            if not supports_channel_gates(rule):
                raise ValueError(f"gates.{name} is channel-wise, but the rule {rule.name()} takes token-level "
                                 "gates [B, T, H] only (channel-wise gates need a retention without "
                                 "PreDecay/KLSoftmax and GD or Momentum)")
            continue
        if tuple(gate.shape) != shape:
            allowed = f"[B, T, H] = {list(shape)}"
            if name in CHANNEL_GATES and supports_channel_gates(rule):
                allowed += f" or channel-wise [B, T, H, F] = {[*shape, channels]}"
            raise ValueError(f"gates.{name} must have shape {allowed}, got {list(gate.shape)}")
    missing = needed - set(gates.present())
    if missing:
        raise ValueError(f"the rule {rule.name()} needs gates {sorted(missing)}, which are None")


def map_tensors(value, function: Callable[[Tensor], Tensor]):
    """``value`` (a state or gates dataclass, a tuple, a tensor or a plain value, nested) with ``function`` applied
    to every tensor; everything else as it is."""
    if dataclasses.is_dataclass(value):
        return type(value)(**{f.name: map_tensors(getattr(value, f.name), function) for f in fields(value)})
    if isinstance(value, tuple):
        return tuple(map_tensors(v, function) for v in value)
    return function(value) if isinstance(value, Tensor) else value


def iter_tensors(value) -> Iterator[Tensor]:
    """Every tensor in ``value`` (nested as ``map_tensors`` takes it), in field order, without rebuilding it."""
    if dataclasses.is_dataclass(value):
        for f in fields(value):
            yield from iter_tensors(getattr(value, f.name))
    elif isinstance(value, tuple):
        for v in value:
            yield from iter_tensors(v)
    elif isinstance(value, Tensor):
        yield value


class InputRangeError(ValueError):
    """A gate outside its range, or a gate, query, key or value not finite (a diverged model's are NaN: the
    trainer says so)."""


def _reads_values(x: Tensor) -> bool:
    """Whether the input checks read ``x``'s values: on the CPU only (elsewhere a check would wait for the device at
    every call), not while compiling, and only where there are any."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and x.numel() > 0


def _check_finite(tensors: dict[str, Tensor]) -> None:
    """q, k and v hold no NaN or infinity (read as the gate ranges are). ``chunked`` reads a chunk with masked
    products, where 0 x NaN is NaN: a NaN key or value would reach the tokens before it in its chunk."""
    if not _reads_values(next(iter(tensors.values()))):
        return
    if math.isfinite(sum(float(x.detach().sum()) for x in tensors.values())):  # then every element is finite
        return
    for name, x in tensors.items():  # NaN or inf somewhere, or (unlikely) a finite sum that overflowed
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            where = [int(i) for i in bad.nonzero()[0][:3]]
            raise InputRangeError(f"{name} must be finite, got NaN or inf at [batch, token, head] = {where}")


def _check_gate_values(name: str, gate: Tensor) -> None:
    """Each gate in its range (Gates' docstring). Checked on the CPU only: elsewhere the check would
    wait for the device at every call (a MemoryLayer's gates are in range by construction)."""
    if not _reads_values(gate) or name not in GATE_RANGES:
        return
    low, high, closed = GATE_RANGES[name]
    least, most = (float(x) for x in torch.aminmax(gate.detach()))  # NaN anywhere makes both NaN
    valid = (least >= low if closed else least > low) and (most <= high if high is not None else most < math.inf)
    if not valid:  # (NaN fails every comparison)
        allowed = f"in [{low}, {high}]" if high is not None else (f">= {low}" if closed else f"> {low}")
        raise InputRangeError(f"gates.{name} must be finite and {allowed}, got values in [{least:.4g}, {most:.4g}]")


def check_weights(rule, weights, batch: int, heads: int, dk: int, dv: int) -> list[tuple[int, ...]]:
    """The memory weights have the rule's shapes for [B, H] and (dk, dv); returns those shapes."""
    expected = [(batch, heads, *s) for s in rule.architecture.weight_shapes(dk, dv)]
    if not all(isinstance(w, Tensor) for w in weights):
        raise TypeError(f"state.weights must be tensors, got {[type(w).__name__ for w in weights]}")
    got = [tuple(w.shape) for w in weights]
    if got != expected:
        raise ValueError(f"state.weights must have shapes {expected} for {rule.architecture}, got {got}")
    return expected


def check_state(rule, state: MemoryState, batch: int, heads: int, dk: int, dv: int,
                dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a miras.memory.MemoryState or None, got {type(state).__name__}")
    for name in ("position", "chunk_size"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"state.{name} must be an integer >= 0 ({STATE_COUNTS[name]}), got {value!r}")
    if not isinstance(state.weights, tuple) or not isinstance(state.momentum, (tuple, type(None))) \
            or not isinstance(state.chunk_start, (tuple, type(None))):
        raise TypeError("state.weights, and state.momentum and state.chunk_start when given, must be tuples of "
                        f"tensors, got {type(state.weights).__name__}, {type(state.momentum).__name__}, "
                        f"{type(state.chunk_start).__name__}")
    expected = check_weights(rule, state.weights, batch, heads, dk, dv)
    if device is not None and any(t.device != device for t in state.tensors()):
        raise ValueError(f"the state must be on q, k and v's device {device}, got "
                         f"{sorted({str(t.device) for t in state.tensors()})} (state.to({str(device)!r}) moves it)")
    if dtype is not None and any(t.dtype != dtype for t in state.tensors()):
        raise TypeError(f"the state's tensors must have q, k and v's dtype {dtype}, got "
                        f"{sorted({str(t.dtype) for t in state.tensors()})} (state.to({dtype}) converts it)")
    if rule.algorithm.uses_momentum:
        if state.momentum is None or [tuple(s.shape) for s in state.momentum] != expected:
            got_m = None if state.momentum is None else [tuple(s.shape) for s in state.momentum]
            raise ValueError(f"state.momentum must have shapes {expected} (the rule uses momentum), got {got_m}")
    elif state.momentum is not None:
        raise ValueError("state.momentum must be None: the rule has no momentum")
    if (state.position == 0) != (state.chunk_start is None):
        raise ValueError("state.chunk_start must be given exactly when state.position > 0 (a state left mid-chunk)")
    if state.chunk_start is not None and [tuple(w.shape) for w in state.chunk_start] != expected:
        got_c = [tuple(w.shape) for w in state.chunk_start]
        raise ValueError(f"state.chunk_start must have shapes {expected}, got {got_c}")
    want_retained = state.position > 0 and needs_retained(rule)
    if want_retained != (state.retained is not None):
        raise ValueError("state.retained must be given exactly when the state was left mid-chunk by a rule whose "
                         f"retention needs it (KLSoftmax, PreDecay); position={state.position}, rule {rule.name()}")
    if state.retained is not None and tuple(state.retained.shape) != (batch, heads):
        raise ValueError(f"state.retained must have shape {[batch, heads]}, got {list(state.retained.shape)}")
    # (0 is in range: a product of strong forgetting underflows to it, in float32 within a chunk)
    if state.retained is not None and state.retained.device.type == "cpu" and state.retained.numel() and not (
            0 <= state.retained.min() and state.retained.max() <= 1):
        raise ValueError("state.retained is a product of retentions 1 − α: it must be in [0, 1], got values in "
                         f"[{state.retained.min().item():.3g}, {state.retained.max().item():.3g}]")
