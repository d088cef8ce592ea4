"""The span form (memory/span.py) equals the chunk-by-chunk loop and the reference, and is used where it should be."""

import importlib

import pytest
import torch

from miras.memory import MEMORA, PRESETS, TITANS, MemoryState, chunked, read, recurrent

from .helpers import assert_close, make_inputs, run_with_grads

chunked_module = importlib.import_module("miras.memory.chunked")
span_module = importlib.import_module("miras.memory.span")


def _with_span(span):
    return lambda *args: chunked(*args, span=span)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("chunk_size,tokens,span", [(4, 37, 1), (4, 37, 3), (4, 37, 10), (16, 37, 2), (1, 6, 4),
                                                    (5, 5, 2)])
def test_span_equals_recurrent(name, chunk_size, tokens, span):
    """Outputs, final state and every gradient, float64, spans that do and do not divide the chunks,
    a partial last chunk, chunk 1; ``span=1`` is the chunk loop."""
    rule = PRESETS[name]
    ref_out, ref_grads = run_with_grads(recurrent, rule, make_inputs(rule, tokens=tokens, requires_grad=True),
                                        chunk_size)
    out, grads = run_with_grads(_with_span(span), rule, make_inputs(rule, tokens=tokens, requires_grad=True),
                                chunk_size)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, f"output {i}")
    for key in grads:
        assert_close(grads[key], ref_grads[key], f"d/d {key}")


@pytest.mark.parametrize("name", ["titans", "ttt-mlp", "mamba2", "yaad"])
@pytest.mark.parametrize("span", [None, 1])
def test_shared_start_state_equals_a_copy(name, span):
    """A start state expanded over the batch (stride 0, as the layer's learned initial memory) gives
    the same values and gradients as the same state copied per row."""
    rule = PRESETS[name]
    q, k, v, gates, state = make_inputs(rule, batch=3, tokens=21)
    bases = [w[0, :, :, :].clone().requires_grad_() for w in state.weights]
    results = []
    for copy in (False, True):
        weights = tuple(w.unsqueeze(0).expand(3, *w.shape) for w in bases)
        if copy:
            weights = tuple(w.contiguous() for w in weights)
        else:
            assert all(w.stride(0) == 0 for w in weights)
        momentum = None if state.momentum is None else tuple(torch.zeros_like(w) for w in weights)
        y, final = chunked(rule, q, k, v, gates, MemoryState(weights, momentum), 4, span=span)
        loss = (y * y.detach().cos()).sum() + sum((w * w.detach().sin()).sum() for w in final.weights)
        results.append((y, final.weights, torch.autograd.grad(loss, bases)))
    (y0, w0, g0), (y1, w1, g1) = results
    assert_close(y0, y1, "output")
    for a, b in zip(w0 + g0, w1 + g1):
        assert_close(a, b, "state or gradient")


def test_read_from_a_shared_state_equals_a_copy():
    """``read`` (MAC's retrieval) multiplies weights shared by the batch once per head: same values and
    the same gradient w.r.t. what they were expanded from as a per-row copy."""
    q, _, _, _, state = make_inputs(TITANS, batch=3, tokens=5)
    bases = [w[0].clone().requires_grad_() for w in state.weights]
    results = []
    for copy in (False, True):
        weights = tuple(w.unsqueeze(0).expand(3, *w.shape) for w in bases)
        weights = tuple(w.contiguous() for w in weights) if copy else weights
        y = read(TITANS, MemoryState(weights), q)
        results.append((y, torch.autograd.grad((y * y.detach().cos()).sum(), bases)))
    (y0, g0), (y1, g1) = results
    assert_close(y0, y1, "read")
    for a, b in zip(g0, g1):
        assert_close(a, b, "gradient")


def test_automatic_choice(monkeypatch):
    """One span for calls of at most SPAN_CHUNKS chunks (and SPAN_TOKENS tokens) of the covered rules;
    the chunk loop for longer calls, for recompute, fused and compile, and for rules or states the
    span form does not cover."""
    calls = []
    original = chunked_module.span_chunks

    def spy(*args, **kwargs):
        calls.append(args[-2])  # the span length
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked_module, "span_chunks", spy)

    def used(rule, tokens, chunk_size=4, state=None, **options):
        calls.clear()
        q, k, v, gates, start = make_inputs(rule, tokens=tokens)
        chunked(rule, q, k, v, gates, start if state is None else state, chunk_size, **options)
        return list(calls)

    assert used(TITANS, 7) == [2]  # 2 chunks of 4: one span
    assert used(TITANS, 4 * span_module.SPAN_CHUNKS) == [span_module.SPAN_CHUNKS]
    assert used(TITANS, 4 * span_module.SPAN_CHUNKS + 1) == []  # one chunk more: the chunk loop
    assert used(TITANS, 37, span=3) == [3]
    assert used(TITANS, span_module.SPAN_TOKENS + 1, chunk_size=32) == []  # 3 chunks, but too many tokens
    assert used(TITANS, 37, span=2) == [2]
    assert used(TITANS, 37, recompute=2) == []
    assert used(TITANS, 37, fused=True) == []
    assert used(MEMORA, 37) == []  # a projecting retention
    q, k, v, gates, state = make_inputs(TITANS, tokens=3)
    _, mid = chunked(TITANS, q, k, v, gates, state, 4)
    assert used(TITANS, 37, state=mid) == []  # the call starts mid-chunk
    with pytest.raises(ValueError, match="span must be None"):
        chunked(TITANS, q, k, v, gates, state, 4, span=0)
    for option in ({"recompute": 2}, {"fused": True}, {"compile": True}):
        with pytest.raises(ValueError, match="cannot be combined with recompute, fused=True or compile"):
            chunked(TITANS, q, k, v, gates, state, 4, span=2, **option)


@pytest.mark.parametrize("preset", ["titans-lmm-tiny", "titans-mac-tiny"])
def test_models_train_the_same_with_and_without_the_span_form(preset, monkeypatch):
    """A training row of 32 tokens (the demo's), float64: the same logits and every parameter gradient
    (the learned initial memory included) whether the memory runs as spans or chunk by chunk."""
    from miras.models import create

    ids = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for threshold in (span_module.SPAN_TOKENS, 0):
        monkeypatch.setattr(chunked_module, "SPAN_TOKENS", threshold)
        torch.manual_seed(0)
        model = create(preset).double()
        logits, _ = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert_close(l0, l1, "logits")
    assert any("initial_weights" in name for name in g0)
    for name in g0:
        assert g0[name] is not None, f"{name} gets no gradient"
        assert_close(g0[name], g1[name], f"d/d {name}")
