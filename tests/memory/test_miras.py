"""The MIRAS axis values (Lp, Huber, LqNormalize, KLSoftmax, ElasticNet, PreDecay, ImplicitGD), their
presets, and the exact blockwise delta rule: fast path == reference, chunk 1 == the papers' online rules."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from miras.layers import MemoryLayer
from miras.memory import (
    DELTANET,
    GATED_DELTANET,
    GD,
    L2,
    LONGHORN,
    MEMORA,
    MONETA,
    RETNET,
    TITANS,
    YAAD,
    Decay,
    ElasticNet,
    Gates,
    Huber,
    ImplicitGD,
    LinearMemory,
    Lp,
    LqNormalize,
    MemoryRule,
    MemoryState,
    MLPMemory,
    Momentum,
    PreDecay,
    chunked,
    read,
    recurrent,
)
from miras.memory.delta import delta

from .helpers import assert_close, make_inputs, run_with_grads

MLP = MLPMemory(depth=2, expansion=4)
# Axis values no preset uses, and the alternative forms of those presets use.
EXTRA_RULES = {
    "huber-coordinate": MemoryRule(MLP, Huber(per="coordinate"), Decay(), GD()),
    "elastic-net": MemoryRule(MLP, L2(), ElasticNet(gamma=0.05), GD()),
    "lq-linear-momentum": MemoryRule(LinearMemory(), L2(), LqNormalize(q=3.0), Momentum()),
    "predecay-momentum": MemoryRule(LinearMemory(), L2(), PreDecay(), Momentum()),
    "huber-linear": MemoryRule(LinearMemory(), Huber(), Decay(), GD()),
    # MIRAS Eq. 24's unnormalised state
    "lq-carry-a-mlp": MemoryRule(MLP, L2(), LqNormalize(carry="A"), GD()),
    "lq-carry-a-linear-momentum": MemoryRule(LinearMemory(), Lp(p=3.0), LqNormalize(q=3.0, carry="A"), Momentum()),
}


@pytest.mark.parametrize("name", sorted(EXTRA_RULES))
@pytest.mark.parametrize("chunk_size,tokens", [(1, 9), (4, 13), (5, 5), (16, 37)])
def test_chunked_equals_recurrent_extra_rules(name, chunk_size, tokens):
    rule = EXTRA_RULES[name]
    ref_out, ref_grads = run_with_grads(recurrent, rule, make_inputs(rule, tokens=tokens, requires_grad=True),
                                        chunk_size)
    out, grads = run_with_grads(chunked, rule, make_inputs(rule, tokens=tokens, requires_grad=True), chunk_size)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, f"output {i}")
    for key in grads:
        assert_close(grads[key], ref_grads[key], f"d/d {key}")


DELTA_RULES = {"deltanet": DELTANET, "gated-deltanet": GATED_DELTANET, "longhorn": LONGHORN,
               "titans-order": MemoryRule(LinearMemory(), L2(), Decay(), GD())}


@pytest.mark.parametrize("name", sorted(DELTA_RULES))
@pytest.mark.parametrize("block_size,tokens", list(itertools.product([1, 4, 16, 64], [1, 13, 37])))
def test_delta_equals_online_recurrence(name, block_size, tokens):
    """The blockwise WY/UT path is the online rule (chunk 1) at every block size: outputs, state, gradients."""
    rule = DELTA_RULES[name]
    ref_out, ref_grads = run_with_grads(recurrent, rule, make_inputs(rule, tokens=tokens, requires_grad=True), 1)
    out, grads = run_with_grads(lambda *a: delta(*a[:-1], block_size=block_size), rule,
                                make_inputs(rule, tokens=tokens, requires_grad=True), 1)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, f"output {i}")
    for key in grads:
        assert_close(grads[key], ref_grads[key], f"d/d {key}")
        assert ref_grads[key].abs().max() > 0, key


@pytest.mark.parametrize("name", sorted(DELTA_RULES))
def test_delta_in_bfloat16_solves_in_float32_and_stays_near_the_online_rule(name):
    """torch has no half-precision triangular solve: bf16 inputs solve their block systems in float32 and come
    back in bf16, within bf16's rounding of the float64 online rule."""
    rule = DELTA_RULES[name]
    q, k, v, gates, state = make_inputs(rule, tokens=37)
    reference, final = recurrent(rule, q, k, v, gates, state, 1)
    half = Gates(**{n: getattr(gates, n).bfloat16() for n in ("lr", *rule.needed_gates())})
    y, low = delta(rule, q.bfloat16(), k.bfloat16(), v.bfloat16(), half,
                   MemoryState(tuple(w.bfloat16() for w in state.weights)), block_size=16)
    assert y.dtype == low.weights[0].dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (y.double() - reference).abs().max() < 0.02 * scale  # (measured: 0.7-0.9%)
    assert (low.weights[0].double() - final.weights[0]).abs().max() < 0.02 * final.weights[0].abs().max()


def test_delta_streams_and_rejects_other_rules():
    q, k, v, gates, state = make_inputs(GATED_DELTANET, tokens=23)
    y, final = delta(GATED_DELTANET, q, k, v, gates, state, 8)
    pieces, carried = [], state
    for start, stop in [(0, 3), (3, 4), (4, 19), (19, 23)]:
        y_n, carried = delta(GATED_DELTANET, q[:, start:stop], k[:, start:stop], v[:, start:stop],
                             gates.slice(start, stop), carried, 8)
        pieces.append(y_n)
    torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(carried.weights[0], final.weights[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="delta computes LinearMemory"):
        delta(TITANS, *make_inputs(TITANS, tokens=3)[:4])
    with pytest.raises(ValueError, match="block_size must be an integer"):
        delta(DELTANET, *make_inputs(DELTANET, tokens=3)[:4], block_size=0)


IMPLS = {"recurrent": recurrent, "chunked": chunked, "delta": lambda *a: delta(*a[:-1], block_size=4)}


def _by_hand(rule, impls, update, tokens=11, seed=0):
    """Run ``rule`` at chunk 1 through each impl and compare every output and the final state with the
    online ``update(W, t, q, k, v, gates) -> W`` written out token by token (y_t = M(W_t; q_t))."""
    q, k, v, gates, state = make_inputs(rule, batch=2, tokens=tokens, heads=2, dim=4, seed=seed)
    W = [w.clone() for w in state.weights]
    expected = []
    for t in range(tokens):
        W = update(W, t, q, k, v, gates)
        expected.append(_apply(rule, W, q[:, t]))
    for name in impls:
        y, final = IMPLS[name](rule, q, k, v, gates, state, 1)
        for t in range(tokens):
            torch.testing.assert_close(y[:, t], expected[t], rtol=0, atol=1e-11, msg=f"{name} token {t}")
        for a, b in zip(final.weights, W):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


def _apply(rule, W, x):  # x [B, H, D]
    if isinstance(rule.architecture, LinearMemory):
        return torch.einsum("bhoi,bhi->bho", W[0], x)
    h = F.gelu(torch.einsum("bhoi,bhi->bho", W[0], x))
    return x + F.layer_norm(torch.einsum("bhoi,bhi->bho", W[1], h), (x.shape[-1],), eps=1e-5)


def _col(g, t):
    return g[:, t, :, None, None]


def test_gated_deltanet_by_hand():
    """S_t = a_t S_{t−1} (I − θ_t k kᵀ) + θ_t v kᵀ (Yang et al. 2025; [Dv, Dk] layout), a = 1 − α."""
    def update(W, t, q, k, v, gates):
        kt, vt = k[:, t, :, :, None], v[:, t, :, :, None]
        a, theta = 1 - _col(gates.decay, t), _col(gates.lr, t)
        eye = torch.eye(kt.shape[-2], dtype=kt.dtype)
        return [a * W[0] @ (eye - theta * kt @ kt.transpose(-1, -2)) + theta * vt @ kt.transpose(-1, -2)]

    _by_hand(GATED_DELTANET, ["recurrent", "chunked", "delta"], update)


def test_longhorn_by_hand():
    """Implicit GD: W_t = W − θ/(1 + θ‖k‖²) (W k − v) kᵀ (MIRAS Table 1)."""
    def update(W, t, q, k, v, gates):
        kt, vt, theta = k[:, t, :, :, None], v[:, t, :, :, None], _col(gates.lr, t)
        step = theta / (1 + theta * (kt * kt).sum((-2, -1), keepdim=True))
        return [W[0] - step * (W[0] @ kt - vt) @ kt.transpose(-1, -2)]

    _by_hand(LONGHORN, ["recurrent", "chunked", "delta"], update)


def test_retnet_by_hand():
    """RetNet: M_t = γ M_{t−1} + v kᵀ with a fixed γ per head (the Mamba2 rule with constant gates)."""
    q, k, v, _, state = make_inputs(RETNET, batch=1, tokens=9, heads=3, dim=4)
    gamma = 1 - 2.0 ** (-5 - torch.arange(3, dtype=q.dtype))
    gates = Gates(lr=torch.ones(1, 9, 3, dtype=q.dtype), decay=(1 - gamma).expand(1, 9, 3))
    y, final = chunked(RETNET, q, k, v, gates, state, 4)
    W = state.weights[0].clone()
    for t in range(9):
        W = gamma[None, :, None, None] * W + v[:, t, :, :, None] @ k[:, t, :, None, :]
        torch.testing.assert_close(y[:, t], (W @ q[:, t, :, :, None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(final.weights[0], W, rtol=0, atol=1e-12)


def _gradient(rule, W, kt, vt, loss_fn):
    W0 = [w.clone().requires_grad_() for w in W]
    return torch.autograd.grad(loss_fn(_apply(rule, W0, kt) - vt).sum(), W0)


def test_moneta_by_hand():
    """A = (1 − α) W − θ ∇ Σ|e|_ε³ at W, then W = A / ‖A‖_4 per matrix: the state kept normalised, not
    MIRAS Eq. 24's unnormalised A (the next test)."""
    def update(W, t, q, k, v, gates):
        grads = _gradient(MONETA, W, k[:, t], v[:, t], lambda e: (e * e + 1e-6).pow(1.5).sum(-1))
        A = [(1 - _col(gates.decay, t)) * w - _col(gates.lr, t) * g for w, g in zip(W, grads)]
        return [a / a.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25) for a in A]

    _by_hand(MONETA, ["recurrent", "chunked"], update)


def test_moneta_is_eq24_with_each_step_scaled_by_the_running_norm():
    """What LqNormalize's docstring says it is, against MIRAS Eq. 24 written out (linear memory, float64):
    Eq. 24 carries A_t = (1 − α_t) A_{t−1} − θ_t ∇ℓ(W_{t−1}), W_t = A_t / ‖A_t‖_4. The library carries W
    only, and equals Eq. 24 once each step θ_t is divided by ‖A_{t−1}‖_4; with θ_t itself it does not."""
    import dataclasses

    rule = MemoryRule(LinearMemory(), MONETA.bias, LqNormalize(q=4.0), GD())
    tokens = 12
    q, k, v, gates, state = make_inputs(rule, batch=2, tokens=tokens, heads=2, dim=4, seed=3)
    start = state.weights[0] / state.weights[0].abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25)
    state = MemoryState((start,), None)
    A, W, expected, norms = start, start, [], []
    for t in range(tokens):
        norms.append(A.abs().pow(4).sum((-2, -1)).pow(0.25))  # ‖A_{t−1}‖_4 [B, H]
        (g,) = _gradient(rule, [W], k[:, t], v[:, t], lambda e: (e * e + 1e-6).pow(1.5).sum(-1))
        A = (1 - _col(gates.decay, t)) * A - _col(gates.lr, t) * g
        W = A / A.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25)
        expected.append(_apply(rule, [W], q[:, t]))
    expected = torch.stack(expected, 1)
    scaled = dataclasses.replace(gates, lr=gates.lr / torch.stack(norms, 1))
    for impl in (recurrent, chunked):
        y, final = impl(rule, q, k, v, scaled, state, 1)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-11)
        torch.testing.assert_close(final.weights[0], W, rtol=0, atol=1e-11)
    assert max(abs(n - 1).max() for n in norms) > 0.05  # the running norm leaves 1: the scaling is not a no-op
    y, _ = recurrent(rule, q, k, v, gates, state, 1)
    assert (y - expected).abs().max() > 1e-3


@pytest.mark.parametrize("architecture", ["linear", "mlp"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_moneta_carrying_a_is_eq24(architecture, power):
    """LqNormalize(carry="A") at chunk 1 against MIRAS Eq. 24 written out: the state A_t = (1 − α_t) A_{t−1}
    − θ_t ∇ℓ_p(W_{t−1}) and the memory W_t = A_t / ‖A_t‖_4^power (power 2 = q − 2: as printed)."""
    memory = LinearMemory() if architecture == "linear" else MLP
    rule = MemoryRule(memory, MONETA.bias, LqNormalize(q=4.0, power=power, carry="A"), GD())
    tokens = 12
    q, k, v, gates, state = make_inputs(rule, batch=2, tokens=tokens, heads=2, dim=4, seed=5)
    gates = Gates(lr=0.1 * gates.lr, decay=gates.decay)  # MONETA's well-conditioned scale (tests/memory/helpers.py)

    def normalised(A):
        return [a / a.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25 * power) for a in A]

    A, expected = [w.clone() for w in state.weights], []
    for t in range(tokens):
        grads = _gradient(rule, normalised(A), k[:, t], v[:, t], lambda e: (e * e + 1e-6).pow(1.5).sum(-1))
        A = [(1 - _col(gates.decay, t)) * a - _col(gates.lr, t) * g for a, g in zip(A, grads)]
        expected.append(_apply(rule, normalised(A), q[:, t]))
    expected = torch.stack(expected, 1)
    for impl in (recurrent, chunked):
        y, final = impl(rule, q, k, v, gates, state, 1)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-11)
        for a, b in zip(final.weights, A):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
        # read() of the state is the memory W, not the raw A
        torch.testing.assert_close(read(rule, final, q[:, -1:]), expected[:, -1:], rtol=0, atol=1e-11)
    assert max((a.abs().pow(4).sum((-2, -1)).pow(0.25) - 1).abs().max() for a in A) > 0.05  # A is not unit
    default, _ = recurrent(MemoryRule(memory, MONETA.bias, LqNormalize(q=4.0, power=power), GD()),
                           q, k, v, gates, state, 1)
    assert (default - expected).abs().max() > 1e-3  # the default carries W: another rule


@pytest.mark.parametrize("architecture", ["linear", "mlp"])
def test_moneta_carrying_a_in_chunks_by_hand(architecture):
    """carry="A" at chunk 4 written out: gradients at W⁰ = A⁰/‖A⁰‖_4 for the whole chunk, A evolving linearly,
    the reads inside the chunk of A_t/‖A⁰‖_4 (the chunk-start norm), the chunk's last read of A_t/‖A_t‖_4;
    the call ends mid-chunk, and read() of that state reads as the chunk's own reads do."""
    memory = LinearMemory() if architecture == "linear" else MLP
    rule = MemoryRule(memory, MONETA.bias, LqNormalize(q=4.0, carry="A"), GD())
    tokens, chunk = 10, 4
    q, k, v, gates, state = make_inputs(rule, batch=2, tokens=tokens, heads=2, dim=4, seed=6)
    gates = Gates(lr=0.1 * gates.lr, decay=gates.decay)

    def norm(a):
        return a.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25)

    A, expected = [w.clone() for w in state.weights], []
    for t in range(tokens):
        if t % chunk == 0:
            start = A
        point = [a / norm(a) for a in start]
        grads = _gradient(rule, point, k[:, t], v[:, t], lambda e: (e * e + 1e-6).pow(1.5).sum(-1))
        A = [(1 - _col(gates.decay, t)) * a - _col(gates.lr, t) * g for a, g in zip(A, grads)]
        end = (t + 1) % chunk == 0
        expected.append(_apply(rule, [a / norm(a if end else s) for a, s in zip(A, start)], q[:, t]))
    expected = torch.stack(expected, 1)
    for impl in (recurrent, chunked):
        y, final = impl(rule, q, k, v, gates, state, chunk)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-11)
        assert final.position == 2
        for a, b in zip(final.weights, A):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
        inside = [a / norm(s) for a, s in zip(A, start)]
        torch.testing.assert_close(read(rule, final, q[:, :3]), torch.stack(
            [_apply(rule, inside, q[:, t]) for t in range(3)], 1), rtol=0, atol=1e-11)


@pytest.mark.parametrize("power", [1.0, 1.2, 2.0])
def test_a_matrix_memory_carrying_a_starts_where_its_norm_is_defined(power):
    """A / ‖A‖^power has no value at A = 0, so a linear memory carrying A starts random (the default state,
    and a MemoryLayer's learned start; a zero start made NaN from the first token), and a zero A given
    by hand reads as a zero memory, not 0/0."""
    rule = MemoryRule(LinearMemory(), MONETA.bias, LqNormalize(q=4.0, power=power, carry="A"), GD())
    q, k, v, gates, _ = make_inputs(rule, batch=2, tokens=10, heads=2, dim=4, seed=3)
    ys = [impl(rule, q, k, v, gates, None, 4)[0] for impl in (recurrent, chunked)]
    assert torch.isfinite(ys[0]).all() and ys[0].abs().max() > 1e-3
    torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=1e-11)
    layer = MemoryLayer(8, heads=2, rule=rule, chunk_size=4).double()
    assert all(w.abs().min() > 0 for w in layer.initial_weights)
    assert not LqNormalize(carry="W").nonzero_start and LqNormalize(carry="A").nonzero_start
    zero = MemoryState((torch.zeros(2, 2, 4, 4, dtype=torch.float64),))
    torch.testing.assert_close(read(rule, zero, q[:, :1]), torch.zeros_like(q[:, :1]), rtol=0, atol=0)


@pytest.mark.parametrize("cuts", [[3, 10, 11], list(range(1, 23))], ids=["segments", "token-by-token"])
def test_moneta_carrying_a_streams_exactly(cuts):
    """Mid-chunk calls keep the gradient point (the normalised chunk-start A) as their chunk start."""
    rule = EXTRA_RULES["lq-carry-a-mlp"]
    q, k, v, gates, state = make_inputs(rule, tokens=23)
    y, final = chunked(rule, q, k, v, gates, state, 5)
    for impl in (recurrent, chunked):
        outputs, s = [], state
        for a, b in zip([0, *cuts], [*cuts, 23]):
            out, s = impl(rule, q[:, a:b], k[:, a:b], v[:, a:b], gates.slice(a, b), s, 5)
            outputs.append(out)
        torch.testing.assert_close(torch.cat(outputs, 1), y, rtol=0, atol=1e-11)
        for a, b in zip(s.tensors(), final.tensors()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("per", ["token", "coordinate"])
def test_yaad_by_hand(per):
    """Yaad (Eq. 26 with δ in RMS units): the ℓ2 step if the error is within δ_t, else δ_t × the ℓ1 step;
    then the decay."""
    rule = MemoryRule(MLP, Huber(per=per), Decay(), GD())

    def update(W, t, q, k, v, gates):
        delta_t = gates.threshold[:, t, :, None]

        def loss(e):
            if per == "token":
                small = e.detach().pow(2).mean(-1, keepdim=True).sqrt() <= delta_t
                return torch.where(small, 0.5 * e * e, delta_t * e.abs())
            return torch.where(e.detach().abs() <= delta_t, 0.5 * e * e, delta_t * (e.abs() - 0.5 * delta_t))

        grads = _gradient(rule, W, k[:, t], v[:, t], loss)
        return [(1 - _col(gates.decay, t)) * w - _col(gates.lr, t) * g for w, g in zip(W, grads)]

    _by_hand(rule, ["recurrent", "chunked"], update)


def test_huber_losses_and_steps_by_value():
    """Numbers worked out by hand (δ = 1 unless said): per token, ‖e‖/√d decides for the whole token, the tie
    ‖e‖/√d = δ taking the ℓ2 branch; per coordinate, each |e_j| against δ."""
    token, coordinate = Huber(per="token"), Huber(per="coordinate")
    zero, one = torch.zeros(4, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    e = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)  # ‖e‖ 5, RMS 2.5, Σ|e| 7
    assert token.loss(e, zero, one).item() == 7.0  # δ Σ|e_j|
    torch.testing.assert_close(token.output_grad(e, zero, one), torch.tensor([1.0, 1.0, 0.0, 0.0],
                                                                             dtype=torch.float64))
    at_tie = torch.full((1,), 2.5, dtype=torch.float64)
    assert token.loss(e, zero, at_tie).item() == 12.5  # ½‖e‖²
    torch.testing.assert_close(token.output_grad(e, zero, at_tie), e)
    e = torch.tensor([0.5, 2.0, -3.0], dtype=torch.float64)
    assert coordinate.loss(e, zero[:3], one).item() == 0.125 + 1.5 + 2.5  # ½e², δ(|e| − ½δ) twice
    torch.testing.assert_close(coordinate.output_grad(e, zero[:3], one),
                               torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64))


def test_huber_modes_differ():
    """Per-token switching and per-coordinate clipping are different rules on the same inputs."""
    rules = [MemoryRule(MLP, Huber(per=per), Decay(), GD()) for per in ("token", "coordinate")]
    q, k, v, gates, state = make_inputs(rules[0], tokens=16)
    y_token, _ = chunked(rules[0], q, k, v, gates, state, 4)
    y_coord, _ = chunked(rules[1], q, k, v, gates, state, 4)
    assert (y_token - y_coord).abs().max() > 1e-2


def test_memora_by_hand():
    """W_t = Softmax_rows((1 − α_t) log W_{t−1} − θ_t ∇ℓ2(W_{t−1})) (MIRAS Eq. 27)."""
    def update(W, t, q, k, v, gates):
        grads = _gradient(MEMORA, W, k[:, t], v[:, t], lambda e: 0.5 * (e * e).sum(-1))
        return [torch.softmax((1 - _col(gates.decay, t)) * torch.log(w) - _col(gates.lr, t) * g, -1)
                for w, g in zip(W, grads)]

    _by_hand(MEMORA, ["recurrent", "chunked"], update)


def test_elastic_net_by_hand():
    """Decay, the step, then the smooth soft threshold w (2/π) arctan(|w|/γ) at every chunk end."""
    rule = EXTRA_RULES["elastic-net"]

    def update(W, t, q, k, v, gates):
        grads = _gradient(rule, W, k[:, t], v[:, t], lambda e: 0.5 * (e * e).sum(-1))
        A = [(1 - _col(gates.decay, t)) * w - _col(gates.lr, t) * g for w, g in zip(W, grads)]
        return [a * torch.atan(a.abs() / 0.05) * 2 / torch.pi for a in A]

    _by_hand(rule, ["recurrent", "chunked"], update)


def _constant_gates(rule, shape, dtype=torch.float32, **values):
    defaults = {"lr": 0.1, "momentum": 0.9, "decay": 0.01, "threshold": 1.0}
    names = {"lr"} | rule.needed_gates()
    return Gates(**{n: torch.full(shape, values.get(n, defaults[n]), dtype=dtype) for n in names})


def test_memora_stays_on_the_simplex_for_10k_tokens():
    q, k, v, _, state = make_inputs(MEMORA, batch=1, tokens=10_000, heads=2, dim=8, dtype=torch.float32)
    _, final = chunked(MEMORA, q, k, v, _constant_gates(MEMORA, q.shape[:3]), None, 16)
    for w in final.weights:
        assert (w > 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-5)


def test_moneta_unit_q_norm_at_chunk_ends():
    q, k, v, gates, state = make_inputs(MONETA, tokens=32, dim=8)
    _, final = chunked(MONETA, q, k, v, gates, state, 8)
    for w in final.weights:
        norm = w.abs().pow(4).sum((-2, -1)).pow(0.25)
        torch.testing.assert_close(norm, torch.ones_like(norm), rtol=0, atol=1e-12)
    _, mid = chunked(MONETA, q[:, :30], k[:, :30], v[:, :30], gates.slice(0, 30), state, 8)
    assert (mid.weights[0].abs().pow(4).sum((-2, -1)).pow(0.25) - 1).abs().max() > 1e-4  # not yet projected
    # Eq. 24 as printed (power q − 2): the q-norm after the projection is 1 / (the q-norm before).
    printed = MemoryRule(MLP, MONETA.bias, LqNormalize(q=4.0, power=2.0), GD())
    weights = tuple(3.0 * w for w in state.weights)
    projected = printed.retention.chunk_end(weights, weights, None)
    for before, after in zip(weights, projected):
        product = before.abs().pow(4).sum((-2, -1)).pow(0.25) * after.abs().pow(4).sum((-2, -1)).pow(0.25)
        torch.testing.assert_close(product, torch.ones_like(product), rtol=1e-12, atol=0)


def test_monetas_decay_gate_is_a_rescaled_lr_at_chunk_ends():
    """With power 1 the unit q-norm forgets the scale α sets: (θ, α) and (θ/β, 0) reach the same chunk-end
    states (β = Π(1 − α) since the chunk start), as rules.py says; with power 2 the scale is read and they part."""
    q, k, v, gates, state = make_inputs(MONETA, batch=1, tokens=12, heads=2, dim=4)
    size = 4
    beta = torch.cat([torch.cumprod(1 - part, dim=1) for part in gates.decay.split(size, dim=1)], dim=1)
    rescaled = Gates(lr=gates.lr / beta, decay=torch.zeros_like(gates.decay))
    for rule, same in ((MONETA, True), (MemoryRule(MLP, MONETA.bias, LqNormalize(q=4.0, power=2.0), GD()), False)):
        y, final = recurrent(rule, q, k, v, gates, state, size)
        y_lr, final_lr = recurrent(rule, q, k, v, rescaled, state, size)
        ends = y[:, size - 1::size] - y_lr[:, size - 1::size]  # each chunk's last token reads its end state
        if same:
            assert ends.abs().max() < 1e-12
            for w, w_lr in zip(final.weights, final_lr.weights):
                torch.testing.assert_close(w, w_lr, rtol=0, atol=1e-12)
            assert (y - y_lr).abs().max() > 1e-3  # the reads inside a chunk do see α
        else:
            assert ends.abs().max() > 1e-3
        without_decay = recurrent(rule, q, k, v, Gates(lr=gates.lr, decay=rescaled.decay), state, size)[0]
        assert (y - without_decay).abs().max() > 1e-2  # α alone does matter


def test_rule_validation():
    with pytest.raises(ValueError, match="PreDecay needs LinearMemory"):
        MemoryRule(MLP, L2(), PreDecay(), GD())
    with pytest.raises(ValueError, match="ImplicitGD .* LinearMemory with the L2 bias"):
        MemoryRule(MLP, L2(), Decay(), ImplicitGD())
    with pytest.raises(ValueError, match="Huber per must be one of"):
        Huber(per="row")
    with pytest.raises(ValueError, match="needs gates \\['threshold'\\]"):
        q, k, v, gates, state = make_inputs(YAAD, tokens=3)
        chunked(YAAD, q, k, v, Gates(lr=gates.lr, decay=gates.decay), state, 4)
    assert MemoryRule.from_dict(MONETA.to_dict()) == MONETA
    assert MemoryRule.from_dict(YAAD.to_dict()) == YAAD
    with pytest.raises(ValueError, match=r"carry must be 'W' .* or 'A' .*, got 'a'"):
        LqNormalize(carry="a")
    eq24 = EXTRA_RULES["lq-carry-a-mlp"]
    assert MemoryRule.from_dict(eq24.to_dict()) == eq24 != MemoryRule(MLP, L2(), LqNormalize(), GD())
    old = MONETA.to_dict()  # a rule saved before the field existed reads as the default, carry="W"
    del old["retention"]["carry"]
    assert MemoryRule.from_dict(old) == MONETA


def test_mid_chunk_state_carries_retention_product():
    """KLSoftmax and PreDecay need Π(1 − α) since the chunk start when a call ends mid-chunk."""
    for rule in (MEMORA, GATED_DELTANET):
        q, k, v, gates, state = make_inputs(rule, tokens=6)
        _, mid = chunked(rule, q, k, v, gates, state, 4)
        assert mid.position == 2 and mid.retained is not None
        expected = (1 - gates.decay[:, 4:6]).prod(1)
        torch.testing.assert_close(mid.retained, expected, rtol=1e-12, atol=0)
        with pytest.raises(ValueError, match="state.retained must be given"):
            chunked(rule, q, k, v, gates, MemoryState(mid.weights, None, mid.chunk_start, 2), 4)
