"""Edges of the engine's contract: gates at their closed ends, second derivatives, expanded leaf states,
inference mode, autocast dtypes, and the rule fields' checks."""

import math

import pytest
import torch

from miras.memory import (
    DELTANET,
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
    with pytest.raises(TypeError, match="MLPMemory expansion must be an integer, got 1.5"):
        MLPMemory(expansion=1.5)
    with pytest.raises(TypeError, match="MLPMemory depth must be an integer, got '3'"):
        MemoryRule.from_dict({**TITANS.to_dict(), "architecture": {"kind": "mlp", "depth": "3"}})
    assert callable(delta)  # the exact online delta rule is exported as the function
