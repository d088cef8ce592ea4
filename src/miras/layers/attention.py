"""Causal self-attention with RoPE, optionally sliding-window with always-visible sink tokens (SWA*).

``Attention(dim, heads, window=None, sinks=0)``:
- ``window=None``: full causal attention (the Transformer baseline); its KV cache grows with the
  context.
- ``window=w``: each query sees the w most recent positions (itself included). ``sinks=s`` makes
  the first s positions of the stream visible to every later query: with the persistent tokens
  prepended to the stream (Titans Eq. 19), this is the SW-Attn* of MAG (Titans §4.2). The cache
  then holds at most s + w − 1 keys, whatever the context length.

A call longer than 2·window runs in blocks of ``window`` queries against the keys their band can
reach (``_banded``): O(T·window) time and memory instead of a dense [T, T] mask.

Full attention that continues from a cache, without gradients on a CPU (streamed evaluation and
prefill), runs as two flash-attention calls, the cached keys unmasked and the new keys causal, merged
by their log-sum-exps (``_continued``): no [T, cache + T] mask is made (transformer-tiny, 64K tokens
in 4K segments, float32: 8.7 s and a 465 MiB peak against 32.9 s and 2,779 MiB with the masked call;
``benchmarks/streamed_prefill.py``). With gradients, or where torch's CPU flash kernel (a private op
that also returns the log-sum-exp) is missing, the masked call runs; tests hold the two equal.

Streaming is exact: ``forward(x, state)`` continues from the cache, so a sequence fed in pieces (or
token by token) gives the same outputs as one call. RoPE uses absolute stream positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..memory.state import check_count
from .base import check_input


@dataclass(frozen=True)
class KVCache:
    """Keys (RoPE applied) and values ``[B, H, L, D]`` of the positions still visible to future
    queries, their absolute positions ``[L]``, and the number of tokens seen so far."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    seen: int

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def detach(self) -> KVCache:
        return KVCache(self.keys.detach(), self.values.detach(), self.positions, self.seen)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (Su et al. 2021), half-split layout. x ``[B, H, T, D]``, positions ``[T]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1)


class Attention(nn.Module):
    """Multi-head causal attention: ``forward(x [B, T, dim], state=None) -> (y, KVCache)``."""

    def __init__(self, dim: int, heads: int, *, window: int | None = None, sinks: int = 0,
                 rope_base: float = 10000.0):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)) + (() if window is None else (("window", window),)):
            check_count(name, value)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0 (positions every window also sees), got {sinks!r}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not 1 < rope_base < math.inf:
            raise ValueError(f"rope_base must be a finite number > 1 (RoPE's frequency base), got {rope_base!r}")
        if sinks and window is None:
            raise ValueError("sinks only matter with a sliding window (full attention sees everything)")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.sinks, self.rope_base = window, sinks, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch: int) -> KVCache:
        empty = self.out.weight.new_zeros(batch, self.heads, 0, self.head_dim)
        return KVCache(empty, empty, torch.zeros(0, dtype=torch.long, device=empty.device), 0)

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        if state is not None and not isinstance(state, KVCache):
            raise TypeError(f"state must be a KVCache (from init_state or a previous call), got {type(state).__name__}")
        check_input(x, self.dim, self.qkv.weight.dtype, None if state is None else state.batch)
        batch, tokens, _ = x.shape
        if state is None:
            state = self.init_state(batch)
        else:
            self._check_cache(state, x)
        positions = torch.arange(state.seen, state.seen + tokens, device=x.device)
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        keys = torch.cat([state.keys.to(k.dtype), k], dim=2)
        values = torch.cat([state.values.to(v.dtype), v], dim=2)
        key_positions = torch.cat([state.positions, positions])
        if self.window is None and keys.shape[2] == tokens:  # nothing cached
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        elif self.window is None and _can_continue(q, keys, values):
            y = _continued(q, keys, values)
        elif self.window is not None and tokens > 2 * self.window and state.seen + tokens > self.sinks:
            # (banded needs a key past the sinks; a call of sink positions alone is at most `sinks` long)
            y = self._banded(q, keys, values, positions, key_positions)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=self._visible(positions, key_positions))
        y = self.out(y.transpose(1, 2).reshape(batch, tokens, self.dim))
        if self.window is None:  # full attention keeps every key: no second copy of the cache
            return y, KVCache(keys, values, key_positions, state.seen + tokens)
        keep = self._kept(key_positions, state.seen + tokens)
        return y, KVCache(keys[:, :, keep], values[:, :, keep], key_positions[keep], state.seen + tokens)

    def _check_cache(self, state: KVCache, x: Tensor) -> None:
        """A cache this layer made: its heads, head size and lengths agree, and its dtype is the model's (or a
        half precision one that autocast wrote, which widens exactly)."""
        want = (state.batch, self.heads, state.keys.shape[2], self.head_dim)
        if (state.keys.dim() != 4 or tuple(state.keys.shape) != want or state.values.shape != state.keys.shape
                or state.positions.shape != (state.keys.shape[2],) or not 0 <= state.keys.shape[2] <= state.seen):
            raise ValueError(f"the KV cache does not fit this attention layer ({self.heads} heads of {self.head_dim}): "
                             f"keys {tuple(state.keys.shape)}, values {tuple(state.values.shape)}, "
                             f"{state.positions.numel()} positions, seen {state.seen}; pass a state this model made")
        dtype = self.qkv.weight.dtype
        if (state.keys.dtype != dtype and state.keys.dtype not in (torch.bfloat16, torch.float16)
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"the state's tensors must have the model's dtype {dtype}, got {state.keys.dtype} "
                            f"(state.to({dtype}) converts it)")

    def _banded(self, q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, key_positions: Tensor) -> Tensor:
        """Sliding-window attention in blocks of ``window`` queries, each against the 2·window − 1 stream
        keys that can be in its band plus the sink keys: O(T·window) work and memory instead of a dense
        [T, T] mask. Same visibility rule as ``_visible``."""
        w, tokens = self.window, q.shape[2]
        is_sink = key_positions < self.sinks
        sink_keys, sink_values, sink_positions = keys[:, :, is_sink], values[:, :, is_sink], key_positions[is_sink]
        stream_keys, stream_values = keys[:, :, ~is_sink], values[:, :, ~is_sink]
        # The non-sink keys are consecutive positions first..last (the cache keeps the last w − 1 of them).
        first, start, last = int(key_positions[~is_sink][0]), int(positions[0]), int(positions[-1])
        blocks, span = -(-tokens // w), 2 * w - 1
        # Padded so that window j (for queries start + j·w + r, r < w) is rows j·w .. j·w + span − 1,
        # row i holding position start − w + 1 + i.
        front = first - (start - w + 1)
        back = (blocks + 1) * w - 1 - front - stream_keys.shape[2]

        def windows(x: Tensor) -> Tensor:  # [B, H, L, D] -> [B, H, blocks, span, D]
            return F.pad(x, (0, 0, front, back)).unfold(2, span, w).transpose(-1, -2)

        slot = start - w + 1 + w * torch.arange(blocks, device=q.device)[:, None] + torch.arange(span, device=q.device)
        query = start + w * torch.arange(blocks, device=q.device)[:, None] + torch.arange(w, device=q.device)
        delta = query[:, :, None] - slot[:, None, :]  # [blocks, w, span]
        visible = (delta >= 0) & (delta < w) & ((slot >= first) & (slot <= last))[:, None, :]
        if sink_positions.numel():
            visible = torch.cat([sink_positions <= query[:, :, None], visible], dim=-1)
            expand = (*q.shape[:2], blocks, *sink_keys.shape[2:])
            k = torch.cat([sink_keys[:, :, None].expand(expand), windows(stream_keys)], dim=3)
            v = torch.cat([sink_values[:, :, None].expand(expand), windows(stream_values)], dim=3)
        else:
            k, v = windows(stream_keys), windows(stream_values)
        padded = F.pad(q, (0, 0, 0, blocks * w - tokens)).unflatten(2, (blocks, w))
        y = F.scaled_dot_product_attention(padded, k, v, attn_mask=visible)
        return y.flatten(2, 3)[:, :, :tokens]

    def _visible(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """[Tq, Tk] bool: key j is visible to query i."""
        delta = query_positions[:, None] - key_positions[None, :]
        visible = delta >= 0
        if self.window is not None:
            visible &= (delta < self.window) | (key_positions[None, :] < self.sinks)
        return visible

    def _kept(self, key_positions: Tensor, seen: int) -> Tensor:
        """Which cached keys any future query (position >= seen) can still see (sliding window)."""
        return (key_positions > seen - self.window) | (key_positions < self.sinks)


# torch's CPU flash attention, which returns the log-sum-exp of each query's scores beside the output
# (private: None where this torch lacks it, and the masked call runs instead).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _can_continue(q: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether ``_continued`` computes this call: CPU, the flash kernel's dtypes, no autocast, and nothing
    that needs a gradient (the kernel's log-sum-exp has none)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad)
    return (_FLASH_CPU is not None and q.device.type == "cpu" and q.shape[2] > 0 and not needs_grad
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu"))


def _continued(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Full causal attention of the T new queries ``q`` over ``keys`` = [cache ‖ their own T keys]: every
    cached key is visible to every new query, the new keys causally. Each part is one flash call; the
    outputs are mixed by the share of the softmax mass on each, σ(lse_cache − lse_new)."""
    cached = keys.shape[2] - q.shape[2]
    old, lse_old = _FLASH_CPU(q, keys[:, :, :cached], values[:, :, :cached])
    new, lse_new = _FLASH_CPU(q, keys[:, :, cached:], values[:, :, cached:], is_causal=True)
    share = torch.sigmoid(lse_old - lse_new).unsqueeze(-1)  # float32 for bf16 inputs
    return torch.lerp(new.to(share.dtype), old.to(share.dtype), share).to(q.dtype)
