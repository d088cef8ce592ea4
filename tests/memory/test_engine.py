"""The fast path equals the reference; the reference equals hand-written classic rules."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from miras.memory import (
    DELTANET,
    GD,
    LONGHORN,
    MEMORA,
    MONETA,
    PRESETS,
    TITANS,
    YAAD,
    Decay,
    DotProduct,
    Gates,
    LinearMemory,
    MemoryRule,
    MemoryState,
    NoRetention,
    chunked,
    read,
    recurrent,
)

from .helpers import assert_close, leaves, make_inputs, run_with_grads


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("chunk_size,tokens", list(itertools.product([1, 4, 16], [1, 5, 16, 37])))
def test_chunked_equals_recurrent(name, chunk_size, tokens):
    rule = PRESETS[name]
    # At chunk 1 the 37 inner steps are one long chain whose gradients reach ~1e5 here (titans): any two
    # float64 evaluation orders differ by ~1e-10 of that (the chunk loop by 1.0e-10, spans by 3e-10).
    tol = 1e-9 if chunk_size == 1 and tokens > 16 else 1e-10
    ref_out, ref_grads = run_with_grads(recurrent, rule, make_inputs(rule, tokens=tokens, requires_grad=True),
                                        chunk_size)
    out, grads = run_with_grads(chunked, rule, make_inputs(rule, tokens=tokens, requires_grad=True), chunk_size)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, f"output {i}", tol)
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        assert_close(grads[key], ref_grads[key], f"d/d {key}", tol)
        assert ref_grads[key].abs().max() > 0, f"gradient w.r.t. {key} is identically zero"


def test_chunked_gradcheck_titans():
    inputs = make_inputs(TITANS, batch=1, tokens=6, heads=2, dim=3, requires_grad=True)
    names = [n for n, _ in leaves(*inputs)]

    def fn(*tensors):
        by_name = dict(zip(names, tensors))
        gates = Gates(**{n.split(".")[1]: t for n, t in by_name.items() if n.startswith("gates.")})
        state = MemoryState((by_name["state.weights[0]"], by_name["state.weights[1]"]),
                            (by_name["state.momentum[0]"], by_name["state.momentum[1]"]))
        y, final = chunked(TITANS, by_name["q"], by_name["k"], by_name["v"], gates, state, 4)
        return (y, *final.weights, *final.momentum)

    assert torch.autograd.gradcheck(fn, [t for _, t in leaves(*inputs)], eps=1e-6, atol=1e-7, fast_mode=True)


def test_chunked_gradcheck_gated_linear_attention():
    rule = MemoryRule(LinearMemory(), DotProduct(), Decay(), GD())
    q, k, v, gates, state = make_inputs(rule, batch=1, tokens=5, heads=1, dim=3, requires_grad=True)

    def fn(q, k, v, lr, decay, w):
        y, final = chunked(rule, q, k, v, Gates(lr=lr, decay=decay), MemoryState((w,)), 2)
        return y, final.weights[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, gates.lr, gates.decay, state.weights[0]))


@pytest.mark.parametrize("impl", [recurrent, chunked])
def test_delta_rule_by_hand(impl):
    """Linear memory + L2 + GD + no retention + chunk 1 is DeltaNet: W ← W − θ (W k − v) kᵀ."""
    q, k, v, gates, state = make_inputs(DELTANET, batch=2, tokens=9, heads=2, dim=3)
    y, final = impl(DELTANET, q, k, v, gates, state, 1)
    W = state.weights[0].clone()
    for t in range(9):
        kt, vt, lr = k[:, t, :, :, None], v[:, t, :, :, None], gates.lr[:, t, :, None, None]
        W = W - lr * (W @ kt - vt) @ kt.transpose(-1, -2)
        torch.testing.assert_close(y[:, t], (W @ q[:, t, :, :, None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(final.weights[0], W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("impl", [recurrent, chunked])
def test_gated_linear_attention_by_hand(impl, chunk_size):
    """Linear memory + DotProduct + Decay: W_t = (1 − α_t) W_{t−1} + θ_t v_t k_tᵀ, at any chunk size
    (the Hebbian gradient does not depend on W, so mini-batching changes nothing)."""
    rule = MemoryRule(LinearMemory(), DotProduct(), Decay(), GD())
    q, k, v, gates, state = make_inputs(rule, batch=2, tokens=11, heads=2, dim=3)
    y, final = impl(rule, q, k, v, gates, state, chunk_size)
    W = state.weights[0].clone()
    for t in range(11):
        outer = v[:, t, :, :, None] @ k[:, t, :, None, :]
        W = (1 - gates.decay[:, t, :, None, None]) * W + gates.lr[:, t, :, None, None] * outer
        torch.testing.assert_close(y[:, t], (W @ q[:, t, :, :, None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(final.weights[0], W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("impl", [recurrent, chunked])
def test_titans_by_hand(impl, chunk_size):
    """TITANS with the MLP written out (DESIGN's pinned update): every token's gradient at the chunk-start
    weights (W_{t−1} at chunk 1), then momentum, then decay, then the read; 7 tokens: a partial last chunk."""
    q, k, v, gates, state = make_inputs(TITANS, batch=1, tokens=7, heads=2, dim=3)
    y, final = impl(TITANS, q, k, v, gates, state, chunk_size)
    W = [w.clone() for w in state.weights]
    S = [s.clone() for s in state.momentum]

    def mlp(W, x):  # x [B, H, D]
        h = F.gelu(torch.einsum("bhoi,bhi->bho", W[0], x))
        return x + F.layer_norm(torch.einsum("bhoi,bhi->bho", W[1], h), (x.shape[-1],), eps=1e-5)

    for t in range(7):
        if t % chunk_size == 0:
            start = [w.clone() for w in W]  # the chunk-start weights every gradient of the chunk is taken at
        W0 = [w.clone().requires_grad_() for w in start]
        loss = 0.5 * ((mlp(W0, k[:, t]) - v[:, t]) ** 2).sum()
        grads = torch.autograd.grad(loss, W0)
        eta, theta, alpha = (g[:, t, :, None, None] for g in (gates.momentum, gates.lr, gates.decay))
        S = [eta * s - theta * g for s, g in zip(S, grads)]
        W = [(1 - alpha) * w + s for w, s in zip(W, S)]
        torch.testing.assert_close(y[:, t], mlp(W, q[:, t]), rtol=0, atol=1e-12)
    for a, b in zip(final.weights + final.momentum, W + S):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["titans", "deltanet"])
def test_read_after_write(name):
    """The last output is a read of the final state with the last query (y_t = M(W_t; q_t))."""
    rule = PRESETS[name]
    q, k, v, gates, state = make_inputs(rule, tokens=7)
    y, final = chunked(rule, q, k, v, gates, state, 4)
    torch.testing.assert_close(read(rule, final, q[:, -1:]), y[:, -1:], rtol=0, atol=1e-12)


def _stream(impl, rule, q, k, v, gates, state, chunk_size, cuts):
    outputs, bounds = [], [0, *cuts, q.shape[1]]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        y, state = impl(rule, q[:, start:stop], k[:, start:stop], v[:, start:stop], gates.slice(start, stop), state,
                        chunk_size)
        outputs.append(y)
    return torch.cat(outputs, 1), state


@pytest.mark.parametrize("impl", [recurrent, chunked])
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("cuts", [[3, 10, 11], list(range(1, 23))], ids=["segments", "token-by-token"])
def test_streaming_is_exact(impl, name, cuts):
    """Any split into calls, with the state carried (mid-chunk too), equals one call."""
    rule = PRESETS[name]
    q, k, v, gates, state = make_inputs(rule, tokens=23)
    y, final = chunked(rule, q, k, v, gates, state, 5)
    y_stream, final_stream = _stream(impl, rule, q, k, v, gates, state, 5, cuts)
    torch.testing.assert_close(y_stream, y, rtol=0, atol=1e-11)
    assert final_stream.position == final.position == 3
    for a, b in zip(final_stream.tensors(), final.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_streaming_gradients_match_one_call():
    rule = TITANS
    q, k, v, gates, state = make_inputs(rule, tokens=11, requires_grad=True)
    y, final = chunked(rule, q, k, v, gates, state, 4)
    y_stream, _ = _stream(chunked, rule, q, k, v, gates, state, 4, [2, 7])
    cotangent = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    named = leaves(q, k, v, gates, state)
    g_one = torch.autograd.grad((y * cotangent).sum(), [t for _, t in named])
    g_stream = torch.autograd.grad((y_stream * cotangent).sum(), [t for _, t in named])
    for (name, _), a, b in zip(named, g_stream, g_one):
        assert_close(a, b, name)


def test_float32_close_to_float64():
    q, k, v, gates, state = make_inputs(TITANS, batch=2, tokens=100, heads=2, dim=8)
    y64, s64 = chunked(TITANS, q, k, v, gates, state, 16)
    single = lambda x: x.float()  # noqa: E731
    gates32 = Gates(**{n: single(g) for n, g in gates.present().items()})
    state32 = MemoryState(tuple(map(single, state.weights)), tuple(map(single, state.momentum)))
    y32, s32 = chunked(TITANS, single(q), single(k), single(v), gates32, state32, 16)
    # The inner problem amplifies rounding (LayerNorm of small vectors, momentum near 1): the float32
    # reference itself is ~2e-4 off float64 here; the fast path must stay within a few times that.
    torch.testing.assert_close(y32.double(), y64, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(s32.weights[0].double(), s64.weights[0], rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("batch,tokens,chunk_size,span,tol", [(1, 512, 16, None, 1e-4), (2, 64, 8, 8, 1e-5)],
                         ids=["chunk loop", "span form"])
def test_bf16_autocast_reads_low_writes_full_precision(batch, tokens, chunk_size, span, tol):
    """Under bf16 autocast the state stays at float32 accuracy (the write path is not autocast);
    only the reads are bf16. With bf16 writes, 1K tokens leave the state ~17% off float64. The span
    form (memory/span.py) keeps the same split."""
    q, k, v, _, state = make_inputs(TITANS, batch=batch, tokens=tokens, heads=2, dim=16)
    gates = Gates(**{name: torch.full(q.shape[:3], value, dtype=q.dtype)
                     for name, value in (("lr", 0.1), ("momentum", 0.9), ("decay", 0.01))})
    y64, s64 = chunked(TITANS, q, k, v, gates, state, chunk_size, span=1)
    single = lambda x: x.float()  # noqa: E731
    gates32 = Gates(**{n: single(g) for n, g in gates.present().items()})
    state32 = MemoryState(tuple(map(single, state.weights)), tuple(map(single, state.momentum)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = chunked(TITANS, single(q), single(k), single(v), gates32, state32, chunk_size, span=span)
    for a, b in zip(s.weights + s.momentum, s64.weights + s64.momentum):
        assert a.dtype == torch.float32
        assert (a.double() - b).norm() / b.norm() < tol
    assert (y.double() - y64).norm() / y64.norm() < 0.01


def _single(q, k, v, gates: Gates, state: MemoryState) -> tuple:
    """The inputs in float32."""
    momentum = None if state.momentum is None else tuple(s.float() for s in state.momentum)
    return (q.float(), k.float(), v.float(), Gates(**{n: g.float() for n, g in gates.present().items()}),
            MemoryState(tuple(w.float() for w in state.weights), momentum))


@pytest.mark.parametrize("rule", [TITANS, YAAD, MEMORA, MONETA, LONGHORN], ids=["titans", "yaad", "memora", "moneta",
                                                                             "longhorn"])
def test_recurrent_under_bf16_autocast_writes_in_full_precision_as_chunked_does(rule):
    """The reference too keeps its write path (inner gradients, state update) out of autocast and returns the
    inputs' dtype: before, its bf16 inner gradients left outputs 23-110% off float64 within 37 tokens."""
    q, k, v, gates, state = make_inputs(rule, batch=2, tokens=37, heads=2, dim=8)
    y64, s64 = recurrent(rule, q, k, v, gates, state, 8)
    inputs32 = _single(q, k, v, gates, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = recurrent(rule, *inputs32, 8)
        y_chunked, _ = chunked(rule, *inputs32, 8)
    assert y.dtype == y_chunked.dtype == torch.float32
    for a, b in zip(s.weights, s64.weights):  # the state: float32 accuracy, no bf16 in the write path
        assert a.dtype == torch.float32 and (a.double() - b).norm() / b.norm() < 1e-4
    error = (y.double() - y64).norm() / y64.norm()
    assert error < 0.05 and error < 4 * (y_chunked.double() - y64).norm() / y64.norm() + 1e-3


def test_memora_reads_in_full_precision_under_autocast():
    """Memora's rows sit on the simplex: its last layer's output is nearly constant across features and the
    layer norm after it amplified a bf16 read's rounding (7.5e-2 against Titans' 6.5e-3); it reads in float32."""
    q, k, v, gates, state = make_inputs(MEMORA, batch=2, tokens=37, heads=2, dim=8)
    y64, _ = recurrent(MEMORA, q, k, v, gates, state, 8)
    inputs32 = _single(q, k, v, gates, state)
    y32, _ = chunked(MEMORA, *inputs32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for run in (chunked, recurrent):
            y, _ = run(MEMORA, *inputs32, 8)
            assert (y - y32).abs().max() < 1e-4, run.__name__  # as float32: no bf16 read
    assert (y32.double() - y64).abs().max() < 1e-4


def test_no_retention_and_padding_edge():
    """T < chunk and T = 1 give the same as chunk 1 for a rule whose gradient ignores W (Hebbian)."""
    rule = MemoryRule(LinearMemory(), DotProduct(), NoRetention(), GD())
    q, k, v, gates, state = make_inputs(rule, tokens=3)
    a, _ = chunked(rule, q, k, v, gates, state, 64)
    b, _ = recurrent(rule, q, k, v, gates, state, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_compiled_step_equals_eager():
    """chunked(compile=True): same outputs, state and gradients as the eager fast path."""
    rule = TITANS
    eager_out, eager_grads = run_with_grads(chunked, rule, make_inputs(rule, tokens=11, requires_grad=True), 4)

    def compiled(*args):
        return chunked(*args, compile=True)

    out, grads = run_with_grads(compiled, rule, make_inputs(rule, tokens=11, requires_grad=True), 4)
    for i, (a, b) in enumerate(zip(out, eager_out)):
        assert_close(a, b, f"output {i}")
    for key in grads:
        assert_close(grads[key], eager_grads[key], f"d/d {key}")
    with pytest.raises(TypeError, match="compile must be a bool"):
        chunked(rule, *make_inputs(rule, tokens=3)[:4], None, 4, compile="yes")


@pytest.mark.parametrize("name", ["titans", "mamba2"])
def test_saturated_gates_give_finite_gradients(name):
    """α = 1 and η = 0 exactly (a saturated sigmoid in float32) must not produce NaN gradients."""
    rule = PRESETS[name]
    q, k, v, gates, state = make_inputs(rule, tokens=9, dtype=torch.float32, requires_grad=True)
    saturated = {n: g.detach().clone() for n, g in gates.present().items()}
    saturated["decay"][:, 3] = 1.0
    if "momentum" in saturated:
        saturated["momentum"][:, 5] = 0.0
    saturated = {n: g.requires_grad_() for n, g in saturated.items()}
    y, final = chunked(rule, q, k, v, Gates(**saturated), state, 4)
    (y.sum() + final.weights[0].sum()).backward()
    for name_, tensor in [("q", q), ("k", k), ("v", v), *saturated.items()]:
        assert torch.isfinite(tensor.grad).all(), name_
    y_ref, _ = recurrent(rule, q, k, v, Gates(**saturated), state, 4)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["titans", "moneta", "gated-deltanet"])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_recompute_gives_the_same_values_and_gradients(name, group):
    """chunked(recompute=G) keeps only the state between groups of G chunks for backward and
    recomputes the rest: identical outputs, state and gradients (here from a state left mid-chunk,
    with a partial last chunk: 2 + 19 tokens at chunk 4)."""
    rule = PRESETS[name]
    q, k, v, gates, state = make_inputs(rule, tokens=21)
    _, mid = chunked(rule, q[:, :2], k[:, :2], v[:, :2], gates.slice(0, 2), state, 4)
    inputs = [x[:, 2:].clone().requires_grad_() for x in (q, k, v)]
    sliced = Gates(**{n: g[:, 2:].clone().requires_grad_() for n, g in gates.present().items()})
    start = mid.detach()
    for t in start.tensors():
        t.requires_grad_()
    results = []
    for recompute in (0, group):
        y, final = chunked(rule, *inputs, sliced, start, 4, recompute=recompute)
        loss = (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum() + sum(
            w.square().sum() for w in final.weights)
        grads = torch.autograd.grad(loss, [*inputs, *sliced.present().values(), *start.tensors()])
        results.append((y, final.tensors(), grads))
    (y0, s0, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-13)
    for a, b in zip(s1 + g1, s0 + g0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="recompute must be an integer >= 0"):
        chunked(rule, *inputs, sliced, start, 4, recompute=-1)
