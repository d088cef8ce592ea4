"""The fast path: the chunkwise dual form (below), equal to ``recurrent``.

Within a chunk every gradient is taken at the chunk-start weights W⁰, so each per-token gradient
is a sum over layers of outer products g_t = δ_t ⊗ a_t, and the momentum and decay recurrences are
linear. With E_s = Π_{j≤s} η_j and β_t = Π_{j≤t} (1 − α_j) inside the chunk:

    W_t = β_t W⁰ + c_t S⁰ + Σ_{i≤t} A[t, i] δ_i ⊗ a_i,    c_t = Σ_{s≤t} (β_t/β_s) E_s
    S_t = E_t S⁰ − Σ_{i≤t} P[t, i] δ_i ⊗ a_i,
    A = −D P,   D[t, s] = β_t/β_s (t ≥ s),   P[s, i] = θ_i E_s/E_i (s ≥ i)   (GD: P = diag θ)

A read at token t through layer l is then attention-like: W_t u_t = β_t W⁰u_t + c_t S⁰u_t +
Σ_i A[t, i] (a_i · u_t) δ_i, i.e. a masked C×C matmul, and the state at the chunk end is the last
row. No per-token weights are ever formed; the only weight tensors made are the chunk-boundary
states, which autograd keeps for the backward pass (so memory grows linearly in T).

All gate algebra (D, P, A, c) is computed for every chunk at once, before the sequential loop, in
log space where every exponent is <= 0. A last partial chunk is padded at the end with tokens
whose lr is 0: they only touch rows after the last real one (A is lower-triangular), and the final
state is read from the last real row. A state left mid-chunk by an earlier call is continued by
padding at the front (lr 0, and masked out of the momentum carry c_t).

Channel-wise gates (``[B, T, H, F]``, memory/state.py) scale the input columns of each weight
matrix, so every coefficient gains a channel axis, D[c, t, s], P[c, s, i], A[c, t, i], β_t[c], and
a read's scores become Σ_c u_t[c] a_i[c] A[c, t, i] (a [C, C, in] contraction per layer instead
of a masked matmul); β_t W⁰u_t becomes W⁰(β_t ⊙ u_t).

Axis values that change this (as ``recurrent`` defines them): a decay-first retention (PreDecay,
linear memory) takes token t's gradient at β_t W⁰, i.e. with the prediction scaled by β_t; a
projecting retention projects the state at every complete chunk's end, and that chunk's last
token is re-read from the projected state (one extra one-token read per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .architectures import batch_shared, matmul_linear
from .fused import fused_chunks
from .fused import supports as fused_supports
from .recurrent import starting_state
from .rules import MemoryRule
from .span import SPAN_CHUNKS, SPAN_TOKENS, span_chunks
from .span import supports as span_supports
from .state import Gates, MemoryState, channel_widths, check_inputs, needs_retained, per_layer


def chunked(rule: MemoryRule, q: Tensor, k: Tensor, v: Tensor, gates: Gates,
            state: MemoryState | None = None, chunk_size: int = 16, *, compile: bool = False,
            recompute: int = 0, fused: bool | None = None, span: int | None = None) -> tuple[Tensor, MemoryState]:
    """Fast path, same signature and results as ``recurrent``. Returns y ``[B, T, H, Dv]`` and the state.

    ``compile=True`` runs each chunk's step through ``torch.compile`` (fused elementwise work, ~3x
    faster forward + backward at chunk 16 on CPU); the first call per input shape compiles (tens
    of seconds), later calls reuse it. Same math, tested equal to the eager path. A one-token
    call (decoding) always takes the written-out single-token update, compiled or not; a call's last
    chunk when it ends early, a call shorter than one chunk and a stream's first chunk from batch-shared
    weights run eagerly (``compiles``: the compiled code is specialised on each of those).

    ``recompute=G`` (G >= 1) trades compute for memory when gradients are needed: autograd keeps
    only the state between groups of G chunks and recomputes a group's inside during backward
    (``torch.utils.checkpoint``). Same values and gradients; activation memory falls from all
    chunks to one group plus a state per group, at the cost of a second forward pass.

    ``fused``: differentiate the loop of the deep-memory rules that ``memory/fused.py`` covers
    (Titans, TTT-MLP) with its hand-written backward instead of autograd. Same values and gradients;
    it keeps only chunk-boundary states (every ``recompute``-th) and recomputes a chunk's inside in
    backward. None (default): used with ``recompute`` (there it was faster and leaner than
    autograd's checkpointing in every measured run), not otherwise (autograd keeps every chunk's
    activations, ~1.5-2x the memory, at a speed that measured within noise of it). True: wherever
    covered (with ``compile`` its per-chunk backward is compiled too). False: never.

    ``span=J``: read J chunks at a time against the state stored at their start and form the state
    only every J chunks (``memory/span.py``; same values and gradients; J > 1 with ``recompute``,
    ``fused=True`` or ``compile`` is an error). 1: the state at every chunk end. None (default): one
    span for a call of at most ``SPAN_CHUNKS`` (4) chunks and ``SPAN_TOKENS`` (64) padded tokens when
    neither ``recompute``, ``fused`` nor ``compile`` is asked for (training rows of a few dozen tokens:
    up to ~1.3x faster training steps, benchmarks/span.py), else 1. Rules or calls it does not cover
    (channel-wise gates, projecting or decay-first retention, a call that starts mid-chunk) always
    run chunk by chunk.
    """
    check_inputs(rule, q, k, v, gates, state, chunk_size)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    check_fused(fused)
    check_recompute(recompute)
    check_span(span)
    if span is not None and span > 1 and (recompute or fused or compile):
        raise ValueError(f"span={span} (the span form, autograd through it) cannot be combined with recompute, "
                         f"fused=True or compile; got recompute={recompute}, fused={fused}, compile={compile}")
    batch, tokens, heads, dk = k.shape
    dv = v.shape[-1]
    state = starting_state(rule, k, v, state)
    if tokens == 0:  # nothing to write or read (a stream may be cut anywhere): the state as it was
        return v.new_zeros(v.shape), state
    gates = replace(gates, lr=rule.algorithm.effective_lr(gates.lr, k))
    if tokens == 1:  # decoding: the update written out for one token beats a padded chunk
        return _one_token(rule, q, k, v, gates, state, chunk_size)
    # A state left mid-chunk continues its chunk: the sequence is laid out as if `offset`
    # (inert, masked) tokens came first, so that chunk boundaries stay where they were.
    offset = state.position
    size = min(chunk_size, offset + tokens)
    # compiled code is specialised on the chunk length: a call shorter than one chunk runs eagerly
    compile = compile and size == chunk_size
    chunks = -(-(offset + tokens) // size)
    layout = (offset, chunks * size - offset - tokens)  # padding (front, back)
    last = offset + tokens - (chunks - 1) * size - 1  # row of the last real token in the last chunk
    widths = channel_widths(rule, dk, dv) if gates.channelwise else None
    with torch.autocast(q.device.type, enabled=False):  # gate algebra: part of the write path
        coef = _chunk_coefficients(rule, gates, chunks, size, layout, widths)
    q, k, v = (_to_chunks(x, chunks, size, layout) for x in (q, k, v))
    position = (offset + tokens) % chunk_size
    if span is None:
        short = chunks <= SPAN_CHUNKS and chunks * size <= SPAN_TOKENS
        span = chunks if short and not (recompute or fused or compile) else 1
    # Per-token gates the bias reads (Huber's threshold), [N, B, H, C, 1].
    extra = {name: _gate_chunks(getattr(gates, name), chunks, size, layout).unsqueeze(-1)
             for name in sorted(rule.bias.gates)}
    if span > 1 and span_supports(rule, channelwise=widths is not None, offset=offset):
        y, weights, surprise, anchor = span_chunks(rule, q, k, v, coef, extra, state.weights, state.momentum, last,
                                                   span, lambda v, extra: _output_grad(rule, v, None, extra))
        return y.transpose(1, 2)[:, :tokens], _final_state(rule, weights, surprise, anchor, position, coef.beta, last,
                                                                  chunk_size)
    # Every architecture's first layer reads the raw query and writes with the raw key, so the
    # first layer's masked scores A ⊙ (Q Kᵀ) do not depend on the state: one batched matmul.
    with rule.reading(q.device.type):  # part of every read
        if widths is None:
            first_scores = coef.mix * torch.matmul(q, k.transpose(-1, -2))
        else:  # Σ_c q_t[c] k_i[c] A[c, t, i] over the first layer's channels
            first_scores = torch.einsum("nbhtc,nbhic,nbhcti->nbhti", q, k, coef.mix[..., :dk, :, :])
    retention = rule.retention
    # β since the chunk start: the decay-first gradient point and the KL projection's keep (token-
    # level gates only; channel-wise rules do not use it).
    retained = coef.beta if widths is None else None
    if state.retained is not None:
        retained = torch.cat([retained[:1] * state.retained[..., None, None], retained[1:]])

    weights, surprise = state.weights, state.momentum
    anchor = state.chunk_start if offset else weights
    if fused is None:
        fused = recompute > 0
    if fused and torch.is_grad_enabled() and fused_supports(
            rule, channelwise=widths is not None, offset=offset, device_type=q.device.type):
        ys, weights, surprise, anchor = fused_chunks(rule, q, k, v, first_scores, coef, weights, surprise, last,
                                                     max(recompute, 1), compile, keep_anchor=position != 0)
        y = ys.permute(1, 0, 3, 2, 4).reshape(batch, chunks * size, heads, dv)
        return y[:, :tokens], _final_state(rule, weights, surprise, anchor, position, retained, last, chunk_size)
    # Split into per-chunk views once: indexing x[n] inside the loop would make backward allocate
    # (and fill) a full-size zero gradient per chunk, quadratic in T; unbind's backward is one stack.
    per_chunk = list(zip(q.unbind(0), k.unbind(0), v.unbind(0), first_scores.unbind(0), coef.unbind(),
                         [None] * chunks if retained is None else retained.unbind(0),
                         *(x.unbind(0) for x in extra.values())))

    def run(first: int, stop: int, weights, surprise, anchor):
        """Chunks ``first:stop`` from the given state: their outputs and the state after them."""
        outputs = []
        for n in range(first, stop):
            q_n, k_n, v_n, first_n, coef_n, retained_n, *extra_n = per_chunk[n]
            if n > 0:
                anchor = weights
            row = last if n == chunks - 1 else size - 1
            scale = retained_n if retention.decay_first else None
            step = chunk_step(compile, row, size, anchor)
            y_n, weights, surprise = step(rule, weights, surprise, anchor, q_n, k_n, v_n, first_n, coef_n, row,
                                          scale, dict(zip(extra, extra_n)))
            if retention.projects and (n < chunks - 1 or position == 0):
                keep = None if retained_n is None else retained_n[:, :, row, 0]
                weights = retention.chunk_end(weights, anchor, keep)
                # The chunk's last token reads the projected state (as in the reference).
                with rule.reading(q_n.device.type):
                    y_last = rule.architecture.apply(q_n[:, :, row:row + 1],
                                                     matmul_linear(retention.read_point(weights)))
                y_n = torch.cat([y_n[:, :, :row], y_last.to(y_n.dtype), y_n[:, :, row + 1:]], dim=2)
            outputs.append(y_n)
        return outputs, weights, surprise, anchor

    group = recompute if recompute and torch.is_grad_enabled() else chunks
    outputs = []
    for first in range(0, chunks, group):
        stop = min(first + group, chunks)
        if group < chunks:  # keep only the state between groups; recompute a group's inside in backward
            ys, weights, surprise, anchor = checkpoint(run, first, stop, weights, surprise, anchor,
                                                       use_reentrant=False)
        else:
            ys, weights, surprise, anchor = run(first, stop, weights, surprise, anchor)
        outputs += ys
    y = torch.stack(outputs).permute(1, 0, 3, 2, 4).reshape(batch, chunks * size, heads, dv)
    return y[:, offset:offset + tokens], _final_state(rule, weights, surprise, anchor, position, retained, last,
                                                      chunk_size)


def _final_state(rule, weights, surprise, anchor, position: int, retained: Tensor | None, last: int,
                 chunk_size: int) -> MemoryState:
    """The state after the call; mid-chunk it keeps the chunk-start weights and, for the rules that need
    it, β since the chunk start at the last token."""
    # a copy, not a view: a view would keep the whole call's [N, B, H, C, 1] products alive in the state
    kept = retained[-1][:, :, last, 0].clone() if position and needs_retained(rule) else None
    return MemoryState(weights, surprise, anchor if position else None, position, kept, chunk_size if position else 0)


def check_fused(fused) -> None:
    """``fused`` must be None (automatic), True or False."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None (automatic), True or False, got {fused!r}")


def check_span(span) -> None:
    """``span`` must be None (automatic) or a number of chunks >= 1."""
    if span is not None and (not isinstance(span, int) or isinstance(span, bool) or span < 1):
        raise ValueError(f"span must be None (automatic) or an integer >= 1 (chunks per span), got {span!r}")


def check_recompute(recompute) -> None:
    """``recompute`` must be a number of chunks per recomputed group (0: off)."""
    if not isinstance(recompute, int) or isinstance(recompute, bool) or recompute < 0:
        raise ValueError(f"recompute must be an integer >= 0 (chunks per recomputed group; 0: off), got {recompute!r}")


def _chunk_step(rule: MemoryRule, weights, surprise, anchor, q, k, v, first_scores, coef: _Coefficients, row: int,
                scale: Tensor | None, extra: dict[str, Tensor]):
    """One chunk: gradient signals at ``anchor`` (at ``scale``·anchor per token if given), the
    dual-form read of every query, the state after token ``row``. Returns (y [B, H, C, Dv], weights,
    momentum)."""
    # Under autocast only the reads run in low precision. The write path (inner gradients, gate
    # algebra, state update) is a long recurrence that compounds rounding: with bf16 writes the
    # state is ~17% off float64 after 1K tokens at the Titans defaults, with float32 writes 2e-5.
    full_precision = torch.autocast(q.device.type, enabled=False)
    with full_precision:
        point = rule.retention.gradient_point(anchor)
        _, deltas, acts = rule.architecture.signals(point, k, _output_grad(rule, v, scale, extra))
    with rule.reading(q.device.type):
        y = rule.architecture.apply(q, _scaled(_dual_read(weights, surprise, deltas, acts, first_scores, coef),
                                               rule.retention.read_scales(anchor)))
    with full_precision:
        weights, surprise = _chunk_end_state(weights, surprise, deltas, acts, coef, row)
    return y, weights, surprise


def _one_token(rule: MemoryRule, q, k, v, gates: Gates, state: MemoryState, chunk_size: int):
    """A single token, as memory/README.md ("The pinned update") writes it, with the closed-form gradient at the
    chunk start: g = δ ⊗ a per layer; S = η S − θ g; W = (1 − α) W + S; y = M(W; q) (projected first at a chunk end)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, 1, D]
    anchor = state.chunk_start if state.position else state.weights
    retention = rule.retention
    with torch.autocast(q.device.type, enabled=False):
        log_retain = retention.log_retain(gates)
        # Π(1 − α) since the chunk start, [B, H]: token-level gates only (channel-wise rules do not use it)
        keep = None if log_retain is None or log_retain.dim() == 4 else torch.exp(log_retain[:, 0])
        retained = keep if state.retained is None or keep is None else state.retained * keep
        scale = retained[..., None, None] if retention.decay_first else None
        extra = {name: getattr(gates, name)[:, 0, :, None, None] for name in rule.bias.gates}
        _, deltas, acts = rule.architecture.signals(retention.gradient_point(anchor), k,
                                                    _output_grad(rule, v, scale, extra))
        widths = channel_widths(rule, k.shape[-1], v.shape[-1])

        def factors(gate: Tensor) -> list[Tensor]:  # per weight matrix: [B, H, 1, 1] or [B, H, 1, in]
            return per_layer(gate[:, 0], widths, gate.dim() == 4)

        steps = [-lr * torch.matmul(delta.transpose(-1, -2), act)
                 for lr, delta, act in zip(factors(gates.lr), deltas, acts)]
        surprise = state.momentum
        if rule.algorithm.uses_momentum:  # η clamped as in the chunk algebra (log space)
            etas = factors(torch.exp(rule.algorithm.log_momentum(gates)))
            surprise = tuple(eta * s + step for eta, s, step in zip(etas, surprise, steps))
            steps = list(surprise)
        keeps = [1.0] * len(steps) if log_retain is None else factors(torch.exp(log_retain))
        weights = tuple(factor * w + step for factor, w, step in zip(keeps, state.weights, steps))
        position = (state.position + 1) % chunk_size
        if position == 0 and retention.projects:
            weights = retention.chunk_end(weights, anchor, retained)
    # in the inputs' dtype, as the chunk path returns it (under autocast a linear read would be bf16)
    if position == 0 and retention.projects:
        read = matmul_linear(retention.read_point(weights))
    else:
        read = _scaled(matmul_linear(weights), retention.read_scales(anchor))
    with rule.reading(q.device.type):
        y = rule.architecture.apply(q, read).transpose(1, 2).to(q.dtype)
    if position == 0:
        return y, MemoryState(weights, surprise)
    return y, MemoryState(weights, surprise, anchor, position, retained if needs_retained(rule) else None, chunk_size)


def _output_grad(rule: MemoryRule, v: Tensor, scale: Tensor | None, extra: dict[str, Tensor]):
    """δ at the output for a prediction ``pred`` at the gradient point: ∂ℓ/∂ŷ (ŷ scaled by ``scale``
    for a decay-first retention, whose gradient point is the retained weights β_t W⁰)."""
    if scale is None:
        return lambda pred: rule.bias.output_grad(pred, v, **extra)
    return lambda pred: rule.bias.output_grad(scale * pred, v, **extra)


_COMPILED: dict[str, object] = {}


def compiles(compile: bool, row: int, size: int, anchor: tuple[Tensor, ...]) -> bool:
    """Whether a chunk whose state is taken after token ``row``, from the chunk-start weights ``anchor``,
    runs compiled (``compile``): only a full chunk from weights of their own. The compiled code is
    specialised on ``row`` and on the weights' strides: a call's last chunk may end at any row (a prompt of
    another length), and a stream's first chunk starts from the learned initial memory expanded over the
    batch (stride 0); each would compile a graph of its own, so those chunks run eagerly."""
    return compile and row == size - 1 and not any(map(batch_shared, anchor))


def chunk_step(compile: bool, row: int, size: int, anchor: tuple[Tensor, ...]):
    """``_chunk_step``, compiled where ``compiles`` says."""
    return _compiled_step() if compiles(compile, row, size, anchor) else _chunk_step


def _compiled_step():
    """``_chunk_step`` under torch.compile, made on first use (importing miras compiles nothing).
    Shapes are static: each new (batch, heads, chunk, dims, dtype, rule) compiles once, and again for
    grad mode, autocast and whether the state requires grad (dynamo's guards); ``chunk_step`` keeps
    partial chunks and batch-shared start weights out of it."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(_chunk_step, dynamic=False)
    return _COMPILED["step"]


def _scaled(linear, scales: tuple[Tensor, ...] | None):
    """``linear(layer, u)`` times ``scales[layer]`` (the retention's ``read_scales``; None: as it is)."""
    if scales is None:
        return linear
    return lambda layer, u: linear(layer, u) * scales[layer]


def _dual_read(weights, surprise, deltas, acts, first_scores, coef: _Coefficients):
    """Layer l of the memory at every token of the chunk, applied to that token's input u_t:
    β_t W⁰u_t + c_t S⁰u_t + Σ_i A[t, i] (a_i · u_t) δ_i (channel-wise: β_t, c_t, A[t, i] scale u's channels)."""

    def linear(layer: int, u: Tensor) -> Tensor:
        if coef.widths is None:
            z = coef.beta * torch.matmul(u, weights[layer].transpose(-1, -2))
            if surprise is not None:
                z = z + coef.carry * torch.matmul(u, surprise[layer].transpose(-1, -2))
            scores = first_scores if layer == 0 else coef.mix * torch.matmul(u, acts[layer].transpose(-1, -2))
            return z + torch.matmul(scores, deltas[layer])
        mix, beta, carry = coef.layer(layer, "mix", "beta", "carry")  # [B, H, in, C, C], [B, H, in, C, 1] x2
        z = torch.matmul(u * beta.squeeze(-1).transpose(-1, -2), weights[layer].transpose(-1, -2))
        if surprise is not None:
            z = z + torch.matmul(u * carry.squeeze(-1).transpose(-1, -2), surprise[layer].transpose(-1, -2))
        scores = first_scores if layer == 0 else torch.einsum("bhtc,bhic,bhcti->bhti", u, acts[layer], mix)
        return z + torch.matmul(scores, deltas[layer])

    return linear


@dataclass(frozen=True)
class _Coefficients:
    """Per-chunk gate algebra, leading dims [N, B, H] (then [F] for channel-wise gates). With
    momentum, else carry, surprise_mix and surprise_keep are None."""

    mix: Tensor                   # A, [.., C, C]
    beta: Tensor                  # β_t, [.., C, 1]
    carry: Tensor | None          # c_t, [.., C, 1]
    surprise_mix: Tensor | None   # P, [.., C, C]
    surprise_keep: Tensor | None  # E_t, [.., C]
    widths: tuple[int, ...] | None = None  # channel-wise: the F channels split per weight matrix

    def unbind(self) -> list[_Coefficients]:
        """One _Coefficients per chunk (views), leading dims [B, H]."""
        parts = [[None] * len(self.mix) if t is None else t.unbind(0)
                 for t in (self.mix, self.beta, self.carry, self.surprise_mix, self.surprise_keep)]
        return [_Coefficients(*values, self.widths) for values in zip(*parts)]

    def layer(self, layer: int, *names: str) -> list[Tensor | None]:
        """Channel-wise: the named coefficients restricted to weight matrix ``layer``'s channels."""
        start = sum(self.widths[:layer])
        return [None if getattr(self, n) is None else getattr(self, n).narrow(2, start, self.widths[layer])
                for n in names]


def _chunk_coefficients(rule: MemoryRule, gates: Gates, chunks: int, size: int, layout,
                        widths: list[int] | None = None) -> _Coefficients:
    """The gate algebra of every chunk. Channel-wise (``widths``): a channel axis before C, [N, B, H, F, C]."""

    def chunked_gate(g: Tensor) -> Tensor:
        g = _gate_chunks(g, chunks, size, layout)
        return g.unsqueeze(-2) if widths is not None and g.dim() == 4 else g  # token-level: F = 1

    # Padding tokens get lr 0 and log-gates 0 (η = 1, α = 0): they write nothing and scale nothing.
    lr = chunked_gate(gates.lr)
    log_retain = rule.retention.log_retain(gates)
    lower = torch.ones(size, size, dtype=torch.bool, device=lr.device).tril()
    if log_retain is None:
        log_beta = torch.zeros_like(lr)
    else:
        log_beta = chunked_gate(log_retain).cumsum(-1)
    decay = _ratio(log_beta, lower)  # D[t, s] = β_t / β_s
    beta = torch.exp(log_beta)
    if rule.algorithm.uses_momentum:
        log_e = chunked_gate(rule.algorithm.log_momentum(gates)).cumsum(-1)
        propagate = _ratio(log_e, lower) * lr.unsqueeze(-2)  # P[s, i] = θ_i E_s / E_i
        mix = -torch.matmul(decay, propagate)
        e = torch.exp(log_e)
        # c_t = Σ_s D[t, s] E_s over real tokens s: a front padding token must not add S⁰ to W.
        real = torch.ones_like(e)
        real[0, ..., :layout[0]] = 0
        carry = torch.matmul(decay, (e * real).unsqueeze(-1))
        surprise_mix, surprise_keep = propagate, e
    else:
        mix = -decay * lr.unsqueeze(-2)  # A = −D diag(θ)
        carry = surprise_mix = surprise_keep = None
    coef = _Coefficients(mix, beta.unsqueeze(-1), carry, surprise_mix, surprise_keep)
    if widths is None:
        return coef
    channels = sum(widths)  # token-level gates broadcast over the channels

    def full(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.expand(*t.shape[:3], channels, *t.shape[4:])

    return _Coefficients(*(full(t) for t in (coef.mix, coef.beta, coef.carry, coef.surprise_mix,
                                              coef.surprise_keep)), tuple(widths))


def _ratio(log_cumulative: Tensor, lower: Tensor) -> Tensor:
    """exp(x_t − x_s) for t >= s, 0 above the diagonal; masked before exp, so nothing overflows."""
    diff = log_cumulative.unsqueeze(-1) - log_cumulative.unsqueeze(-2)
    return torch.exp(diff.masked_fill(~lower, float("-inf")))


def _chunk_end_state(weights, surprise, deltas, acts, coef: _Coefficients, row: int):
    """The state after token ``row`` of the chunk: W = β W⁰ + c S⁰ + Σ_i A[row, i] δ_i ⊗ a_i
    (channel-wise: β, c and A[row, i] scale the input channels)."""
    if coef.widths is not None:
        return _chunk_end_state_channelwise(weights, surprise, deltas, acts, coef, row)
    beta = coef.beta[:, :, row:row + 1]          # [B, H, 1, 1]
    mix = coef.mix[:, :, row].unsqueeze(-1)      # [B, H, C, 1]
    new_weights = []
    for layer, (w, delta, act) in enumerate(zip(weights, deltas, acts)):
        base = beta * w
        if surprise is not None:
            base = base + coef.carry[:, :, row:row + 1] * surprise[layer]
        new_weights.append(base + torch.matmul((mix * delta).transpose(-1, -2), act))
    if surprise is None:
        return tuple(new_weights), None
    keep = coef.surprise_keep[:, :, row, None, None]
    retain = coef.surprise_mix[:, :, row].unsqueeze(-1)
    new_surprise = tuple(keep * s - torch.matmul((retain * delta).transpose(-1, -2), act)
                         for s, delta, act in zip(surprise, deltas, acts))
    return tuple(new_weights), new_surprise


def _chunk_end_state_channelwise(weights, surprise, deltas, acts, coef: _Coefficients, row: int):
    new_weights, new_surprise = [], []
    for layer, (w, delta, act) in enumerate(zip(weights, deltas, acts)):
        mix, beta, carry, surprise_mix, surprise_keep = coef.layer(
            layer, "mix", "beta", "carry", "surprise_mix", "surprise_keep")
        # Row `row` of each coefficient, channels last: [B, H, 1, in] (scales) and [B, H, C, in] (mixes).
        base = w * beta[..., row, :].transpose(-1, -2)
        if surprise is not None:
            base = base + surprise[layer] * carry[..., row, :].transpose(-1, -2)
        new_weights.append(base + torch.matmul(delta.transpose(-1, -2), mix[..., row, :].transpose(-1, -2) * act))
        if surprise is not None:
            retain = surprise_mix[..., row, :].transpose(-1, -2)
            new_surprise.append(surprise[layer] * surprise_keep[..., row].unsqueeze(-2)
                                - torch.matmul(delta.transpose(-1, -2), retain * act))
    return tuple(new_weights), (tuple(new_surprise) if surprise is not None else None)


def _to_chunks(x: Tensor, chunks: int, size: int, layout: tuple[int, int]) -> Tensor:
    """[B, T, H, D] -> [N, B, H, C, D], zero-padded (front, back), contiguous."""
    batch, _, heads, dim = x.shape
    x = F.pad(x, (0, 0, 0, 0, *layout))
    return x.reshape(batch, chunks, size, heads, dim).permute(1, 0, 3, 2, 4).contiguous()


def _gate_chunks(g: Tensor, chunks: int, size: int, layout: tuple[int, int]) -> Tensor:
    """[B, T, H] -> [N, B, H, C], or channel-wise [B, T, H, F] -> [N, B, H, F, C]; zero-padded (front, back)."""
    if g.dim() == 4:
        batch, _, heads, channels = g.shape
        g = F.pad(g, (0, 0, 0, 0, *layout))
        return g.reshape(batch, chunks, size, heads, channels).permute(1, 0, 3, 4, 2)
    batch, _, heads = g.shape
    g = F.pad(g, (0, 0, *layout))
    return g.reshape(batch, chunks, size, heads).permute(1, 0, 3, 2)
