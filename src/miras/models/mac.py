"""Titans MAC, memory as context (Titans §4.1, Eq. 21–25).

Per segment S of ``segment`` tokens (counted from the stream start):
1. h = M*_{before}(q(S)): every token of the segment retrieves from the memory as it was before the
   segment (no write); q is a retrieval projection of the segment input, L2-normalised per head.
2. Attention over [P ‖ h ‖ S]: token i of S sees all N_p persistent tokens P, h_1..h_i and
   S_1..S_i (h_j comes from x_j's query, so seeing j > i would leak the future).
3. y = the attention output at S. The memory writes y and reads it back (read after write):
   r = M(y). The output is o = y ⊙ σ(norm(r)).

Positions for RoPE follow the layout [P | h | S]: P at 0..N_p−1, h_j at N_p + j, S_j at
N_p + segment + j, so distances do not depend on how much of the segment a call holds. Streaming
is exact: the state carries the memory, its snapshot from the segment start, and the segment's
keys and values so far. Memory used: the segment's KV (bounded by the segment), never the context.

Choices where the papers are silent or differ:
- One retrieved token per segment token (N_l = segment, as Eq. 21 reads), so a segment attends over
  N_p + 2·segment positions (1,152 at the paper sizes). The NeurIPS version's App. E gives 256 memory
  tokens per 512-token segment without saying how 512 reads become 256; the causal mask above needs
  one h_j per token.
- The retrieval query is q = L2norm(W_Q x) per head, Eq. 21's projection alone: no causal conv and no
  SiLU, which the memory layer puts on its own keys and queries. h is projected back to the model
  width (``retrieve_out``) before the attention's k, v projection.
- P and h enter the attention as they are: the block's RMSNorm normalises the segment input, not them
  (MAG and MAL prepend P before that norm). P starts at 0.02·N(0, 1), small next to the normalised
  segment tokens; it is learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers import MemoryLayer, MemoryLayerState, piece_sizes, rotary
from ..layers.base import check_input, rms_norm
from ..memory import MemoryState, read


@dataclass(frozen=True)
class MACState:
    """memory: the memory layer's state now; before: its weights at the segment start; keys/values:
    [B, H, 2·n, D] for h_1..h_n and S_1..S_n of the current segment (h first), n = ``filled``."""

    memory: MemoryLayerState
    before: MemoryState
    keys: Tensor
    values: Tensor
    filled: int

    @property
    def batch(self) -> int:
        return self.memory.batch

    def detach(self) -> MACState:
        return MACState(self.memory.detach(), self.before.detach(), self.keys.detach(), self.values.detach(),
                        self.filled)

    def nbytes(self) -> int:
        return (self.memory.nbytes() + self.before.nbytes()
                + sum(t.numel() * t.element_size() for t in (self.keys, self.values)))


class MemoryAsContext(nn.Module):
    def __init__(self, memory: MemoryLayer, dim: int, heads: int, segment: int, persistent: int, *,
                 recompute: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.memory, self.dim, self.heads, self.head_dim = memory, dim, heads, dim // heads
        self.segment, self.n_persistent = segment, persistent
        # recompute=G (chunks, as for MemoryLayer): backward keeps the state between groups of segments
        # spanning about G memory chunks and recomputes the rest. The memory is called once per segment,
        # so the grouping happens here, not in the memory layer.
        self.recompute = recompute
        inner = memory.heads * memory.head_dim
        self.retrieve_q = nn.Linear(dim, inner, bias=False)
        self.retrieve_out = nn.Linear(inner, dim, bias=False)
        self.persistent = nn.Parameter(0.02 * torch.randn(persistent, dim)) if persistent else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate_norm = nn.RMSNorm(dim, eps=1e-6)

    def init_state(self, batch: int) -> MACState:
        memory = self.memory.init_state(batch)
        empty = self.out.weight.new_zeros(batch, self.heads, 0, self.head_dim)
        return MACState(memory, _weights_only(memory.memory), empty, empty, 0)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        if state is not None and not isinstance(state, MACState):
            raise TypeError("state must be a MACState (from init_state or a previous call), "
                            f"got {type(state).__name__}")
        check_input(x, self.dim, self.qkv.weight.dtype, None if state is None else state.batch)
        state = state or self.init_state(x.shape[0])
        cached = (state.batch, self.heads, 2 * state.filled, self.head_dim)
        if (not isinstance(state.filled, int) or not 0 <= state.filled < self.segment
                or tuple(state.keys.shape) != cached or state.values.shape != state.keys.shape):
            raise ValueError(f"the MAC state does not fit this layer (segment {self.segment}, {self.heads} heads of "
                             f"{self.head_dim}): filled {state.filled!r}, keys {tuple(state.keys.shape)}, values "
                             f"{tuple(state.values.shape)}; pass a state this model made")
        if x.shape[1] == 0:  # nothing to read or write
            return x.new_zeros(x.shape[0], 0, self.dim), state
        sizes = piece_sizes(x.shape[1], self.segment, state.filled)  # the rest of this segment, then whole ones

        def run(x: Tensor, sizes: list[int], state: MACState):
            # What depends on x alone is computed once for these pieces, then split. (Split, not sliced
            # per piece: each slice's backward would allocate and fill a zero gradient the size of the
            # whole input, quadratic in the number of segments; split's backward is one cat.)
            inputs = self._inputs(x, state.filled)
            outputs = []
            for piece, piece_inputs in zip(x.split(sizes, dim=1), inputs.split(sizes)):
                y, state = self._piece(piece, piece_inputs, state)
                outputs.append(y)
            return outputs, state

        group = max(1, self.recompute * self.memory.chunk_size // self.segment) if self.recompute else len(sizes)
        groups = [sizes[first:first + group] for first in range(0, len(sizes), group)]
        outputs = []
        for part, part_sizes in zip(x.split([sum(g) for g in groups], dim=1), groups):
            if torch.is_grad_enabled() and len(groups) > 1:
                ys, state = checkpoint(run, part, part_sizes, state, use_reentrant=False)
            else:
                ys, state = run(part, part_sizes, state)
            outputs += ys
        return torch.cat(outputs, 1), state

    def _retrieval_query(self, x: Tensor) -> Tensor:
        """q(x): the retrieval projection, L2-normalised per head. [B, T, H_mem, D_mem]."""
        batch, tokens, _ = x.shape
        return F.normalize(self.retrieve_q(x).view(batch, tokens, self.memory.heads, self.memory.head_dim), dim=-1)

    def _retrieve(self, q: Tensor, before: MemoryState, dtype: torch.dtype) -> Tensor:
        """h = M*_{before}(q), projected back to the model width. [B, T, dim]."""
        batch, tokens = q.shape[:2]
        h = read(self.memory.rule, before.to(q.dtype), q)
        return self.retrieve_out(h.reshape(batch, tokens, -1).to(dtype))

    def _inputs(self, x: Tensor, filled: int) -> _Inputs:
        """The retrieval queries and the segment tokens' q, k, v (rotated) of consecutive pieces that
        start ``filled`` tokens into a segment, and the persistent tokens' k, v."""
        batch, tokens, _ = x.shape
        index = (filled + torch.arange(tokens, device=x.device)) % self.segment
        q_s, k_s, v_s = self._project(x, self.n_persistent + self.segment + index)
        if self.persistent is None:
            k_p = v_p = None
        else:
            k_p, v_p = self._project_kv(self.persistent.to(x.dtype).expand(batch, -1, -1),
                                        torch.arange(self.n_persistent, device=x.device))
        return _Inputs(self._retrieval_query(x), q_s, k_s, v_s, k_p, v_p)

    def _piece(self, x: Tensor, inputs: _Inputs, state: MACState) -> tuple[Tensor, MACState]:
        """Tokens filled..filled+T of one segment (``inputs``: ``_inputs`` of these tokens, split off)."""
        batch, tokens, _ = x.shape
        h = self._retrieve(inputs.retrieval, state.before, x.dtype)
        index = torch.arange(state.filled, state.filled + tokens, device=x.device)
        q_s, k_s, v_s = inputs.q, inputs.k, inputs.v
        k_h, v_h = self._project_kv(h, self.n_persistent + index)
        done = state.filled
        # This segment's keys so far, h first then S: [h_1..h_n, S_1..S_n].
        # (the cache in the keys' dtype: under autocast the initial empty one is float32)
        cached_k, cached_v = state.keys.to(k_s.dtype), state.values.to(v_s.dtype)
        segment_keys = torch.cat([cached_k[:, :, :done], k_h, cached_k[:, :, done:], k_s], dim=2)
        segment_values = torch.cat([cached_v[:, :, :done], v_h, cached_v[:, :, done:], v_s], dim=2)
        keys, values = segment_keys, segment_values
        # Visibility: query i (segment index) sees h_j and S_j for j <= i; P always.
        seen = torch.arange(done + tokens, device=x.device)
        causal = seen[None, :] <= index[:, None]
        mask = torch.cat([causal, causal], dim=1)
        if self.persistent is not None:
            keys, values = torch.cat([inputs.k_p, keys], dim=2), torch.cat([inputs.v_p, values], dim=2)
            mask = torch.cat([mask.new_ones(tokens, self.n_persistent), mask], dim=1)
        y = F.scaled_dot_product_attention(q_s, keys, values, attn_mask=mask)
        y = self.out(y.transpose(1, 2).reshape(batch, tokens, self.dim))
        r, memory = self.memory(y, state.memory)
        out = y * torch.sigmoid(rms_norm(self.gate_norm, r))
        filled = done + tokens
        if filled == self.segment:  # the segment is complete: the next one retrieves from here
            # a new empty tensor, not a view: a view would keep the whole segment's storage in the state
            empty = segment_keys.new_zeros(*segment_keys.shape[:2], 0, segment_keys.shape[3])
            return out, MACState(memory, _weights_only(memory.memory), empty, empty, 0)
        return out, MACState(memory, state.before, segment_keys, segment_values, filled)

    def _project(self, x: Tensor, positions: Tensor):
        q, k, v = self._heads(x)
        return rotary(q, positions), rotary(k, positions), v

    def _project_kv(self, x: Tensor, positions: Tensor):
        """``_project``'s k and v (the h and persistent tokens are never queries). q is computed and
        dropped: a matmul with the weight's k/v rows alone took 2.4x the peak memory (titans-mac-small,
        16K, ``recompute=64``: 4,018 against 1,679 MB)."""
        _, k, v = self._heads(x)
        return rotary(k, positions), v

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The qkv projection split into q, k, v [B, H, T, D], not yet rotated."""
        batch, tokens, _ = x.shape
        return self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


@dataclass(frozen=True)
class _Inputs:
    """``MemoryAsContext._inputs``: retrieval queries [B, T, H_mem, D_mem]; the tokens' q, k, v
    [B, H, T, D]; the persistent tokens' k, v [B, H, N_p, D] (None without persistent tokens)."""

    retrieval: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    k_p: Tensor | None
    v_p: Tensor | None

    def split(self, sizes: list[int]) -> list[_Inputs]:
        """One _Inputs per consecutive piece of ``sizes`` tokens (views; the persistent k, v shared)."""
        return [_Inputs(r, q, k, v, self.k_p, self.v_p) for r, q, k, v in zip(
            self.retrieval.split(sizes, dim=1), *(t.split(sizes, dim=2) for t in (self.q, self.k, self.v)))]


def _weights_only(state: MemoryState) -> MemoryState:
    """The part of a memory state a read needs: the current weights."""
    return MemoryState(state.weights)
