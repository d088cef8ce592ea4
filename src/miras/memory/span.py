"""The span form: several chunks read against the state stored at the span's start (used by ``chunked``).

``chunked`` forms the state at every chunk end: per batch row, head and weight matrix an ``[out, in]``
tensor, written and read back once per chunk. In short calls (training rows of a few dozen tokens,
where each row's state is larger than its chunk's activations) those state-sized passes are most of
the time. Within a span of J chunks, every chunk-start state is a linear combination of the span-start
state (W⁰, S⁰) and the span's per-token gradients g_i = δ_i ⊗ a_i, with scalar coefficients:

    W_j = b_j W⁰ + e_j S⁰ + Σ_i Gw[j, i] g_i,    S_j = f_j S⁰ + Σ_i Gs[j, i] g_i

where, from the chunk-end row r of chunk j's gate algebra (β, c, E, A, P as in chunked.py),

    b_0 = f_0 = 1, e_0 = 0, G[0] = 0;   b_{j+1} = β_r b_j,   e_{j+1} = β_r e_j + c_r f_j,   f_{j+1} = E_r f_j,
    Gw[j+1] = β_r Gw[j] + c_r Gs[j] + A[r, ·],   Gs[j+1] = E_r Gs[j] − P[r, ·]   (A, P on chunk j's tokens).

So every use of W_j is attention-like over the span's earlier tokens: W_j u = b_j W⁰u + e_j S⁰u +
Σ_i Gw[j, i] (a_i · u) δ_i, and a backward signal g through it is g W_j = b_j g W⁰ + e_j g S⁰ +
Σ_i Gw[j, i] (g · δ_i) a_i. Chunk j's gradient signals are still taken in order (they are taken at
W_j, which depends on chunks < j), but the read of token t in chunk j,

    β_t W_j u + c_t S_j u + Σ_{i in chunk j} A[t, i] (a_i · u) δ_i = (β_t b_j) W⁰u + (β_t e_j + c_t f_j) S⁰u
                                                                   + Σ_{i <= t} R[t, i] (a_i · u) δ_i,

is one masked T×T product per layer for the whole span (R[t, i] = β_t Gw[j, i] + c_t Gs[j, i] for earlier
chunks, A[t, i] inside chunk j), and the state is formed once, at the span's end. Same math as the
chunk-by-chunk loop; the scores cost O(T²) per span instead of a state pass per chunk, which is why
``chunked`` uses it for short calls only (``SPAN_TOKENS``).

A span whose start state is shared by every batch row (the layer's learned initial memory, expanded
with batch stride 0) is read with one matmul per head, never copied per row.

Covered: token-level gates, retentions that neither project nor decay first, a call that starts at a
chunk boundary. ``chunked`` falls back to its chunk loop for everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .architectures import shared_matmul

# chunked's automatic choice: a call of at most SPAN_CHUNKS chunks and SPAN_TOKENS (padded) tokens runs
# as one span (benchmarks/span.py: spans of more chunks gained nothing or lost to the chunk loop).
SPAN_TOKENS = 64
SPAN_CHUNKS = 4


def supports(rule, *, channelwise: bool, offset: int) -> bool:
    """Whether the span form covers this call (else ``chunked`` runs its chunk loop)."""
    return not channelwise and offset == 0 and not rule.retention.projects and not rule.retention.decay_first


def span_chunks(rule, q: Tensor, k: Tensor, v: Tensor, coef, extra: dict[str, Tensor], weights, surprise,
                last: int, span: int, output_grad):
    """Chunks [N, B, H, C, D] in spans of ``span`` chunks from state (weights, surprise). Returns y
    [B, H, N·C, Dv], the state after token ``last`` of the last chunk, and that chunk's start weights."""
    chunks, size = q.shape[0], q.shape[3]
    pieces = [x.split(span) for x in (q, k, v, coef.mix, coef.beta)]
    pieces += [[None] * len(pieces[0]) if x is None else x.split(span)
               for x in (coef.carry, coef.surprise_mix, coef.surprise_keep)]
    extras = [x.split(span) for x in extra.values()]
    outputs, anchor = [], weights
    for number, parts in enumerate(zip(*pieces, *extras)):
        q_s, k_s, v_s, mix, beta, carry, surprise_mix, surprise_keep, *extra_s = parts
        final = (number + 1) * span >= chunks
        y, weights, surprise, anchor = _span(rule, q_s, k_s, v_s, mix, beta, carry, surprise_mix, surprise_keep,
                                             dict(zip(extra, extra_s)), weights, surprise,
                                             last if final else size - 1, final, output_grad)
        outputs.append(y)
    return torch.cat(outputs, dim=2), weights, surprise, anchor


def _span(rule, q, k, v, mix, beta, carry, surprise_mix, surprise_keep, extra, weights, surprise, last: int,
          want_anchor: bool, output_grad):
    """One span of J chunks ([J, B, H, C, D] inputs, per-chunk coefficients) from the state (weights,
    surprise) at its start: y [B, H, J·C, Dv], the state after token ``last`` of chunk J−1, and (if
    ``want_anchor``) the start state of chunk J−1."""
    spans, batch, heads, size, _ = q.shape
    tokens = spans * size
    # Per-chunk pieces by unbind/split, never by indexing: the backward of x[..., rows, :] fills a
    # zero gradient the size of x per chunk; unbind's and split's backward is one stack or cat.
    k_chunks, v_chunks = k.unbind(0), v.unbind(0)
    extra_chunks = [dict(zip(extra, values)) for values in zip(*(x.unbind(0) for x in extra.values()))] or \
        [{}] * spans
    q, k = _flat(q), _flat(k)
    momentum = surprise is not None
    full_precision = torch.autocast(q.device.type, enabled=False)
    with full_precision:
        # Chunk-start coefficients b_j, e_j, f_j [B, H] and Gw[j], Gs[j] [B, H, T], j = 0..J.
        ones = beta.new_ones(batch, heads)
        b, e, f = [ones], [torch.zeros_like(ones)], [ones]
        gw, gs = [beta.new_zeros(batch, heads, tokens)], [beta.new_zeros(batch, heads, tokens)]
        for j in range(spans):
            row = last if j == spans - 1 else size - 1
            keep = beta[j, :, :, row, 0]
            place = (j * size, tokens - (j + 1) * size)  # chunk j's columns among the span's tokens
            own = F.pad(mix[j, :, :, row], place)
            if momentum:
                c, end = carry[j, :, :, row, 0], surprise_keep[j, :, :, row]
                gw.append(keep[..., None] * gw[j] + c[..., None] * gs[j] + own)
                gs.append(end[..., None] * gs[j] - F.pad(surprise_mix[j, :, :, row], place))
                e.append(keep * e[j] + c * f[j])
                f.append(end * f[j])
            else:
                gw.append(keep[..., None] * gw[j] + own)
            b.append(keep * b[j])
        key_scores = torch.matmul(k, k.transpose(-1, -2)).split(size, dim=2)
        key_base = [_base(w, k).split(size, dim=2) for w in (weights[0], *(surprise[:1] if momentum else ()))]

        deltas, acts = [[] for _ in weights], [[] for _ in weights]
        for j in range(spans):
            history = j * size
            past_d = [torch.cat(d, dim=2) for d in deltas] if j else None
            past_a = [torch.cat(a, dim=2) for a in acts] if j else None
            b_j = b[j][..., None, None]
            e_j = e[j][..., None, None] if momentum else None
            g_j = gw[j][..., None, :history]  # [B, H, 1, history]

            # W_j u and g W_j through the implicit W_j (used only inside this iteration, by signals).
            def linear(layer: int, u: Tensor) -> Tensor:
                if layer == 0:  # u is the chunk's raw keys
                    z = key_base[0][j]
                    if j and momentum:
                        z = b_j * z + e_j * key_base[1][j]
                    elif j:
                        z = b_j * z
                else:
                    z = _base(weights[layer], u)
                    if j:
                        z = b_j * z + (e_j * _base(surprise[layer], u) if momentum else 0)
                if j:
                    scores = key_scores[j][..., :history] if layer == 0 else \
                        torch.matmul(u, past_a[layer].transpose(-1, -2))
                    z = z + torch.matmul(g_j * scores, past_d[layer])
                return z

            def linear_t(layer: int, g: Tensor) -> Tensor:
                z = _base_t(weights[layer], g)
                if j:
                    z = b_j * z + (e_j * _base_t(surprise[layer], g) if momentum else 0)
                    z = z + torch.matmul(g_j * torch.matmul(g, past_d[layer].transpose(-1, -2)), past_a[layer])
                return z

            _, d, a = rule.architecture.signals(None, k_chunks[j], output_grad(v_chunks[j], extra_chunks[j]),
                                                linear, linear_t)
            for layer in range(len(weights)):
                deltas[layer].append(d[layer])
                acts[layer].append(a[layer])
        deltas = [torch.cat(d, dim=2) for d in deltas]
        acts = [torch.cat(a, dim=2) for a in acts]

        # The read of every token: scalars on W⁰u and S⁰u, and R over the span's tokens.
        read_rows, read_w, read_s = [], [], []
        for j, (beta_j, mix_j, carry_j) in enumerate(zip(beta.unbind(0), mix.unbind(0),
                                                         carry.unbind(0) if momentum else [None] * spans)):
            r = beta_j * gw[j][..., None, :] + F.pad(mix_j, (j * size, tokens - (j + 1) * size))
            read_w.append(beta_j * b[j][..., None, None])
            if momentum:
                r = r + carry_j * gs[j][..., None, :]
                read_s.append(beta_j * e[j][..., None, None] + carry_j * f[j][..., None, None])
            read_rows.append(r)
        read = torch.cat(read_rows, dim=2)  # [B, H, T, T], zero above the diagonal
        read_w = torch.cat(read_w, dim=2)
        read_s = torch.cat(read_s, dim=2) if momentum else None
        query_scores = read * torch.matmul(q, k.transpose(-1, -2))

    def read_linear(layer: int, u: Tensor) -> Tensor:
        z = read_w * _base(weights[layer], u)
        if momentum:
            z = z + read_s * _base(surprise[layer], u)
        scores = query_scores if layer == 0 else read * torch.matmul(u, acts[layer].transpose(-1, -2))
        return z + torch.matmul(scores, deltas[layer])

    with rule.reading(q.device.type):
        y = rule.architecture.apply(q, read_linear)

    with full_precision:
        def state_at(j: int, momentum_state: bool) -> tuple[Tensor, ...]:
            """W_j (or S_j): the span-start state scaled, plus the span's gradients mixed by Gw[j] (Gs[j])."""
            start, scale, mixes = (surprise, f, gs) if momentum_state else (weights, b, gw)
            parts = []
            for layer, w in enumerate(start):
                grads = torch.matmul((deltas[layer] * mixes[j][..., None]).transpose(-1, -2), acts[layer])
                state = scale[j][..., None, None] * w + grads
                if momentum and not momentum_state:
                    state = state + e[j][..., None, None] * surprise[layer]
                parts.append(state)
            return tuple(parts)

        new_weights = state_at(spans, False)
        new_surprise = state_at(spans, True) if momentum else None
        anchor = state_at(spans - 1, False) if want_anchor and spans > 1 else weights
    return y, new_weights, new_surprise, anchor


def _flat(x: Tensor) -> Tensor:
    """[J, B, H, C, D] -> [B, H, J·C, D]."""
    spans, batch, heads, size, dim = x.shape
    return x.permute(1, 2, 0, 3, 4).reshape(batch, heads, spans * size, dim)


def _base(w: Tensor, u: Tensor) -> Tensor:
    """u Wᵀ per batch row and head: u [B, H, T, in], w [B, H, out, in] -> [B, H, T, out]."""
    return shared_matmul(u, w, transpose=True)


def _base_t(w: Tensor, g: Tensor) -> Tensor:
    """g W per batch row and head: g [B, H, T, out], w [B, H, out, in] -> [B, H, T, in]."""
    return shared_matmul(g, w, transpose=False)
