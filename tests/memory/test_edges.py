"""Edges of the engine's contract: gates at their closed ends, second derivatives, expanded leaf states,
inference mode, autocast dtypes, and the rule fields' checks."""

import dataclasses
import math

import pytest
import torch

from miras.memory import (
    DELTANET,
    GATED_DELTANET,
    MAMBA2,
    TITANS,
    TTT_LINEAR,
    TTT_MLP,
    Gates,
    Lp,
    LqNormalize,
    MemoryRule,
    MemoryState,
    MLPMemory,
    chunked,
    delta,
    read,
    recurrent,
)

from .helpers import make_inputs


@pytest.mark.parametrize("rule, gate, value", [(TITANS, "momentum", 0.0), (TITANS, "decay", 1.0),
                                               (MAMBA2, "decay", 1.0)])
def test_both_paths_agree_on_gradients_at_a_gates_closed_end(rule, gate, value):
    """η = 0 or α = 1 exactly: both paths take the gate one eps inside its range (the chunk algebra is
    in log space), so values agree and so do the gradients w.r.t. the gates, also token by token."""
    q, k, v, gates, state = make_inputs(rule, tokens=8)
    present = {n: g.clone() for n, g in gates.present().items()}
    present[gate][:, 2] = value

    def gate_grads(run):
        leaves = {n: g.clone().requires_grad_() for n, g in present.items()}
        y, final = run(Gates(**leaves))
        (y.square().sum() + final.weights[0].sum()).backward()
        return y.detach(), {n: g.grad for n, g in leaves.items()}

    def token_by_token(g):
        outputs, current = [], state
        for t in range(8):
            y, current = chunked(rule, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g.slice(t, t + 1), current, 4)
            outputs.append(y)
        return torch.cat(outputs, 1), current

    reference, reference_grads = gate_grads(lambda g: recurrent(rule, q, k, v, g, state, 4))
    for run in (lambda g: chunked(rule, q, k, v, g, state, 4), token_by_token):
        y, grads = gate_grads(run)
        torch.testing.assert_close(y, reference, rtol=0, atol=1e-12)
        for name in grads:
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=0, atol=1e-10)


def test_second_derivatives_equal_the_reference_or_are_refused():
    """The autograd path differentiates twice like the reference; the fused backward (recompute) is
    first-order only and refuses a second backward instead of returning wrong numbers."""
    q, k, v, gates, state = make_inputs(TTT_MLP, tokens=8, heads=1, dim=3)

    def second(run):
        q_, v_ = q.clone().requires_grad_(), v.clone().requires_grad_()
        y, _ = run(q_, v_)
        (grad_q,) = torch.autograd.grad(y.square().sum(), q_, create_graph=True)
        return torch.autograd.grad(grad_q.square().sum(), v_)[0]

    reference = second(lambda q_, v_: recurrent(TTT_MLP, q_, k, v_, gates, state, 2))
    fast = second(lambda q_, v_: chunked(TTT_MLP, q_, k, v_, gates, state, 2, fused=False))
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):  # autograd.grad: no path
        second(lambda q_, v_: chunked(TTT_MLP, q_, k, v_, gates, state, 2, recompute=1))
    q_ = q.clone().requires_grad_()
    y, _ = chunked(TTT_MLP, q_, k, v, gates, state, 2, recompute=1)
    (grad_q,) = torch.autograd.grad(y.square().sum(), q_, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # backward(): the marked node refuses
        grad_q.square().sum().backward()


def test_an_expanded_leaf_state_gets_a_gradient_per_row():
    """A state whose weights are one tensor expanded over the batch (stride 0), itself the leaf: the
    chunked path and read give each row its own gradient, as the reference does."""
    q, k, v, gates, _ = make_inputs(TTT_LINEAR, batch=3, tokens=8)
    base = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scale = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:, None, None, None]

    def grad(run):
        w = base.expand(3, 3, 4, 4).requires_grad_()
        (run(MemoryState((w,))) * scale).sum().backward()
        return w.grad

    reference = grad(lambda s: recurrent(TTT_LINEAR, q, k, v, gates, s, 4)[0])
    assert not torch.allclose(reference[1], torch.zeros_like(reference[1]))
    torch.testing.assert_close(grad(lambda s: chunked(TTT_LINEAR, q, k, v, gates, s, 4)[0]), reference,
                               rtol=0, atol=1e-12)
    by_hand = grad(lambda s: read(TTT_LINEAR, MemoryState((s.weights[0].expand(3, 3, 4, 4) * 1.0,)), q))
    torch.testing.assert_close(grad(lambda s: read(TTT_LINEAR, s, q)), by_hand, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["span", "chunk loop", "read"])
def test_an_expanded_state_that_is_not_a_leaf_gets_a_gradient_per_row(path):
    """MemoryLayer.init_state's weights: a parameter expanded over the batch (stride 0, not a leaf). The
    gradient w.r.t. the expanded tensor itself is one per row, as the reference gives it (the span form
    and read multiply the shared weights once; they once put every row's gradient in row 0)."""
    q, k, v, gates, state = make_inputs(TITANS, batch=3, tokens=9)
    bases = [w[0].clone().requires_grad_() for w in state.weights]
    # a random projection of the outputs (their plain sum is ~0: the memory ends in a layer norm)
    projection = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(run):
        weights = tuple(base.unsqueeze(0).expand(3, *base.shape) for base in bases)
        momentum = tuple(torch.zeros(w.shape, dtype=w.dtype) for w in weights)
        y = run(MemoryState(weights, momentum))
        return torch.autograd.grad((y * projection).sum(), weights)

    if path == "read":
        def fast(s):
            return read(TITANS, s, q)

        def slow(s):
            return read(TITANS, MemoryState(tuple(w.contiguous() for w in s.weights)), q)
    else:
        def fast(s):
            return chunked(TITANS, q, k, v, gates, s, 4, span=None if path == "span" else 1)[0]

        def slow(s):
            return recurrent(TITANS, q, k, v, gates, s, 4)[0]
    expected = grads(slow)
    assert all(g[1].abs().max() > 1e-3 for g in expected)  # every row has its own, non-zero gradient
    for got, want in zip(grads(fast), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_a_shared_start_state_reads_under_bf16_autocast_as_a_copy_does():
    """The shared product runs in the autocast dtype and returns gradients in the inputs' dtypes."""
    q, k, v, gates, state = make_inputs(TITANS, batch=3, tokens=9, dtype=torch.float32)
    bases = [w[0].clone().requires_grad_() for w in state.weights]
    projection = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for copy in (False, True):
        weights = tuple(b.unsqueeze(0).expand(3, *b.shape) for b in bases)
        weights = tuple(w.contiguous() for w in weights) if copy else weights
        q_ = q.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = read(TITANS, MemoryState(weights), q_)
        grads = torch.autograd.grad((y.float() * projection).sum(), [q_, *bases])
        results.append((y, grads))
    (y_shared, g_shared), (y_copy, g_copy) = results
    assert y_shared.dtype == y_copy.dtype
    torch.testing.assert_close(y_shared, y_copy, rtol=0, atol=0)
    for a, b in zip(g_shared, g_copy):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _slice(gates: Gates, start: int, stop: int) -> Gates:
    return Gates(**{name: gate[:, start:stop] for name, gate in gates.present().items()})


@pytest.mark.parametrize("transpose", [True, False])
def test_the_shared_product_differentiates_as_the_plain_matmul(transpose):
    """shared_matmul on weights expanded over the batch: first and second derivatives (gradcheck), and
    torch.func's grad, jvp and vmap, equal the plain matmul; under autocast it is the plain matmul (a
    float64 operand stays float64)."""
    from miras.memory.architectures import shared_matmul

    gen = torch.Generator().manual_seed(0)
    shape = (2, 5, 6) if transpose else (2, 6, 5)
    base = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(3, 2, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)

    def shared(u, base):
        return shared_matmul(u, base.unsqueeze(0).expand(3, *base.shape), transpose=transpose)

    def plain(u, base):
        return torch.matmul(u, base.transpose(-1, -2) if transpose else base)

    assert torch.autograd.gradcheck(shared, (u, base)) and torch.autograd.gradgradcheck(shared, (u, base))
    values = (u.detach(), base.detach())
    for fn in (lambda f: torch.func.grad(lambda *x: f(*x).square().sum(), argnums=(0, 1))(*values),
               lambda f: torch.func.jvp(f, values, (torch.ones_like(values[0]), torch.ones_like(values[1])))[1],
               lambda f: torch.func.vmap(lambda x: f(x, values[1]))(torch.stack([values[0], 2 * values[0]]))):
        got, want = fn(shared), fn(plain)
        for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shared(u, base).dtype == torch.float64


@pytest.mark.parametrize("path", [chunked, recurrent])
def test_a_state_left_mid_chunk_continues_only_at_its_chunk_size(path):
    """A state records the chunk size it was left inside; another one (larger too) would compute neither
    call's result, so it is an error that names the right one. delta (chunk 1) says to use chunked."""
    q, k, v, gates, state = make_inputs(DELTANET, tokens=20)
    _, mid = path(DELTANET, q[:, :13], k[:, :13], v[:, :13], _slice(gates, 0, 13), state, 8)
    assert (mid.position, mid.chunk_size) == (5, 8)
    rest = (q[:, 13:], k[:, 13:], v[:, 13:], _slice(gates, 13, 20))
    for other in (6, 16):
        with pytest.raises(ValueError, match=f"left 5 tokens into a chunk of 8; continue it with chunk_size=8, got "
                                             f"{other}"):
            path(DELTANET, *rest, mid, other)
    with pytest.raises(ValueError, match="delta continues states at a chunk boundary .* left 5 tokens into a chunk "
                                         "of 8: continue it with chunked or recurrent"):
        delta(DELTANET, *rest, mid)
    expected, _ = recurrent(DELTANET, q, k, v, gates, state, 8)
    torch.testing.assert_close(path(DELTANET, *rest, mid, 8)[0], expected[:, 13:], rtol=0, atol=1e-12)
    # a boundary records none; the detached, moved and saved forms keep it
    assert path(DELTANET, q[:, :16], k[:, :16], v[:, :16], _slice(gates, 0, 16), state, 8)[1].chunk_size == 0
    assert mid.detach().chunk_size == mid.to(torch.float32).chunk_size == 8


def test_a_state_s_counts_and_retention_product_are_checked():
    q, k, v, gates, state = make_inputs(GATED_DELTANET, tokens=6)
    _, mid = chunked(GATED_DELTANET, q[:, :3], k[:, :3], v[:, :3], _slice(gates, 0, 3), state, 4)
    rest = (q[:, 3:], k[:, 3:], v[:, 3:], _slice(gates, 3, 6))
    for field, value, message in [("position", True, r"state.position must be an integer >= 0 .*got True"),
                                  ("chunk_size", -1, r"state.chunk_size must be an integer >= 0 .*got -1"),
                                  ("retained", mid.retained * 3, r"state.retained .* must be in \[0, 1\]"),
                                  ("retained", mid.retained - 2, r"state.retained .* must be in \[0, 1\]"),
                                  ("weights", list(mid.weights), "state.weights, .* must be tuples of tensors")]:
        with pytest.raises((ValueError, TypeError), match=message):
            chunked(GATED_DELTANET, *rest, dataclasses.replace(mid, **{field: value}), 4)

    # Strong forgetting underflows the product to 0 in float32 within a chunk: the state continues as one
    # call would (decay 1 is taken one float eps inside, and eps**12 is below float32's smallest number)
    q, k, v, gates, state = make_inputs(GATED_DELTANET, tokens=16, dtype=torch.float32)
    gates = dataclasses.replace(gates, decay=torch.ones_like(gates.decay))
    expected, _ = chunked(GATED_DELTANET, q, k, v, gates, state, 16)
    _, mid = chunked(GATED_DELTANET, q[:, :12], k[:, :12], v[:, :12], _slice(gates, 0, 12), state, 16)
    assert mid.retained.max() == 0
    got, _ = chunked(GATED_DELTANET, q[:, 12:], k[:, 12:], v[:, 12:], _slice(gates, 12, 16), mid, 16)
    torch.testing.assert_close(got, expected[:, 12:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", [DELTANET, TITANS])
def test_the_reference_runs_in_inference_mode(rule):
    q, k, v, gates, state = make_inputs(rule, tokens=7)
    with torch.no_grad():
        expected, expected_state = recurrent(rule, q, k, v, gates, state, 3)
    with torch.inference_mode():
        y, final = recurrent(rule, q, k, v, gates, state, 3)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for a, b in zip(final.weights, expected_state.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rule", [DELTANET, MAMBA2, TITANS])
def test_one_token_and_a_chunk_return_the_same_dtype_under_autocast(rule):
    """Decoding (one token) and prefill (the chunk loop) give outputs of one dtype under bf16 autocast."""
    q, k, v, gates, state = make_inputs(rule, tokens=5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = {chunked(rule, q[:, :n], k[:, :n], v[:, :n], gates.slice(0, n), state, 4)[0].dtype for n in (1, 2, 5)}
    assert dtypes == {torch.float32}


def test_rule_fields_are_checked():
    with pytest.raises(ValueError, match="LqNormalize q must be finite, got inf"):
        LqNormalize(q=math.inf)
    with pytest.raises(ValueError, match="LqNormalize power must be finite, got nan"):
        LqNormalize(power=math.nan)
    with pytest.raises(ValueError, match="LqNormalize needs power > 0, got 0"):
        LqNormalize(power=0)
    with pytest.raises(TypeError, match="Lp p must be a number, got '3'"):
        Lp(p="3")
    assert Lp(p=1.0).p == 1.0  # the smooth ℓ1 is allowed
    with pytest.raises(ValueError, match=r"Lp needs p >= 1, got 0.5"):
        Lp(p=0.5)
    with pytest.raises(ValueError, match=r"Lp needs eps > 0 \(the smooth \|x\| = sqrt\(x\^2 \+ eps\)\), got 0.0"):
        Lp(eps=0.0)
    with pytest.raises(TypeError, match="MLPMemory expansion must be an integer, got 1.5"):
        MLPMemory(expansion=1.5)
    with pytest.raises(TypeError, match="MLPMemory depth must be an integer, got '3'"):
        MemoryRule.from_dict({**TITANS.to_dict(), "architecture": {"kind": "mlp", "depth": "3"}})
    assert callable(delta)  # the exact online delta rule is exported as the function


@pytest.mark.parametrize("impl", ["recurrent", "chunked", "delta"])
def test_an_empty_call_returns_no_outputs_and_the_state_as_it_was(impl):
    """A stream may be cut anywhere, an empty piece too, as the model and the layer take one (the engine
    refused T = 0); mid-chunk, the state's chunk position is kept."""
    rule = DELTANET if impl == "delta" else TITANS
    run = {"recurrent": recurrent, "chunked": chunked,
           "delta": lambda *a: delta(*a[:-1], block_size=4)}[impl]
    chunk = 1 if impl == "delta" else 4
    q, k, v, gates, state = make_inputs(rule, tokens=11)
    whole, final = run(rule, q, k, v, gates, state, chunk)
    first, mid = run(rule, q[:, :6], k[:, :6], v[:, :6], gates.slice(0, 6), state, chunk)
    empty, same = run(rule, q[:, 6:6], k[:, 6:6], v[:, 6:6], gates.slice(6, 6), mid, chunk)
    assert empty.shape == (2, 0, 3, 4) and same is mid
    rest, end = run(rule, q[:, 6:], k[:, 6:], v[:, 6:], gates.slice(6, 11), same, chunk)
    torch.testing.assert_close(torch.cat([first, empty, rest], 1), whole, rtol=0, atol=1e-12)
    for a, b in zip(end.weights, final.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    fresh, start = run(rule, q[:, :0], k[:, :0], v[:, :0], gates.slice(0, 0), None, chunk)
    assert fresh.shape == (2, 0, 3, 4) and start.position == 0


@pytest.mark.parametrize("impl", ["recurrent", "chunked", "delta"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_a_non_finite_query_key_or_value_is_refused(impl, name):
    """Refused in every path, where it is: in the chunked dual form a NaN key at token 5 made the outputs of
    tokens 0-4 of its chunk NaN too (masked products: 0 x NaN is NaN), where the reference kept them."""
    from miras.memory.state import InputRangeError

    rule = DELTANET if impl == "delta" else TITANS
    run = {"recurrent": recurrent, "chunked": chunked, "delta": lambda *a: delta(*a[:-1], block_size=4)}[impl]
    q, k, v, gates, state = make_inputs(rule, tokens=11)
    inputs = {"q": q, "k": k, "v": v}
    inputs[name] = inputs[name].clone()
    inputs[name][1, 5, 2, 0] = math.inf if name == "v" else math.nan
    with pytest.raises(InputRangeError, match=rf"^{name} must be finite, got NaN or inf at \[batch, token, head\] = "
                                              r"\[1, 5, 2\]$"):
        run(rule, *inputs.values(), gates, state, 1 if impl == "delta" else 4)
