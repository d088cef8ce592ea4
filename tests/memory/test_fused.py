"""The hand-written backward of memory/fused.py against autograd through the same chunk loop."""

import pytest
import torch

from miras.memory import (
    GD,
    L2,
    PRESETS,
    Decay,
    Gates,
    Huber,
    MemoryRule,
    MemoryState,
    MLPMemory,
    Momentum,
    NoRetention,
    chunked,
)
from miras.memory.fused import supports

from .helpers import assert_close, make_inputs, run_with_grads

RULES = {
    "titans": PRESETS["titans"],
    "ttt-mlp": PRESETS["ttt-mlp"],
    "depth3-silu-momentum": MemoryRule(MLPMemory(depth=3, expansion=2, activation="silu"), L2(), Decay(), Momentum()),
    "relu-decay-gd": MemoryRule(MLPMemory(depth=2, expansion=3, activation="relu"), L2(), Decay(), GD()),
    "gelu-no-retention-momentum": MemoryRule(MLPMemory(depth=2, expansion=2), L2(), NoRetention(), Momentum()),
}


def _fused(**options):
    def run(*args):
        y, final = chunked(*args, fused=True, **options)
        assert isinstance(final.weights[0].grad_fn, torch.autograd.function.BackwardCFunction), \
            "the fused backward was not used"
        return y, final
    return run


def _autograd(*args):
    """Autograd through the same chunk loop (span=1: not the span form, which rounds differently in float32)."""
    return chunked(*args, fused=False, span=1)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("chunk_size,tokens,recompute", [(4, 13, 0), (5, 20, 0), (16, 13, 0), (4, 23, 2),
                                                          (3, 12, 3), (4, 9, 8)])
def test_fused_equals_autograd(name, chunk_size, tokens, recompute):
    """Outputs, final state and the gradient of every input (gates and initial state included), float64,
    with partial last chunks, a call shorter than a chunk and kept-state strides that do and do not
    divide the chunk count."""
    rule = RULES[name]
    inputs = make_inputs(rule, tokens=tokens, requires_grad=True)
    out, grads = run_with_grads(_fused(recompute=recompute), rule, inputs, chunk_size)
    ref_out, ref_grads = run_with_grads(_autograd, rule, inputs, chunk_size)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, f"output {i}", tol=1e-12)
    for key in grads:
        assert_close(grads[key], ref_grads[key], f"d/d {key}", tol=1e-11)


def test_compiled_fused_backward_equals_autograd():
    """compile=True with fused=True: the chunk step and the per-chunk backward under torch.compile."""
    rule = RULES["titans"]
    inputs = make_inputs(rule, tokens=11, requires_grad=True)
    out, grads = run_with_grads(_fused(compile=True), rule, inputs, 4)
    ref_out, ref_grads = run_with_grads(_autograd, rule, inputs, 4)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, f"output {i}", tol=1e-12)
    for key in grads:
        assert_close(grads[key], ref_grads[key], f"d/d {key}", tol=1e-11)


def test_fused_state_left_mid_chunk_carries_gradients():
    """A call that ends inside a chunk returns the chunk-start weights (the next call's gradient point):
    gradients through a continued stream equal autograd's."""
    rule = RULES["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=15, requires_grad=True)

    def stream(first):
        y1, mid = first(rule, q[:, :6], k[:, :6], v[:, :6], gates.slice(0, 6), state, 4)
        y2, final = chunked(rule, q[:, 6:], k[:, 6:], v[:, 6:], gates.slice(6, 15), mid, 4)
        weights = torch.arange(1, 1 + y2.numel(), dtype=y2.dtype).view_as(y2).sin()
        loss = y1.sum() + (y2 * weights).sum() + sum(w.square().sum() for w in final.weights)
        return torch.autograd.grad(loss, [q, k, v, *gates.present().values(), *state.tensors()])

    for a, b in zip(stream(_fused()), stream(_autograd)):
        assert_close(a, b, "gradient through a mid-chunk state", tol=1e-11)


def test_fused_in_float32_and_without_gradients():
    """float32 stays close to the autograd path; without gradients the ordinary loop runs."""
    rule = RULES["titans"]
    inputs = make_inputs(rule, batch=2, tokens=40, heads=2, dim=8, dtype=torch.float32, requires_grad=True)
    out, grads = run_with_grads(_fused(), rule, inputs, 16)
    ref_out, ref_grads = run_with_grads(_autograd, rule, inputs, 16)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        y, final = chunked(rule, *inputs[:4], inputs[4], 16, fused=True)
    assert final.weights[0].grad_fn is None
    torch.testing.assert_close(y, out[0].detach(), rtol=0, atol=0)


def test_automatic_choice_and_coverage():
    """None uses the fused backward with recompute only; uncovered rules and calls fall back."""
    rule = RULES["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=9, requires_grad=True)
    assert not isinstance(chunked(rule, q, k, v, gates, state, 4)[1].weights[0].grad_fn,
                          torch.autograd.function.BackwardCFunction)
    assert isinstance(chunked(rule, q, k, v, gates, state, 4, recompute=1)[1].weights[0].grad_fn,
                      torch.autograd.function.BackwardCFunction)
    cpu = {"offset": 0, "device_type": "cpu", "channelwise": False}
    assert supports(rule, **cpu)
    assert not supports(rule, **{**cpu, "offset": 2})
    assert not supports(rule, **{**cpu, "channelwise": True})
    assert not supports(PRESETS["titans-linear"], **cpu)
    assert not supports(MemoryRule(MLPMemory(), Huber(), Decay(), GD()), **cpu)
    assert not supports(PRESETS["moneta"], **cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not supports(rule, **cpu)
    with pytest.raises(TypeError, match="fused must be None"):
        chunked(rule, q, k, v, gates, state, 4, fused="yes")


def test_fused_saturated_gates_are_finite():
    """α = 1 and η = 0 exactly: the fused backward's gradients stay finite (as autograd's)."""
    rule = RULES["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=9, dtype=torch.float32, requires_grad=True)
    saturated = {n: g.detach().clone() for n, g in gates.present().items()}
    saturated["decay"][:, 3] = 1.0
    saturated["momentum"][:, 5] = 0.0
    saturated = {n: g.requires_grad_() for n, g in saturated.items()}
    y, final = chunked(rule, q, k, v, Gates(**saturated), state, 4, fused=True)
    (y.sum() + final.weights[0].sum()).backward()
    for name, tensor in [("q", q), ("k", k), ("v", v), *saturated.items()]:
        assert torch.isfinite(tensor.grad).all(), name


def test_compiled_code_sees_full_chunks_only(monkeypatch):
    """The compiled chunk step and per-chunk backward are specialised on the row the state is taken at, the
    chunk length and the weights' strides; a call's last chunk may end at any row (a prompt of another
    length), a short call has a chunk of its own length, a stream's first chunk starts from batch-shared
    weights: those run eagerly, and nothing compiles again per length. Recorded with the eager functions
    standing in for the compiled ones."""
    import importlib

    chunked_module = importlib.import_module("miras.memory.chunked")  # (the package exports the function)
    fused_module = importlib.import_module("miras.memory.fused")

    rows = {"step": [], "backward": []}

    def recording(name, fn, index):
        def run(*args):
            rows[name].append(args[index])
            return fn(*args)
        return run

    monkeypatch.setitem(chunked_module._COMPILED, "step", recording("step", chunked_module._chunk_step, 9))
    monkeypatch.setitem(fused_module._COMPILED, "backward", recording("backward", fused_module._chunk_backward, 8))
    rule = RULES["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=11, requires_grad=True)
    expected, _ = chunked(rule, q, k, v, gates, state, 4)
    y, _ = chunked(rule, q, k, v, gates, state, 4, compile=True)  # rows 3, 3 and 2 (the last, eager)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    first = Gates(**{name: gate[:, :5] for name, gate in gates.present().items()})
    rest = Gates(**{name: gate[:, 5:] for name, gate in gates.present().items()})
    _, mid = chunked(rule, q[:, :5], k[:, :5], v[:, :5], first, state, 4, compile=True)  # streamed: 5 + 6
    y, _ = chunked(rule, q[:, 5:], k[:, 5:], v[:, 5:], rest, mid, 4, compile=True)
    torch.testing.assert_close(y, expected[:, 5:], rtol=1e-12, atol=1e-12)
    y, _ = chunked(rule, q, k, v, gates, state, 4, compile=True, fused=True)
    y.square().sum().backward()
    assert rows["step"] and rows["backward"] and set(rows["step"]) == set(rows["backward"]) == {3}
    # a call shorter than one chunk (another chunk length), and a stream's first chunk from start weights
    # shared by the batch (stride 0), run eagerly too: 11 tokens from a shared state compile 1 of 3 chunks
    calls = len(rows["step"])
    chunked(rule, q[:, :3], k[:, :3], v[:, :3], Gates(**{n: g[:, :3] for n, g in gates.present().items()}),
            state, 4, compile=True)
    assert len(rows["step"]) == calls
    shared = MemoryState(tuple(w[:1].expand_as(w) for w in state.weights),
                         tuple(m[:1].expand_as(m) for m in state.momentum))
    expected, _ = chunked(rule, q, k, v, gates, shared, 4, span=1)
    y, _ = chunked(rule, q, k, v, gates, shared, 4, compile=True)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert len(rows["step"]) == calls + 1

