"""Channel-wise gates ([B, T, H, F], one value per input channel of every weight matrix): the chunked
path equals the reference, the online rule is GLA-style per-channel decay, and rules that need a
scalar gate refuse them."""

import pytest
import torch

from miras.memory import GATED_DELTANET, LONGHORN, MEMORA, PRESETS, TITANS_LINEAR, Gates, chunked, recurrent
from miras.memory.delta import delta
from miras.memory.state import channel_widths, supports_channel_gates

from .helpers import assert_close, make_inputs, run_with_grads

CHANNEL_RULES = sorted(name for name, rule in PRESETS.items() if supports_channel_gates(rule))


def channelwise(rule, gates: Gates, dim=4, *, seed=5, only=("lr", "momentum", "decay")) -> Gates:
    """The token-level gates spread over F channels with a random factor in [0.5, 1.5) per channel."""
    gen = torch.Generator().manual_seed(seed)
    channels = sum(channel_widths(rule, dim, dim))
    values = {}
    for name, gate in gates.present().items():
        if name in only:
            gate = gate[..., None] * (0.5 + torch.rand(*gate.shape, channels, generator=gen, dtype=gate.dtype))
            gate = gate if name == "lr" else gate.clamp(max=0.99)
        values[name] = gate
    return Gates(**values)


def with_grads(inputs):
    q, k, v, gates, state = inputs
    for t in (q, k, v, *gates.present().values(), *state.tensors()):
        t.requires_grad_()
    return q, k, v, gates, state


def test_which_presets_take_channel_gates():
    assert {"titans", "titans-linear", "ttt-mlp", "moneta", "yaad", "mamba2", "linear-attention"} <= set(CHANNEL_RULES)
    assert not {"gated-deltanet", "memora", "longhorn"} & set(CHANNEL_RULES)


@pytest.mark.parametrize("name", CHANNEL_RULES)
@pytest.mark.parametrize("chunk_size, tokens", [(1, 7), (4, 13), (5, 13), (16, 13)])
def test_chunked_equals_recurrent(name, chunk_size, tokens):
    """Outputs, final state and every gradient (gates included), float64."""
    rule = PRESETS[name]
    q, k, v, gates, state = make_inputs(rule, tokens=tokens)
    inputs = with_grads((q, k, v, channelwise(rule, gates), state))
    ref_out, ref_grads = run_with_grads(recurrent, rule, inputs, chunk_size)
    out, grads = run_with_grads(chunked, rule, inputs, chunk_size)
    for a, b in zip(out, ref_out):
        assert_close(a, b, f"{name} chunk {chunk_size}: outputs/state", 1e-9)
    for key, ref in ref_grads.items():
        assert_close(grads[key], ref, f"{name} chunk {chunk_size}: grad {key}", 1e-9)


@pytest.mark.parametrize("only", [("decay",), ("lr",), ("momentum",)])
def test_mixed_token_and_channel_gates(only):
    rule = PRESETS["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=11)
    inputs = with_grads((q, k, v, channelwise(rule, gates, only=only), state))
    ref_out, ref_grads = run_with_grads(recurrent, rule, inputs, 4)
    out, grads = run_with_grads(chunked, rule, inputs, 4)
    for a, b in zip(out, ref_out):
        assert_close(a, b, f"{only}: outputs/state", 1e-9)
    for key, ref in ref_grads.items():
        assert_close(grads[key], ref, f"{only}: grad {key}", 1e-9)


@pytest.mark.parametrize("impl", [recurrent, chunked])
def test_equal_channels_equal_token_level_gates(impl):
    """A channel-wise gate whose F values are equal is the token-level gate."""
    rule = PRESETS["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=10)
    channels = sum(channel_widths(rule, 4, 4))
    spread = Gates(**{n: g[..., None].expand(*g.shape, channels) for n, g in gates.present().items()})
    y, final = impl(rule, q, k, v, gates, state, 4)
    y_c, final_c = impl(rule, q, k, v, spread, state, 4)
    torch.testing.assert_close(y_c, y, rtol=0, atol=1e-12)
    for a, b in zip(final_c.tensors(), final.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", [recurrent, chunked])
def test_online_rule_by_hand(impl):
    """Titans-linear at chunk 1 is momentum GD with per-key-channel decay (GLA's diagonal gate):
    S_t = S_{t−1} diag(η_t) − (W_{t−1}k_t − v_t)(θ_t ⊙ k_t)ᵀ, W_t = W_{t−1} diag(1 − α_t) + S_t."""
    rule = TITANS_LINEAR
    q, k, v, gates, state = make_inputs(rule, batch=1, tokens=6, heads=2, dim=3)
    gates = channelwise(rule, gates, dim=3)
    y, final = impl(rule, q, k, v, gates, state, 1)
    W, S = state.weights[0].clone(), state.momentum[0].clone()
    for t in range(6):
        eta, theta, keep = (g[:, t, :, None, :] for g in (gates.momentum, gates.lr, 1 - gates.decay))
        error = W @ k[:, t, :, :, None] - v[:, t, :, :, None]  # [B, H, Dv, 1]
        S = S * eta - error @ (theta * k[:, t, :, None, :])
        W = W * keep + S
        torch.testing.assert_close(y[:, t], (W @ q[:, t, :, :, None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(final.weights[0], W, rtol=0, atol=1e-12)
    torch.testing.assert_close(final.momentum[0], S, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cuts", [[3, 10, 11], list(range(1, 23))], ids=["segments", "token-by-token"])
def test_streaming_is_exact(cuts):
    """Calls that end mid-chunk and one-token calls (the decoding path) continue exactly."""
    rule = PRESETS["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=23)
    gates = channelwise(rule, gates)
    y, final = chunked(rule, q, k, v, gates, state, 5)
    outputs, carried = [], state
    for start, stop in zip([0, *cuts], [*cuts, 23]):
        out, carried = chunked(rule, q[:, start:stop], k[:, start:stop], v[:, start:stop], gates.slice(start, stop),
                               carried, 5)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), y, rtol=0, atol=1e-11)
    for a, b in zip(carried.tensors(), final.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("rule", [GATED_DELTANET, MEMORA, LONGHORN], ids=lambda r: r.name())
def test_rules_with_scalar_gates_refuse_channel_gates(rule):
    q, k, v, gates, state = make_inputs(rule, tokens=5)
    channels = sum(channel_widths(rule, 4, 4))
    wide = Gates(**{n: g[..., None].expand(*g.shape, channels) for n, g in gates.present().items()})
    with pytest.raises(ValueError, match="token-level gates"):
        chunked(rule, q, k, v, wide, state, 4)


def test_wrong_channel_count_and_delta_path_are_errors():
    rule = PRESETS["titans"]
    q, k, v, gates, state = make_inputs(rule, tokens=5)
    bad = Gates(**{**gates.present(), "decay": gates.decay[..., None].expand(2, 5, 3, 7)})
    channels = sum(channel_widths(rule, 4, 4))
    with pytest.raises(ValueError, match=rf"channel-wise \[B, T, H, F\] = \[2, 5, 3, {channels}\]"):
        recurrent(rule, q, k, v, bad, state, 4)
    linear = PRESETS["linear-attention"]
    q, k, v, gates, state = make_inputs(PRESETS["deltanet"], tokens=5)
    wide = Gates(lr=gates.lr[..., None].expand(2, 5, 3, 4))
    with pytest.raises(ValueError, match="token-level gates"):
        delta(PRESETS["deltanet"], q, k, v, wide, state, 4)
    assert supports_channel_gates(linear)
