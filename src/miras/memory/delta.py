"""The exact online delta rule in blocks: DeltaNet, Gated DeltaNet and Longhorn at any block size.

``delta(rule, q, k, v, gates, state, block_size)`` equals ``recurrent(rule, ..., chunk_size=1)``,
the purely online rule, for a matrix memory with the L2 bias and GD (or implicit GD), whatever
``block_size`` is: the block size only trades sequential steps for matmul work. Every such rule is

    W_t = a_t W_{t−1} − b_t (W_{t−1} k_t) k_tᵀ + θ_t v_t k_tᵀ,

with a_t = 1 − α_t (1 without retention) and b_t = θ_t for the Titans order (Decay: the step at
W_{t−1}, then the decay) or b_t = a_t θ_t for the Gated DeltaNet order (PreDecay: the decay, then
the step at a_t W_{t−1}, so S_t = a_t S_{t−1} (I − θ_t k kᵀ) + θ_t v kᵀ). Longhorn's implicit GD is
θ_t → θ_t / (1 + θ_t ‖k_t‖²).

In a block starting from W⁰, with Γ_t = Π_{j≤t} a_j, the state is W_t = Γ_t W⁰ + Σ_{i≤t} (Γ_t/Γ_i) u_i k_iᵀ
(the WY/UT representation, Yang et al. 2024), where the pseudo-values u_t = θ_t v_t − b_t W_{t−1} k_t
solve one unit lower-triangular system per block:

    u_t + b_t Σ_{i<t} (Γ_{t−1}/Γ_i)(k_t·k_i) u_i = θ_t v_t − b_t Γ_{t−1} W⁰ k_t.

Outputs are then a masked attention, y_t = Γ_t W⁰ q_t + Σ_{i≤t} (Γ_t/Γ_i)(k_i·q_t) u_i, and the
block-end state is the last row. Every ratio Γ_t/Γ_i (t ≥ i) is exp of a masked non-positive
log-difference, so nothing overflows. The whole path runs in the input dtype (autocast off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .architectures import LinearMemory
from .objectives import GD, L2, Decay, ImplicitGD, NoRetention, PreDecay
from .recurrent import starting_state
from .rules import MemoryRule
from .state import Gates, MemoryState, check_inputs, check_rule


def supports_delta(rule: MemoryRule) -> bool:
    """Whether ``delta`` computes ``rule``: matrix memory, L2 bias, linear retention, (implicit) GD."""
    return (type(rule.architecture) is LinearMemory and type(rule.bias) is L2
            and type(rule.retention) in (NoRetention, Decay, PreDecay) and type(rule.algorithm) in (GD, ImplicitGD))


def delta(rule: MemoryRule, q: Tensor, k: Tensor, v: Tensor, gates: Gates, state: MemoryState | None = None,
          block_size: int = 64) -> tuple[Tensor, MemoryState]:
    """The online rule (``recurrent(..., chunk_size=1)``) computed blockwise. Returns y ``[B, T, H, Dv]``
    and the state after the last token."""
    check_rule(rule)
    if not supports_delta(rule):
        raise ValueError("delta computes LinearMemory + L2 + (NoRetention | Decay | PreDecay) + (GD | ImplicitGD) "
                         f"rules (DeltaNet, Gated DeltaNet, Longhorn); got {rule.name()}")
    if isinstance(state, MemoryState) and state.position:
        size = f"a chunk of {state.chunk_size}" if state.chunk_size else "a chunk"
        raise ValueError(f"delta continues states at a chunk boundary (from delta, or chunked/recurrent with "
                         f"chunk_size=1); this one was left {state.position} tokens into {size}: continue it with "
                         f"chunked or recurrent at that chunk_size")
    check_inputs(rule, q, k, v, gates, state, 1)
    if gates.channelwise:
        raise ValueError("delta takes token-level gates [B, T, H] only (the WY form needs a scalar decay per "
                         "token); for channel-wise gates use chunked or recurrent")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    batch, tokens, heads, _ = k.shape
    state = starting_state(rule, k, v, state)
    if tokens == 0:  # nothing to write or read (a stream may be cut anywhere): the state as it was
        return v.new_zeros(v.shape), state
    with torch.autocast(q.device.type, enabled=False):
        lr = rule.algorithm.effective_lr(gates.lr, k)
        log_keep = rule.retention.log_retain(gates)
        if log_keep is None:
            log_keep = torch.zeros_like(lr)
        correction = lr * torch.exp(log_keep) if rule.retention.decay_first else lr  # b_t
        size = min(block_size, tokens)
        blocks = -(-tokens // size)
        pad = blocks * size - tokens  # trailing tokens with θ = b = 0, a = 1 change nothing
        q, k, v = (_blocks(x, blocks, size, pad) for x in (q, k, v))
        lr, log_keep, correction = (_blocks(g.unsqueeze(-1), blocks, size, pad).squeeze(-1)
                                    for g in (lr, log_keep, correction))
        weight = state.weights[0]
        lower = torch.ones(size, size, dtype=torch.bool, device=k.device).tril()
        eye = torch.eye(size, dtype=k.dtype, device=k.device)
        outputs = []
        for q_n, k_n, v_n, lr_n, log_keep_n, b_n in zip(*(x.unbind(0) for x in (q, k, v, lr, log_keep, correction))):
            y_n, weight = _block(weight, q_n, k_n, v_n, lr_n, log_keep_n, b_n, lower, eye)
            outputs.append(y_n)
    y = torch.stack(outputs).permute(1, 0, 3, 2, 4).reshape(batch, blocks * size, heads, -1)
    return y[:, :tokens], MemoryState((weight,))


def _block(weight, q, k, v, lr, log_keep, b, lower, eye):
    """One block from W⁰ = ``weight`` [B, H, Dv, Dk]; inputs [B, H, C, D], gates [B, H, C]."""
    log_gamma = log_keep.cumsum(-1)                      # log Γ_t
    log_gamma_prev = log_gamma - log_keep                # log Γ_{t−1}
    strict = _ratio(log_gamma_prev, log_gamma, lower & ~eye.bool())  # Γ_{t−1}/Γ_i, i < t
    system = eye + b.unsqueeze(-1) * strict * torch.matmul(k, k.transpose(-1, -2))
    start_k = torch.matmul(k, weight.transpose(-1, -2))  # W⁰ k_t
    rhs = lr.unsqueeze(-1) * v - (b * torch.exp(log_gamma_prev)).unsqueeze(-1) * start_k
    if system.dtype.itemsize < 4:  # no half-precision triangular solve (CPU, CUDA): solve in float32
        u = torch.linalg.solve_triangular(system.float(), rhs.float(), upper=False, unitriangular=True).to(rhs.dtype)
    else:
        u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    decay = _ratio(log_gamma, log_gamma, lower)          # Γ_t/Γ_i, i ≤ t
    gamma = torch.exp(log_gamma).unsqueeze(-1)
    scores = decay * torch.matmul(q, k.transpose(-1, -2))
    y = gamma * torch.matmul(q, weight.transpose(-1, -2)) + torch.matmul(scores, u)
    last = decay[:, :, -1].unsqueeze(-1)                 # Γ_C/Γ_i
    weight = gamma[:, :, -1:] * weight + torch.matmul((last * u).transpose(-1, -2), k)
    return y, weight


def _ratio(log_rows: Tensor, log_cols: Tensor, mask: Tensor) -> Tensor:
    """exp(log_rows[t] − log_cols[i]) where mask[t, i], else 0 (masked before exp: nothing overflows)."""
    diff = log_rows.unsqueeze(-1) - log_cols.unsqueeze(-2)
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def _blocks(x: Tensor, blocks: int, size: int, pad: int) -> Tensor:
    """[B, T, H, D] -> [N, B, H, C, D], zero-padded at the end."""
    batch, _, heads, dim = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(batch, blocks, size, heads, dim).permute(1, 0, 3, 2, 4)
