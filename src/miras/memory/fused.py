"""The chunk loop with a hand-written backward pass, for the deep-memory rules (Titans, TTT-MLP).

``chunked`` differentiates its chunk loop with autograd by default: every elementwise op of every
chunk is recorded, kept and replayed in backward. For the rules below this module replaces that
with one ``torch.autograd.Function`` over the whole loop:

- forward runs the same ``_chunk_step`` as ``chunked`` with autograd off, and keeps only the
  memory state at the start of every ``stride``-th chunk (``stride = recompute``, or 1);
- backward walks the chunks in reverse. It recomputes a group's states from the kept one, then
  for each chunk recomputes the inner forward (gradient signals and dual-form read) and applies
  the closed-form vector-Jacobian product written out in ``_chunk_backward``.

Same values and gradients as autograd (tests hold them equal in float64), about half the ops,
and no per-chunk activations kept between forward and backward: training memory is the kept
states plus one chunk's work. First derivatives only: the backward is not itself differentiable,
and a second backward through it (a gradient penalty, a Hessian-vector product) is an error; take
those with ``fused=False``.

Covered (``supports``): ``MLPMemory`` of any depth with GELU, SiLU or ReLU; the ``L2`` bias;
no retention or ``Decay``; ``GD`` or ``Momentum``; token-level gates; a call that starts at a chunk
boundary; no autocast. Anything else takes the autograd path, which is always correct.

Notation (one chunk, one batch row and head): layer l has weights W_l ``[out, in]`` and momentum
S_l; at the chunk-start weights the inner forward is z_l = a_l W_lᵀ, a_{l+1} = σ(z_l), a_0 = k,
prediction k + LN(z_{L−1}), error e = prediction − v; the backward signals are
δ_{L−1} = LN'(z_{L−1})ᵀ e and δ_l = σ'(z_l) ⊙ (δ_{l+1} W_{l+1}). The read of query q is
y_l = β ⊙ (u_l W_lᵀ) + c ⊙ (u_l S_lᵀ) + (A ⊙ u_l a_lᵀ) δ_l, u_0 = q, u_{l+1} = σ(y_l), output
q + LN(y_{L−1}); the state after row r is W_l' = β_r W_l + c_r S_l + (A_r ⊙ δ_l)ᵀ a_l and
S_l' = E_r S_l − (P_r ⊙ δ_l)ᵀ a_l (``chunked``'s module docstring derives these).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .architectures import ACTIVATIONS, LN_EPS, MLPMemory
from .objectives import GD, L2, Decay, Momentum, NoRetention

SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def supports(rule, *, channelwise: bool, offset: int, device_type: str) -> bool:
    """Whether ``fused_chunks`` covers this call (else ``chunked`` differentiates with autograd)."""
    return (isinstance(rule.architecture, MLPMemory) and type(rule.bias) is L2
            and type(rule.retention) in (NoRetention, Decay) and type(rule.algorithm) in (GD, Momentum)
            and not channelwise and offset == 0 and not torch.is_autocast_enabled(device_type))


def fused_chunks(rule, q: Tensor, k: Tensor, v: Tensor, first_scores: Tensor, coef, weights, surprise,
                 last: int, stride: int, compile: bool = False, *, keep_anchor: bool = False):
    """The chunk loop of ``chunked`` for ``supports``-ed rules. Inputs are in chunks, ``[N, B, H, C, ·]``.

    Returns (y ``[N, B, H, C, Dv]``, final weights, final momentum or None, the last chunk's start
    weights if ``keep_anchor`` (a state that ends mid-chunk carries them) else None).
    """
    momentum = surprise is not None
    layers = len(weights)
    coefs = (coef.mix, coef.beta, coef.carry, coef.surprise_mix, coef.surprise_keep) if momentum else \
        (coef.mix, coef.beta)
    outputs = _ChunkLoop.apply(rule, last, stride, layers, momentum, compile, keep_anchor, q, k, v, first_scores,
                               *coefs, *weights, *(surprise or ()))
    y, rest = outputs[0], outputs[1:]
    final_w, rest = rest[:layers], rest[layers:]
    final_s, rest = (rest[:layers], rest[layers:]) if momentum else (None, rest)
    return y, tuple(final_w), (tuple(final_s) if momentum else None), (tuple(rest) if keep_anchor else None)


def _per_chunk(coefs):
    """One _Coefficients per chunk from the stacked (A, β) or (A, β, c, P, E) the Function saves."""
    from .chunked import _Coefficients  # chunked imports this module

    return _Coefficients(*coefs, *([None] * (5 - len(coefs)))).unbind()


class _ChunkLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule, last, stride, layers, momentum, compile, keep_anchor, q, k, v, first, *rest):
        # chunked imports this module: its chunk step and state update are imported on use.
        from .chunked import chunk_step

        ncoef = 5 if momentum else 2
        coefs, rest = rest[:ncoef], rest[ncoef:]
        weights = tuple(rest[:layers])
        surprise = tuple(rest[layers:]) if momentum else None
        chunks, size = q.shape[0], q.shape[3]
        per_chunk = _per_chunk(coefs)
        kept, ys, anchor = [], [], weights
        for n in range(chunks):
            if n % stride == 0:
                kept.append((weights, surprise))
            anchor = weights
            row = last if n == chunks - 1 else size - 1
            y, weights, surprise = chunk_step(compile, row, size, weights)(
                rule, weights, surprise, weights, q[n], k[n], v[n], first[n], per_chunk[n], row, None, {})
            ys.append(y)
        ctx.rule, ctx.last, ctx.stride, ctx.layers, ctx.momentum = rule, last, stride, layers, momentum
        ctx.compile = compile
        ctx.groups = len(kept)
        flat = [t for w, s in kept for t in (*w, *(s or ()))]
        ctx.save_for_backward(q, k, v, first, *coefs, *flat)
        # A clone: with one chunk the anchor is an input, which a Function must not return as is.
        anchor = tuple(w.clone() for w in anchor) if keep_anchor else ()
        return (torch.stack(ys), *weights, *(surprise or ()), *anchor)

    @staticmethod
    @torch.autograd.function.once_differentiable  # its states were computed with autograd off
    def backward(ctx, grad_y, *grads):
        from .chunked import _chunk_end_state, compiles

        rule, last, stride, layers, momentum = ctx.rule, ctx.last, ctx.stride, ctx.layers, ctx.momentum
        ncoef = 5 if momentum else 2
        saved = ctx.saved_tensors
        q, k, v, first = saved[:4]
        coefs, flat = saved[4:4 + ncoef], saved[4 + ncoef:]
        per_state = layers * (2 if momentum else 1)
        kept = [flat[i * per_state:(i + 1) * per_state] for i in range(ctx.groups)]
        g_w = [_zero_if_none(g, w) for g, w in zip(grads[:layers], kept[0][:layers])]
        g_s = [_zero_if_none(g, w) for g, w in zip(grads[layers:2 * layers], kept[0][:layers])] if momentum else None
        g_anchor = grads[2 * layers:] if momentum else grads[layers:]  # empty without keep_anchor
        chunks, size = q.shape[0], q.shape[3]
        per_chunk = _per_chunk(coefs)
        grad_y = torch.zeros_like(q) if grad_y is None else grad_y
        g_q, g_k, g_v, g_first = (torch.empty_like(t) for t in (q, k, v, first))
        g_coefs = [torch.zeros_like(c) for c in coefs]

        for group in reversed(range(ctx.groups)):
            start = group * stride
            stop = min(chunks, start + stride)
            state = kept[group]
            states = [(tuple(state[:layers]), tuple(state[layers:]) if momentum else None)]
            for n in range(start, stop - 1):  # recompute the group's chunk-start states
                weights, surprise = states[-1]
                _, deltas, acts = rule.architecture.signals(weights, k[n],
                                                            lambda pred, n=n: rule.bias.output_grad(pred, v[n]))
                states.append(_chunk_end_state(weights, surprise, deltas, acts, per_chunk[n], size - 1))
            for n in reversed(range(start, stop)):
                weights, surprise = states[n - start]
                row = last if n == chunks - 1 else size - 1
                # compiled where the forward was (full chunks from weights of their own)
                chunk_backward = _compiled_backward() if compiles(ctx.compile, row, size, weights) else _chunk_backward
                out = chunk_backward(rule.architecture.activation, weights, surprise, q[n], k[n], v[n], first[n],
                                     per_chunk[n], row, grad_y[n], g_w, g_s)
                g_q[n], g_k[n], g_v[n], g_first[n], coef_grads, g_w, g_s = out
                if n == chunks - 1 and g_anchor:  # the returned last-chunk anchor is these start weights
                    g_w = [g if a is None else g + a for g, a in zip(g_w, g_anchor)]
                for total, part in zip(g_coefs, coef_grads):
                    total[n] = part
        return (None, None, None, None, None, None, None, g_q, g_k, g_v, g_first, *g_coefs, *g_w, *(g_s or ()))


_COMPILED: dict[str, object] = {}


def _compiled_backward():
    """``_chunk_backward`` under torch.compile, made on first use (static shapes, as ``_compiled_step``)."""
    if "backward" not in _COMPILED:
        _COMPILED["backward"] = torch.compile(_chunk_backward, dynamic=False)
    return _COMPILED["backward"]


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _activation(name: str):
    """σ (the architectures' ``ACTIVATIONS``), σ' and σ'' of an activation, as functions of the pre-activation."""
    act = ACTIVATIONS[name][0]
    if name == "gelu":
        def d1(z):
            return 0.5 * (1.0 + torch.erf(z * SQRT_HALF)) + z * INV_SQRT_2PI * torch.exp(-0.5 * z * z)

        def d2(z):
            return INV_SQRT_2PI * torch.exp(-0.5 * z * z) * (2.0 - z * z)

        return act, d1, d2
    if name == "silu":
        def d1(z):
            s = torch.sigmoid(z)
            return s * (1.0 + z * (1.0 - s))

        def d2(z):
            s = torch.sigmoid(z)
            return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))

        return act, d1, d2
    if name == "relu":
        return act, lambda z: (z > 0).to(z.dtype), torch.zeros_like
    raise ValueError(f"no fused backward for activation {name!r}")


def _norm(z: Tensor) -> tuple[Tensor, Tensor]:
    """Layer norm without affine (eps LN_EPS, the aten op MLPMemory uses): (normalised z, 1/std)."""
    normed, _, rstd = torch.ops.aten.native_layer_norm(z, z.shape[-1:], None, None, LN_EPS)
    return normed, rstd


def _norm_vjp(grad: Tensor, normed: Tensor, rstd: Tensor) -> Tensor:
    """Vector-Jacobian product of the layer norm (its Jacobian is symmetric, so also the JVP)."""
    return rstd * (grad - grad.mean(-1, keepdim=True) - normed * (grad * normed).mean(-1, keepdim=True))


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _chunk_backward(activation: str, weights, surprise, q, k, v, first, coef, row: int, grad_y, grad_w, grad_s):
    """One chunk's vector-Jacobian product. ``grad_w``/``grad_s``: gradients of the state after the
    chunk. Returns the gradients of q, k, v, the first layer's scores, the coefficients (A, β[, c, P, E]),
    and of the state before the chunk."""
    act, d1, d2 = _activation(activation)
    layers = len(weights)
    momentum = surprise is not None
    mix, beta = coef.mix, coef.beta
    carry = coef.carry if momentum else None

    # Recompute the inner forward at the chunk-start weights and its backward signals.
    acts, pre = [k], []
    for layer in range(layers):
        z = torch.matmul(acts[-1], _t(weights[layer]))
        pre.append(z)
        if layer < layers - 1:
            acts.append(act(z))
    normed, rstd = _norm(pre[-1])
    error = k + normed - v
    deltas = [None] * layers
    deltas[-1] = _norm_vjp(error, normed, rstd)
    hidden_grads = [None] * layers  # δ_{l+1} W_{l+1}, the back-propagated signal before σ'
    for layer in range(layers - 1, 0, -1):
        hidden_grads[layer - 1] = torch.matmul(deltas[layer], weights[layer])
        deltas[layer - 1] = d1(pre[layer - 1]) * hidden_grads[layer - 1]

    # Recompute the dual-form read.
    inputs, reads, raw_scores, from_w, from_s = [q], [], [None], [], []
    for layer in range(layers):
        u = inputs[-1]
        zw = torch.matmul(u, _t(weights[layer]))
        zs = torch.matmul(u, _t(surprise[layer])) if momentum else None
        if layer == 0:
            scores = first
        else:
            raw = torch.matmul(u, _t(acts[layer]))
            raw_scores.append(raw)
            scores = mix * raw
        y = beta * zw + torch.matmul(scores, deltas[layer])
        if momentum:
            y = y + carry * zs
        from_w.append(zw)
        from_s.append(zs)
        reads.append(y)
        if layer < layers - 1:
            inputs.append(act(y))
    out_normed, out_rstd = _norm(reads[-1])

    # Backward through the read.
    g_q = grad_y.clone()
    g_y = _norm_vjp(grad_y, out_normed, out_rstd)
    g_mix = torch.zeros_like(mix)
    g_beta = torch.zeros_like(beta)
    g_carry = torch.zeros_like(beta) if momentum else None
    g_deltas = [None] * layers
    g_acts = [None] * layers
    g_w = [beta[..., row:row + 1, :] * g for g in grad_w]
    g_s = [None] * layers
    g_first = None
    for layer in range(layers - 1, -1, -1):
        u = inputs[layer]
        scaled = beta * g_y
        g_w[layer] = g_w[layer] + torch.matmul(_t(scaled), u)
        g_beta = g_beta + (g_y * from_w[layer]).sum(-1, keepdim=True)
        g_u = torch.matmul(scaled, weights[layer])
        if momentum:
            carried = carry * g_y
            g_s[layer] = torch.matmul(_t(carried), u)
            g_carry = g_carry + (g_y * from_s[layer]).sum(-1, keepdim=True)
            g_u = g_u + torch.matmul(carried, surprise[layer])
        g_scores = torch.matmul(g_y, _t(deltas[layer]))
        if layer == 0:
            g_first = g_scores
            g_deltas[0] = torch.matmul(_t(first), g_y)
            g_q = g_q + g_u
        else:
            g_mix = g_mix + g_scores * raw_scores[layer]
            masked = g_scores * mix
            g_deltas[layer] = torch.matmul(_t(mix * raw_scores[layer]), g_y)
            g_u = g_u + torch.matmul(masked, acts[layer])
            g_acts[layer] = torch.matmul(_t(masked), u)
            g_y = d1(reads[layer - 1]) * g_u

    # Backward through the chunk-end state (row `row` of A, β, c, P, E).
    g_k = torch.zeros_like(k)
    mix_row = mix[..., row, :].unsqueeze(-1)  # [B, H, C, 1]
    g_beta_row = torch.zeros_like(beta[..., 0:1, :])
    g_carry_row = torch.zeros_like(beta[..., 0:1, :]) if momentum else None
    g_mix_row = torch.zeros_like(mix_row)
    if momentum:
        keep_row = coef.surprise_keep[..., row, None, None]
        p_row = coef.surprise_mix[..., row, :].unsqueeze(-1)
        g_p_row = torch.zeros_like(p_row)
        g_keep_row = torch.zeros_like(keep_row)
    for layer in range(layers):
        gw_next = grad_w[layer]
        g_beta_row = g_beta_row + (gw_next * weights[layer]).sum((-1, -2), keepdim=True)
        if momentum:
            gs_next = grad_s[layer]
            g_carry_row = g_carry_row + (gw_next * surprise[layer]).sum((-1, -2), keepdim=True)
            g_keep_row = g_keep_row + (gs_next * surprise[layer]).sum((-1, -2), keepdim=True)
            g_s[layer] = g_s[layer] + coef.carry[..., row:row + 1, :] * gw_next + keep_row * gs_next
            both = torch.cat([gw_next, gs_next], dim=-2)  # [B, H, 2·out, in]
            projected = torch.matmul(acts[layer], _t(both))  # [C, 2·out]: a_i · G_W, a_i · G_S
            out = gw_next.shape[-2]
            via_w, via_s = projected[..., :out], projected[..., out:]
            g_deltas[layer] = g_deltas[layer] + mix_row * via_w - p_row * via_s
            g_mix_row = g_mix_row + (deltas[layer] * via_w).sum(-1, keepdim=True)
            g_p_row = g_p_row - (deltas[layer] * via_s).sum(-1, keepdim=True)
            g_a = torch.matmul(torch.cat([mix_row * deltas[layer], -p_row * deltas[layer]], dim=-1), both)
        else:
            via_w = torch.matmul(acts[layer], _t(gw_next))
            g_deltas[layer] = g_deltas[layer] + mix_row * via_w
            g_mix_row = g_mix_row + (deltas[layer] * via_w).sum(-1, keepdim=True)
            g_a = torch.matmul(mix_row * deltas[layer], gw_next)
        if layer == 0:
            g_k = g_k + g_a
        else:
            g_acts[layer] = g_acts[layer] + g_a

    # Backward through the signals: δ_l = σ'(z_l) ⊙ (δ_{l+1} W_{l+1}), δ_{L−1} = LN'ᵀ e.
    g_pre = [None] * layers
    for layer in range(layers - 1):
        g_hidden = d1(pre[layer]) * g_deltas[layer]
        g_pre[layer] = d2(pre[layer]) * hidden_grads[layer] * g_deltas[layer]
        g_deltas[layer + 1] = g_deltas[layer + 1] + torch.matmul(g_hidden, _t(weights[layer + 1]))
        g_w[layer + 1] = g_w[layer + 1] + torch.matmul(_t(deltas[layer + 1]), g_hidden)
    g_delta = g_deltas[-1]
    g_error = _norm_vjp(g_delta, normed, rstd)
    width = normed.shape[-1]
    e_n = (error * normed).sum(-1, keepdim=True)
    g_n = (g_delta * normed).sum(-1, keepdim=True)
    # δ = LN_vjp(e; z) depends on z through 1/std and the normalised z (the second-order part).
    through_rstd = (g_delta * error).sum(-1, keepdim=True) - g_delta.sum(-1, keepdim=True) * \
        error.sum(-1, keepdim=True) / width - g_n * e_n / width
    g_normed = -rstd / width * (e_n * g_delta + g_n * error) + g_error
    g_z = -rstd * rstd * through_rstd * normed / width + _norm_vjp(g_normed, normed, rstd)
    g_k = g_k + g_error
    g_v = -g_error
    for layer in range(layers - 1, -1, -1):
        g_w[layer] = g_w[layer] + torch.matmul(_t(g_z), acts[layer])
        g_input = torch.matmul(g_z, weights[layer])
        if layer == 0:
            g_k = g_k + g_input
        else:
            g_z = (g_acts[layer] + g_input) * d1(pre[layer - 1]) + g_pre[layer - 1]

    g_mix[..., row, :] += g_mix_row.squeeze(-1)
    g_beta[..., row:row + 1, :] += g_beta_row
    if not momentum:
        return g_q, g_k, g_v, g_first, (g_mix, g_beta), g_w, None
    g_carry[..., row:row + 1, :] += g_carry_row
    g_p = torch.zeros_like(coef.surprise_mix)
    g_p[..., row, :] = g_p_row.squeeze(-1)
    g_keep = torch.zeros_like(coef.surprise_keep)
    g_keep[..., row] = g_keep_row[..., 0, 0]
    return g_q, g_k, g_v, g_first, (g_mix, g_beta, g_carry, g_p, g_keep), g_w, g_s
