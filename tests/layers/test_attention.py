"""Attention: equals a naive softmax reference, causal, windowed with sinks, streams exactly, bounded cache."""

import dataclasses
import math
from unittest import mock

import pytest
import torch

from miras.layers import Attention, TokenMixer, rotary

from .helpers import rotate_by_hand

CONFIGS = {"full": {}, "window": {"window": 5}, "window+sinks": {"window": 5, "sinks": 3}}


def make(config="full", seed=0):
    torch.manual_seed(seed)
    return Attention(16, heads=2, **CONFIGS[config]).double()


def inputs(tokens=23, batch=2, seed=1):
    return torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive(layer: Attention, x):
    """Softmax attention written out: scores, the visibility rule stated directly, softmax, sum."""
    b, t, d = x.shape
    q, k, v = layer.qkv(x).view(b, t, 3, layer.heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    pos = torch.arange(t)
    q, k = rotate_by_hand(q, pos), rotate_by_hand(k, pos)
    scores = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    for i in range(t):
        for j in range(t):
            visible = j <= i and (layer.window is None or i - j < layer.window or j < layer.sinks)
            if not visible:
                scores[..., i, j] = float("-inf")
    y = scores.softmax(-1) @ v
    return layer.out(y.transpose(1, 2).reshape(b, t, d))


def test_is_a_token_mixer():
    assert isinstance(make(), TokenMixer)


@pytest.mark.parametrize("config", CONFIGS)
def test_equals_naive_softmax(config):
    layer, x = make(config), inputs()
    torch.testing.assert_close(layer(x)[0], naive(layer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_streams_exactly_with_bounded_cache(config):
    layer, x = make(config), inputs()
    y, cache = layer(x)
    for cuts in ([4, 5, 13], list(range(1, 23))):
        pieces, state = [], None
        for a, b in zip([0, *cuts], [*cuts, 23]):
            out, state = layer(x[:, a:b], state)
            pieces.append(out)
        torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=0, atol=1e-12)
    expected = {"full": 23, "window": 5 - 1, "window+sinks": 3 + 5 - 1}[config]
    assert cache.keys.shape[2] == state.keys.shape[2] == expected
    assert cache.seen == 23


def test_cache_does_not_grow_with_context():
    layer = make("window+sinks")
    state = None
    sizes = []
    for step in range(40):
        _, state = layer(inputs(tokens=7, seed=step), state)
        sizes.append(state.nbytes())
    assert len(set(sizes[2:])) == 1, sizes


def test_window_and_sinks_decide_what_is_seen():
    layer, x = make("window+sinks"), inputs()
    y, _ = layer(x)
    for j, should_move in ((1, True), (10, False)):  # 1 is a sink; 10 is 12 back from 22, outside the window
        x2 = x.clone()
        x2[:, j] += 1.0
        moved = (layer(x2)[0][:, 22] - y[:, 22]).abs().max() > 1e-9
        assert moved == should_move, j


@pytest.mark.parametrize("config", CONFIGS)
def test_causal(config):
    layer, x = make(config), inputs()
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 9] += 1.0
    torch.testing.assert_close(layer(x2)[0][:, :9], y[:, :9], rtol=0, atol=0)


def test_rotary_depends_on_relative_position_only():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=gen,
                                                                                   dtype=torch.float64)
    dots = [(rotary(q, torch.tensor([m + 3])) * rotary(k, torch.tensor([m]))).sum() for m in (0, 5, 100)]
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])
    farther = (rotary(q, torch.tensor([4])) * rotary(k, torch.tensor([0]))).sum()
    assert (farther - dots[0]).abs() > 1e-3  # and it does depend on it: a rotation by nothing passes the above


def test_rotary_turns_each_channel_pair_by_its_frequency():
    x = torch.randn(2, 3, 4, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 300])
    torch.testing.assert_close(rotary(x, positions), rotate_by_hand(x, positions), rtol=1e-12, atol=1e-12)
    # unit vector e_i at position p: (cos, sin) of p · 10000^(−i/5) in channels (i, i + 5)
    e = torch.zeros(1, 1, 1, 10, dtype=torch.float64)
    e[..., 2] = 1
    turned = rotary(e, torch.tensor([3]))[0, 0, 0]
    torch.testing.assert_close(turned[[2, 7]], torch.tensor([math.cos(3 * 10000 ** -0.4), math.sin(3 * 10000 ** -0.4)],
                                                            dtype=torch.float64))
    odd = torch.randn(1, 1, 2, 7, dtype=torch.float64)  # an odd width: the last channel is left as it is
    torch.testing.assert_close(rotary(odd, torch.tensor([2, 9]))[..., 6], odd[..., 6])


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by heads"):
        Attention(15, heads=2)
    with pytest.raises(ValueError, match="sinks only matter with a sliding window"):
        Attention(16, heads=2, sinks=4)
    for kwargs, message in [({"heads": 0}, "heads must be an integer >= 1, got 0"),
                            ({"heads": 2.0}, "heads must be an integer >= 1, got 2.0"),
                            ({"window": True}, "window must be an integer >= 1, got True"),
                            ({"window": 2.5}, "window must be an integer >= 1, got 2.5"),
                            ({"window": 4, "sinks": -1}, "sinks must be an integer >= 0"),
                            ({"window": 4, "sinks": 1.5}, "sinks must be an integer >= 0"),
                            ({"rope_base": 0.0}, r"rope_base must be a finite number > 1 \(RoPE's frequency base\)"),
                            ({"rope_base": float("nan")}, "rope_base must be a finite number > 1")]:
        with pytest.raises(ValueError, match=message):
            Attention(16, **{"heads": 2, **kwargs})
    with pytest.raises(ValueError, match=r"x must be \[B, T, dim=16\]"):
        make()(torch.randn(2, 3, 8, dtype=torch.float64))
    layer = make("window")
    with pytest.raises(TypeError, match="x is torch.float32 but the layer's parameters are torch.float64"):
        layer(torch.randn(2, 3, 16))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.zeros(2, 3, 16, dtype=torch.long))
    _, state = layer(inputs(4, batch=2))
    with pytest.raises(ValueError, match=r"the state holds 2 sequence\(s\) but x holds 3"):
        layer(inputs(4, batch=3), state)
    with pytest.raises(TypeError, match="state must be a KVCache"):
        layer(inputs(4), (state.keys, state.values))


def test_a_long_call_of_sink_positions_only():
    """More than 2·window tokens, all of them sinks (as many as there are sinks, too): no key past the sinks
    for the blockwise path."""
    for sinks in (20, 12):
        torch.manual_seed(0)
        layer = Attention(16, heads=2, window=4, sinks=sinks).double()
        x = inputs(tokens=12)
        torch.testing.assert_close(layer(x)[0], naive(layer, x), rtol=0, atol=1e-12)


def test_rope_base_sets_the_frequencies():
    torch.manual_seed(0)
    layer = Attention(16, heads=2, rope_base=500.0).double()
    x = inputs()
    b, t, d = x.shape
    q, k, v = layer.qkv(x).view(b, t, 3, layer.heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k = rotate_by_hand(q, torch.arange(t), base=500.0), rotate_by_hand(k, torch.arange(t), base=500.0)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)).masked_fill(
        torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    expected = layer.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(layer(x)[0], expected, rtol=0, atol=1e-12)


def test_a_cache_whose_positions_do_not_match_its_keys_is_refused():
    layer = make("window")
    _, cache = layer(inputs(9))
    with pytest.raises(ValueError, match=r"^the KV cache does not fit this attention layer"):
        layer(inputs(2), dataclasses.replace(cache, positions=cache.positions[1:]))


@pytest.mark.parametrize("window, sinks", [(1, 0), (4, 0), (4, 3), (6, 9), (7, 2)])
@pytest.mark.parametrize("first", [0, 3, 11])
def test_banded_sliding_window_equals_naive(window, sinks, first):
    """Calls longer than 2·window run blockwise (O(T·window)); after a first call of `first` tokens
    (a cache with sinks and a partial window) they equal the naive reference, gradients included."""
    torch.manual_seed(0)
    layer = Attention(16, heads=2, window=window, sinks=sinks).double()
    x = inputs(tokens=41)
    pieces, state = [], None
    if first:
        out, state = layer(x[:, :first])
        pieces.append(out)
    banded, original = [], Attention._banded
    with mock.patch.object(Attention, "_banded", lambda *args: banded.append(1) or original(*args)):
        out, state = layer(x[:, first:], state)
    assert 41 - first > 2 * window and banded == [1]  # the banded path, O(T·window)
    y = torch.cat([*pieces, out], 1)
    reference = naive(layer, x)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    reference_grads = torch.autograd.grad(reference.square().sum(), list(layer.parameters()))
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_full_attention_after_a_cache_without_grad_equals_naive(monkeypatch, dtype, atol):
    """Without gradients, full attention that continues a cache runs as two flash calls merged by their
    log-sum-exps: equal to the naive reference (and to the masked call it replaces), every cut, one
    new token (decoding) included."""
    import miras.layers.attention as attention

    calls = []
    flash = attention._FLASH_CPU
    assert flash is not None, "this torch lacks the CPU flash kernel the fast path needs"
    monkeypatch.setattr(attention, "_FLASH_CPU", lambda *a, **k: calls.append(1) or flash(*a, **k))
    layer, x = make(), inputs(tokens=29)
    reference = naive(layer, x)
    layer, x = layer.to(dtype), x.to(dtype)
    for cuts in ([1, 2, 9, 28], [17]):
        pieces, state = [], None
        with torch.no_grad():
            for a, b in zip([0, *cuts], [*cuts, 29]):
                out, state = layer(x[:, a:b], state)
                pieces.append(out)
        torch.testing.assert_close(torch.cat(pieces, 1).double(), reference, rtol=0, atol=atol)
    assert len(calls) == 2 * (4 + 1)  # two flash calls per continued piece
    calls.clear()
    y, _ = layer(x[:, 9:], layer(x[:, :9])[1])  # with gradients: the masked call
    assert not calls
    torch.testing.assert_close(y.double(), reference[:, 9:], rtol=0, atol=atol)
