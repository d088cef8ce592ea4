"""The reference: the memory update written token by token, exactly as memory/README.md ("The pinned update") pins it.

For a chunk that starts with weights W⁰ (and momentum S⁰), each token t of the chunk, in order:

    g_t = ∇_W ℓ(M(W⁰; k_t), v_t)      # autograd, at the chunk-start weights
    S_t = η_t S_{t−1} − θ_t g_t        # Momentum; GD: S_t = −θ_t g_t
    W_t = (1 − α_t) W_{t−1} + S_t      # Decay;    NoRetention: α ≡ 0
    y_t = M(W_t; q_t)                  # read after write

and the variations some axis values make (``memory/README.md``): a decay-first retention takes
g_t at β_t W⁰ (β_t = Π(1 − α) since the chunk start, Gated DeltaNet's order); a projecting
retention (LqNormalize, KLSoftmax, ElasticNet) projects W at the end of every complete chunk,
before the chunk's last token reads it; implicit GD rescales θ_t. This is the specification the
fast path is tested against: short, slow and obvious. It uses autograd for g_t (with
``create_graph`` so that outer gradients flow through the inner ones).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .architectures import matmul_linear, random_weights, shared_matmul
from .rules import MemoryRule
from .state import (
    Gates,
    MemoryState,
    channel_widths,
    check_count,
    check_inputs,
    check_rule,
    check_weights,
    map_tensors,
    needs_retained,
    per_layer,
)


def initial_state(rule: MemoryRule, batch: int, heads: int, dk: int, dv: int, *, dtype: torch.dtype,
                  device=None) -> MemoryState:
    """The rule's default state (zero linear memory / the architecture's default MLP init, which a linear
    memory also takes where its retention's ``nonzero_start`` says; zero momentum), broadcast to
    ``[B, H, out, in]``."""
    check_rule(rule)
    for name, value in (("batch", batch), ("heads", heads), ("dk", dk), ("dv", dv)):
        check_count(name, value)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    rule.architecture.check_dims(dk, dv)
    if rule.architecture.kind == "linear" and rule.retention.nonzero_start:  # zero is singular for it
        start = random_weights(rule.architecture.weight_shapes(dk, dv), dtype=dtype, device=device)
    else:
        start = rule.architecture.default_weights(dk, dv, dtype=dtype, device=device)
    weights = tuple(w.expand(batch, heads, *w.shape).clone() for w in start)
    if hasattr(rule.retention, "initial"):  # a constrained memory (KLSoftmax: on the simplex)
        weights = rule.retention.initial(weights)
    momentum = tuple(torch.zeros_like(w) for w in weights) if rule.algorithm.uses_momentum else None
    return MemoryState(weights, momentum)


def starting_state(rule: MemoryRule, k: Tensor, v: Tensor, state: MemoryState | None) -> MemoryState:
    """The state a call on keys ``k`` and values ``v`` starts from: ``state``, or else the rule's
    ``initial_state`` for their batch, heads and dims (every path's default)."""
    if state is not None:
        return state
    batch, _, heads, dk = k.shape
    return initial_state(rule, batch, heads, dk, v.shape[-1], dtype=k.dtype, device=k.device)


def read(rule: MemoryRule, state: MemoryState, q: Tensor) -> Tensor:
    """Retrieval without a write (Titans Eq. 15): y = M*(q). q ``[B, T, H, Dk]`` -> ``[B, T, H, Dv]``."""
    check_rule(rule)
    if not isinstance(q, Tensor) or q.dim() != 4 or not q.is_floating_point():
        got = f"{tuple(q.shape)} {q.dtype}" if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q must be a floating-point 4-d tensor [B, T, H, D], got {got}")
    if not isinstance(state, MemoryState) or not state.weights:
        raise TypeError(f"state must be a miras.memory.MemoryState, got {type(state).__name__}")
    batch, _, heads, dk = q.shape
    dv = state.weights[-1].shape[-2] if rule.architecture.kind == "linear" else dk  # only the weights are read
    check_weights(rule, state.weights, batch, heads, dk, dv)
    if any(w.dtype != q.dtype for w in state.weights):
        raise TypeError(f"the state's weights must have q's dtype {q.dtype}, got {state.weights[0].dtype}")
    # what the chunk's own reads use: at a chunk boundary the state's memory (LqNormalize(carry="A") keeps a
    # state that is not it), mid-chunk the linear state (for carry="A" scaled by the chunk-start norm)
    if state.position:
        weights = _scaled_weights(state.weights, rule.retention.read_scales(state.chunk_start))
    else:
        weights = rule.retention.read_point(state.weights)
    with rule.reading(q.device.type):
        y = rule.architecture.apply(q.transpose(1, 2),
                                    lambda layer, u: shared_matmul(u, weights[layer], transpose=True))
    return y.transpose(1, 2)


def recurrent(rule: MemoryRule, q: Tensor, k: Tensor, v: Tensor, gates: Gates,
              state: MemoryState | None = None, chunk_size: int = 16) -> tuple[Tensor, MemoryState]:
    """Reference path: one token at a time. Returns y ``[B, T, H, Dv]`` and the final state."""
    check_inputs(rule, q, k, v, gates, state, chunk_size)
    if torch.is_inference_mode_enabled():  # the inner gradient needs autograd: run on ordinary tensors
        with torch.inference_mode(False), torch.no_grad():
            # clones made outside inference mode: ordinary tensors that autograd can use
            return recurrent(rule, *map_tensors((q, k, v, gates, state), Tensor.clone), chunk_size)
    batch, tokens, heads, dk = k.shape
    state = starting_state(rule, k, v, state)
    if tokens == 0:  # nothing to write or read (a stream may be cut anywhere): the state as it was
        return v.new_zeros(v.shape), state
    arch, momentum, retention = rule.architecture, rule.algorithm.uses_momentum, rule.retention
    log_retain = retention.log_retain(gates)
    keep_all = None if log_retain is None else torch.exp(log_retain)
    lr_all = rule.algorithm.effective_lr(gates.lr, k)
    # η through the same clamp as the chunked path's log-space algebra (η = 0 is taken one eps above)
    eta_all = torch.exp(rule.algorithm.log_momentum(gates)) if rule.algorithm.uses_momentum else None
    # Each gate at token t as one factor per weight matrix ([B, H, 1, 1], or [B, H, 1, in] channel-wise).
    widths = channel_widths(rule, dk, v.shape[-1])

    def factors(gate: Tensor, t: int) -> list[Tensor]:
        return per_layer(gate[:, t], widths, gate.dim() == 4)

    weights, surprise = list(state.weights), list(state.momentum) if momentum else None
    offset = state.position
    outer_grad = torch.is_grad_enabled()

    def begin(anchor: list[Tensor]):
        """A chunk's gradient point (differentiable: the inner gradients are taken w.r.t. it) and its reads'
        scales, from its start ``anchor``: the state itself and None but for LqNormalize(carry="A")."""
        start = _differentiable(anchor, outer_grad)
        with torch.enable_grad(), torch.autocast(k.device.type, enabled=False):
            return retention.gradient_point(tuple(start)), retention.read_scales(tuple(anchor))

    anchor = list(state.chunk_start) if offset else None
    point, scales = begin(anchor) if offset else (None, None)
    # Π(1 − α) since the chunk start (decay-first gradients and the KL projection need it; those
    # rules take token-level gates only).
    retained = state.retained if state.retained is not None else k.new_ones(batch, heads)
    outputs = []
    for t in range(tokens):
        if (offset + t) % chunk_size == 0:
            anchor = list(weights)
            point, scales = begin(anchor)
            retained = k.new_ones(batch, heads)
        if keep_all is not None and keep_all.dim() == 3:  # token-level; channel-wise rules never need it
            retained = retained * keep_all[:, t]
        # the write path in the inputs' precision, as chunked runs it: under autocast only the reads are bf16
        with torch.enable_grad(), torch.autocast(k.device.type, enabled=False):
            at = [retained[..., None, None] * w for w in point] if retention.decay_first else point
            pred = arch.apply(k[:, t].unsqueeze(2), matmul_linear(at))
            extra = {name: getattr(gates, name)[:, t, :, None, None] for name in rule.bias.gates}
            loss = rule.bias.loss(pred, v[:, t].unsqueeze(2), **extra).sum()
            grads = torch.autograd.grad(loss, at, create_graph=outer_grad)
        lrs = factors(lr_all, t)
        etas = factors(eta_all, t) if momentum else None
        keeps = None if keep_all is None else factors(keep_all, t)
        for i, g in enumerate(grads):
            step = -lrs[i] * g
            if momentum:
                surprise[i] = etas[i] * surprise[i] + step
                step = surprise[i]
            weights[i] = (weights[i] if keeps is None else keeps[i] * weights[i]) + step
        read_weights = _scaled_weights(weights, scales)
        if retention.projects and (offset + t + 1) % chunk_size == 0:
            with torch.autocast(k.device.type, enabled=False):
                weights = list(retention.chunk_end(tuple(weights), tuple(anchor), retained))
                read_weights = retention.read_point(tuple(weights))
        with rule.reading(q.device.type):
            outputs.append(arch.apply(q[:, t].unsqueeze(2), matmul_linear(read_weights)).squeeze(2).to(q.dtype))
    position = (offset + tokens) % chunk_size
    final = MemoryState(tuple(weights), tuple(surprise) if momentum else None,
                        tuple(anchor) if position else None, position,
                        retained if position and needs_retained(rule) else None, chunk_size if position else 0)
    return torch.stack(outputs, dim=1), final


def _differentiable(weights: list[Tensor], outer_grad: bool) -> list[Tensor]:
    """The chunk-start weights as tensors autograd can differentiate the inner loss against. Under
    no_grad a view of a parameter still says requires_grad but belongs to no graph: detach it.

    With outer gradients each is a view, a node of its own: the inner gradient is ∂ℓ/∂W along the
    prediction alone. Taken against W itself it would also follow every other use of W that reaches
    k and v (MAC's retrieval reads the same weights, then attention makes the written k, v from it)."""
    return [w.view_as(w) if outer_grad and w.requires_grad else w.detach().requires_grad_(True) for w in weights]


def _scaled_weights(weights, scales: tuple[Tensor, ...] | None):
    """Each weight matrix times its factor of the retention's ``read_scales`` (None: the weights as they are)."""
    return weights if scales is None else [w * c for w, c in zip(weights, scales)]
