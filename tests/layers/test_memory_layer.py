"""MemoryLayer: causal, streams exactly, both engine paths agree, stable at the defaults."""

import dataclasses
import math

import pytest
import torch

from miras.layers import MemoryLayer, TokenMixer, piece_sizes
from miras.memory import (
    DELTANET,
    GATED_DELTANET,
    MAMBA2,
    PRESETS,
    RETNET,
    TITANS,
    Gates,
    chunked,
    delta,
    get_rule,
    initial_state,
    read,
    recurrent,
)

ONLINE = ("deltanet", "gated-deltanet", "longhorn")  # the presets the exact delta path computes


def make_layer(rule=TITANS, impl="chunked", dtype=torch.float64, chunk_size=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = MemoryLayer(16, heads=2, rule=rule, chunk_size=chunk_size, impl=impl, **kwargs).to(dtype)
    # Random (not the zero init) gate weights, so gates really vary per token in these tests.
    if layer.gate_proj is not None:
        with torch.no_grad():
            layer.gate_proj.weight.normal_(0, 0.3)
    if layer.channel_gates:  # and channel-wise terms that really differ per channel
        with torch.no_grad():
            layer.gate_up.weight.normal_(0, 0.3)
    return layer


def inputs(tokens=23, batch=2, dtype=torch.float64, seed=1):
    return torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_is_a_token_mixer():
    assert isinstance(make_layer(), TokenMixer)


@pytest.mark.parametrize("name", ["titans", "deltanet", "mamba2", "ttt-mlp"])
def test_causal(name):
    layer, x = make_layer(PRESETS[name]), inputs()
    y, _ = layer(x)
    for j in (0, 7, 16, 22):
        x2 = x.clone()
        x2[:, j] += 1.0
        y2, _ = layer(x2)
        torch.testing.assert_close(y2[:, :j], y[:, :j], rtol=0, atol=0)
        assert (y2[:, j] - y[:, j]).abs().max() > 1e-6, "perturbing token j must change output j"


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", ["titans", "deltanet", "moneta", "yaad", "memora", "gated-deltanet"])
def test_streams(impl, name):
    """One call == pieces with the state carried == token by token."""
    layer, x = make_layer(PRESETS[name], impl), inputs()
    _check_streams(layer, x)


@pytest.mark.parametrize("name", ONLINE)
def test_delta_impl_streams(name):
    _check_streams(make_layer(PRESETS[name], "delta", chunk_size=1, block_size=8), inputs())


def _check_streams(layer, x, atol=1e-12):
    y, state = layer(x)
    for cuts in ([5, 6, 17], list(range(1, 23))):
        pieces, s = [], None
        for a, b in zip([0, *cuts], [*cuts, 23]):
            out, s = layer(x[:, a:b], s)
            pieces.append(out)
        torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=0, atol=atol)
        for a, b in zip(s.memory.tensors(), state.memory.tensors()):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
        torch.testing.assert_close(s.conv, state.conv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["titans", "mamba2", "moneta", "yaad", "memora", "delta:gated-deltanet",
                                  "delta:longhorn"])
def test_paths_agree_with_parameter_gradients(name):
    if name.startswith("delta:"):  # the exact blockwise online rule against the reference at chunk 1
        rule = PRESETS[name[6:]]
        fast = make_layer(rule, "delta", chunk_size=1, block_size=4)
        slow = make_layer(rule, "recurrent", chunk_size=1)
    else:
        fast, slow = make_layer(PRESETS[name], "chunked"), make_layer(PRESETS[name], "recurrent")
    x = inputs(tokens=11)
    (fast(x)[0] ** 2).sum().backward()
    (slow(x)[0] ** 2).sum().backward()
    for (pname, a), b in zip(fast.named_parameters(), slow.parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, f"{pname} gets no gradient"
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=pname)


@pytest.mark.parametrize("name", ["titans", "ttt-mlp"])
def test_fused_backward_matches_the_reference_layer(name):
    """MemoryLayer(fused=True), the hand-written backward, against the token-by-token reference: every
    parameter gradient (the learned initial memory included), float64."""
    fast = make_layer(PRESETS[name], "chunked", fused=True)
    slow = make_layer(PRESETS[name], "recurrent")
    x = inputs(tokens=13)
    y, state = fast(x)
    assert isinstance(state.memory.weights[0].grad_fn, torch.autograd.function.BackwardCFunction)
    (y ** 2).sum().backward()
    (slow(x)[0] ** 2).sum().backward()
    for (pname, a), b in zip(fast.named_parameters(), slow.parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, f"{pname} gets no gradient"
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=pname)
    with pytest.raises(TypeError, match="fused must be None"):
        MemoryLayer(16, heads=2, fused="always")


@pytest.mark.parametrize("name,options", [("titans", {}), ("moneta", {}), ("gated-deltanet", {}),
                                          ("titans", {"gating": "channel"}),
                                          ("gated-deltanet", {"impl": "delta", "chunk_size": 1, "block_size": 4})])
def test_recompute_in_groups_matches_the_reference_layer(name, options):
    """recompute=2: the call runs in checkpointed groups of 2 chunks, the first one up to a chunk boundary
    when the state ends mid-chunk. Against the token-by-token reference, float64: outputs, final state and
    every parameter gradient, through a carried mid-chunk state (chunked, channel-wise gates, the delta path)."""
    x = inputs(tokens=30)
    options = {"impl": "chunked", **options}
    reference = {**options, "impl": "recurrent"}
    reference.pop("block_size", None)
    results = []
    for layer in (make_layer(PRESETS[name], recompute=2, **options), make_layer(PRESETS[name], **reference)):
        _, state = layer(x[:, :5])  # ends one token into the second chunk of 4
        y, final = layer(x[:, 5:], state)
        ((y ** 2).sum() + sum((t ** 2).sum() for t in final.memory.tensors())).backward()
        results.append((y, final.memory.tensors(), dict(layer.named_parameters())))
    (y, final, params), (y_ref, final_ref, params_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(final, final_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{pname} gets no gradient"
        # The final-state term makes gradients reach ~1e4 (channel-wise gates); the chunked path without
        # recompute differs from the reference by up to ~5e-13 of that too, so the bound scales with it.
        scale = params_ref[pname].grad.abs().max().item()
        torch.testing.assert_close(p.grad, params_ref[pname].grad, rtol=1e-9, atol=max(1e-10, 1e-11 * scale),
                                   msg=pname)


def test_recompute_groups_whole_blocks_on_the_delta_path(monkeypatch):
    """recompute=G groups G chunks' tokens, and on the delta path (chunk 1) G blocks': groups of G tokens
    cut the blockwise delta rule into pieces too small to run fast (deltanet-small, 16K tokens, recompute=64:
    groups of 64 tokens, 2.4x slower per token than at 4K without recompute). The models' MLP groups follow."""
    import miras.layers.memory_layer as memory_layer
    from miras.models import ModelConfig, create

    sizes, checkpoint = [], memory_layer.checkpoint

    def spy(function, piece, *args, **kwargs):
        sizes.append(piece.shape[1])
        return checkpoint(function, piece, *args, **kwargs)

    monkeypatch.setattr(memory_layer, "checkpoint", spy)
    x = inputs(tokens=20)
    for options, groups in (({"impl": "delta", "chunk_size": 1, "block_size": 4}, [8, 8, 4]),
                            ({"chunk_size": 3}, [6, 6, 6, 2])):
        sizes.clear()
        make_layer(PRESETS["gated-deltanet"], recompute=2, **options)(x)
        assert sizes == groups, options
    for family, tokens in (("deltanet", 2 * 64), ("titans-lmm", 2 * 8), ("transformer", 2 * 8)):
        model = create(f"{family}-tiny", recompute=2)
        assert model.config.recompute_tokens == tokens and all(b.recompute == tokens for b in model.blocks), family
    # a model without a memory has no delta path, whatever impl a config built by hand names (impl is unused there)
    assert ModelConfig(family="transformer", impl="delta", chunk_size=4, recompute=2).recompute_tokens == 8


def test_piece_sizes_cut_the_stream_at_every_boundary():
    """The cut shared by recompute's groups here and MAC's segments."""
    assert piece_sizes(0, 16) == []
    assert piece_sizes(5, 16) == [5]
    assert piece_sizes(32, 16) == [16, 16]
    assert piece_sizes(40, 16, filled=11) == [5, 16, 16, 3]
    assert piece_sizes(1, 16, filled=15) == [1]


@pytest.mark.parametrize("name", ["titans", "moneta", "gated-deltanet"])
def test_recompute_keeps_only_each_groups_input(name):
    """Between forward and backward, recompute keeps each group's input (and start state) and no per-token
    activation: what autograd saves is exactly x, against 5x-30x that without recompute."""
    def saved_numel(recompute: int, x: torch.Tensor) -> int:
        numel = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numel.append(t.numel()) or t, lambda t: t):
            y, _ = make_layer(PRESETS[name], recompute=recompute, dtype=torch.float32)(x)
        y.sum().backward()
        return sum(numel)

    x = inputs(tokens=256, dtype=torch.float32)
    assert saved_numel(2, x) == x.numel()
    assert saved_numel(0, x) > 5 * x.numel()


def test_stable_at_16k_tokens_with_defaults():
    """Default gates, float32, 16K tokens: finite outputs and a bounded memory."""
    torch.manual_seed(0)
    layer = MemoryLayer(64, heads=2)
    with torch.no_grad():
        y, state = layer(torch.randn(1, 16384, 64))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in state.memory.tensors())


def _run_presets_at(tokens: int):
    """Every preset at the layer defaults (the online ones through the delta path), float32 and bf16
    autocast: finite outputs and states, and Memora's memory still on the simplex."""
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(0))
    for name, rule in PRESETS.items():
        torch.manual_seed(0)
        options = {"chunk_size": 1, "impl": "delta"} if name in ONLINE else {}
        if name == "retnet":
            options["gating"] = "fixed"
        layer = MemoryLayer(32, heads=2, rule=rule, **options)
        for low_precision in (False, True):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
                y, state = layer(x)
            where = f"{name}, {tokens} tokens, bf16={low_precision}"
            assert torch.isfinite(y).all(), where
            assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in state.memory.tensors()), where
            if name == "memora":
                assert all((w > 0).all() for w in state.memory.weights), where


def test_every_preset_finite_at_2k_tokens():
    _run_presets_at(2048)


@pytest.mark.slow
def test_every_preset_finite_at_16k_tokens():
    _run_presets_at(16384)


def test_retnet_fixed_gating():
    layer = make_layer(RETNET, gating="fixed")
    gates = layer._gates(inputs(tokens=3), torch.float64)
    torch.testing.assert_close(gates.lr, torch.ones(2, 3, 2, dtype=torch.float64))
    torch.testing.assert_close(gates.decay[0, 0], torch.tensor([2.0 ** -5, 2.0 ** -6], dtype=torch.float64))
    assert not any("gate_proj" in n for n, _ in layer.named_parameters())
    _check_streams(layer, inputs())


def test_layer_options_are_checked():
    with pytest.raises(ValueError, match="impl='delta' computes the online rule"):
        MemoryLayer(16, heads=2, rule=GATED_DELTANET, chunk_size=16, impl="delta")
    with pytest.raises(ValueError, match="impl='delta' computes the online rule"):
        MemoryLayer(16, heads=2, rule=TITANS, chunk_size=1, impl="delta")
    with pytest.raises(ValueError, match="gating must be one of"):
        MemoryLayer(16, heads=2, gating="channel-ish")
    with pytest.raises(ValueError, match="gating='fixed' sets lr and decay only"):
        MemoryLayer(16, heads=2, rule=TITANS, gating="fixed")


@pytest.mark.parametrize("name", ["titans", "moneta", "yaad", "mamba2"])
def test_channel_gating_paths_agree_and_stream(name):
    """gating="channel": chunked == recurrent with every parameter gradient (the low-rank gate
    projection included), and streaming (pieces, token by token) is exact."""
    fast = make_layer(PRESETS[name], "chunked", gating="channel", gate_rank=3)
    slow = make_layer(PRESETS[name], "recurrent", gating="channel", gate_rank=3)
    x = inputs(tokens=11)
    gates = fast._gates(x, torch.float64)
    channels = sum(w.shape[-1] for w in fast.initial_weights)
    assert gates.lr.shape == (2, 11, 2, channels) and gates.decay.shape[-1] == channels
    assert (gates.decay.amax(-1) / gates.decay.amin(-1)).min() > 1.01, "the gates must differ per channel"
    (fast(x)[0] ** 2).sum().backward()
    (slow(x)[0] ** 2).sum().backward()
    for (pname, a), b in zip(fast.named_parameters(), slow.parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, f"{pname} gets no gradient"
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=pname)
    # Moneta's normalised p = 3 map amplifies float64 rounding (tests/memory/helpers.py): 1e-11 here.
    _check_streams(fast, inputs(), atol=1e-10 if name == "moneta" else 1e-12)


def test_channel_gating_starts_as_token_gating():
    """The low-rank term starts at zero: a fresh channel-gated layer computes what a token-gated one does."""
    torch.manual_seed(0)
    token = MemoryLayer(16, heads=2, chunk_size=4).double()
    torch.manual_seed(0)
    channel = MemoryLayer(16, heads=2, chunk_size=4, gating="channel", gate_rank=8).double()
    channel.load_state_dict(token.state_dict(), strict=False)
    x = inputs()
    torch.testing.assert_close(channel(x)[0], token(x)[0], rtol=0, atol=1e-12)
    extra = {n for n, _ in channel.named_parameters()} - {n for n, _ in token.named_parameters()}
    assert extra == {"gate_down.weight", "gate_up.weight", "gate_up.bias"}
    assert channel.gate_up.weight.shape == (3 * 2 * (8 + 32), 8)  # (lr, momentum, decay) x heads x (8 + 4·8)


def test_channel_gating_needs_a_rule_that_takes_it():
    with pytest.raises(ValueError, match="gating='channel' needs a rule without PreDecay"):
        MemoryLayer(16, heads=2, rule=GATED_DELTANET, chunk_size=4, gating="channel")
    with pytest.raises(ValueError, match="gating='channel' needs"):
        MemoryLayer(16, heads=2, rule=DELTANET, chunk_size=1, impl="delta", gating="channel")
    with pytest.raises(ValueError, match="gate_rank must be an integer >= 1"):
        MemoryLayer(16, heads=2, gating="channel", gate_rank=0)


def test_gate_init_sets_the_starting_gates():
    layer = MemoryLayer(16, heads=2, gate_init={"decay": 0.001})
    gates = layer._gates(inputs(tokens=5, dtype=torch.float32), torch.float32)
    torch.testing.assert_close(gates.decay, torch.full_like(gates.decay, 0.001))
    torch.testing.assert_close(gates.lr, torch.full_like(gates.lr, 0.1))
    # θ = max_lr · σ(·): the starting θ is the one asked for whatever max_lr is
    capped = MemoryLayer(16, heads=2, max_lr=0.5, gate_init={"lr": 0.1})
    lr = capped._gates(inputs(tokens=5, dtype=torch.float32), torch.float32).lr
    torch.testing.assert_close(lr, torch.full_like(lr, 0.1))
    with pytest.raises(ValueError, match=r"gate_init\['decay'\] must be in \(0, 1\)"):
        MemoryLayer(16, heads=2, gate_init={"decay": 1.5})
    with pytest.raises(ValueError, match="gate_init keys must be among"):
        MemoryLayer(16, heads=2, gate_init={"forget": 0.1})


def test_huber_threshold_gate_starts_at_one():
    layer = MemoryLayer(16, heads=2, rule=PRESETS["yaad"])
    gates = layer._gates(torch.randn(1, 3, 16), torch.float32)
    torch.testing.assert_close(gates.threshold, torch.ones(1, 3, 2))
    torch.testing.assert_close(gates.lr, torch.full((1, 3, 2), 0.1))


def test_bf16_autocast_close_to_float32():
    torch.manual_seed(0)
    layer, x = MemoryLayer(64, heads=2), torch.randn(2, 200, 64)
    with torch.no_grad():
        y32, s32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, s16 = layer(x)
    assert s16.memory.weights[0].dtype == torch.float32, "the memory state stays float32 under autocast"
    # q, k, v themselves come out of bf16 projections here, so ~1-2% is the floor.
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 0.03, f"bf16 relative error {rel:.3f}"


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_inference_under_no_grad(impl):
    layer, x = make_layer(impl=impl), inputs(tokens=9)
    expected, _ = layer(x)
    with torch.no_grad():
        y, state = layer(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, expected.detach(), rtol=0, atol=1e-12)


def test_a_state_returned_without_autograd_is_not_changed_by_a_later_parameter_update():
    """A call under no_grad that ends inside the first chunk keeps the chunk-start weights: the learned initial
    memory. An optimizer step or load_state_dict after it must not change that state (as in LanguageModel)."""
    layer, x = make_layer(), inputs(tokens=5)
    with torch.no_grad():
        _, state = layer(x[:, :2])
        before = [t.clone() for t in state.memory.chunk_start]
        layer.initial_weights[0].mul_(2.0)
    assert all(torch.equal(a, b) for a, b in zip(before, state.memory.chunk_start))
    assert not any(t.requires_grad for t in (*state.memory.weights, *state.memory.chunk_start))


def test_learned_initial_memory_is_used():
    layer, x = make_layer(), inputs(tokens=5)
    y, _ = layer(x)
    with torch.no_grad():
        layer.initial_weights[0].add_(0.5)
    assert (layer(x)[0] - y).abs().max() > 1e-4


def test_bad_inputs():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"x must be \[B, T, dim=16\]"):
        layer(torch.randn(2, 5, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \[B, T, dim=16\]"):
        layer(torch.randn(5, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 5, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="impl must be one of"):
        MemoryLayer(16, heads=2, impl="fast")
    with pytest.raises(ValueError, match="not divisible by heads"):
        MemoryLayer(15, heads=2)
    _, state = layer(inputs(tokens=3, batch=2))
    with pytest.raises(ValueError, match="state must be a MemoryLayerState for a batch of 3"):
        layer(inputs(tokens=3, batch=3), state)
    with pytest.raises(TypeError, match="x is torch.float32 but the layer's parameters are torch.float64"):
        layer(inputs(tokens=3).float())
    with pytest.raises(ValueError, match="at least one sequence"):
        layer(inputs(tokens=3, batch=0))
    with pytest.raises(TypeError, match=r"x must be a tensor \[B, T, dim=16\], got list"):
        layer([[[0.0] * 16]])
    _, other = make_layer(conv_size=2)(inputs(tokens=3, batch=2))
    with pytest.raises(ValueError, match=r"state comes from another layer: its conv tail is \[1, 48\]"):
        layer(inputs(tokens=3, batch=2), other)
    y, same = layer(inputs(tokens=0, batch=2), state)  # an empty call: no output, the state as it was
    assert y.shape == (2, 0, 16) and same is state
    for kwargs, error, message in [({"heads": 0}, ValueError, "heads must be an integer >= 1, got 0"),
                                   ({"conv_size": 0}, ValueError, "conv_size must be an integer >= 1"),
                                   ({"head_dim": -2}, ValueError, "head_dim must be an integer >= 1"),
                                   ({"max_lr": math.inf}, ValueError, "max_lr must be a finite number > 0"),
                                   ({"gate_init": {"decay": "0.1"}}, TypeError, r"gate_init\['decay'\] must be"),
                                   ({"rule": "titans"}, TypeError, "rule must be a miras.memory.MemoryRule"),
                                   ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1, got 0"),
                                   ({"chunk_size": 2.5}, ValueError, "chunk_size must be an integer >= 1, got 2.5"),
                                   ({"max_lr": True}, ValueError, "max_lr must be a finite number > 0, got True")]:
        with pytest.raises(error, match=message):
            MemoryLayer(16, **{"heads": 2, **kwargs})


def test_engine_errors_name_the_problem():
    q = torch.randn(2, 5, 3, 4)
    gates = Gates(lr=torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match=r"must be a 4-d tensor \[B, T, H, D\]"):
        chunked(DELTANET, q[0], q[0], q[0], gates)
    with pytest.raises(ValueError, match="v must match k in"):
        chunked(DELTANET, q, q, torch.randn(2, 5, 2, 4), gates)
    with pytest.raises(TypeError, match="share one dtype"):
        chunked(DELTANET, q, q, q.double(), gates)
    with pytest.raises(ValueError, match=r"gates.lr must have shape \[B, T, H\]"):
        chunked(DELTANET, q, q, q, Gates(lr=torch.rand(2, 5, 2)))
    with pytest.raises(ValueError, match=r"needs gates \['decay'\]"):
        chunked(MAMBA2, q, q, q, gates)
    with pytest.raises(ValueError, match="does not use it"):
        chunked(DELTANET, q, q, q, Gates(lr=gates.lr, decay=gates.lr))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        chunked(DELTANET, q, q, q, gates, None, 0)
    with pytest.raises(ValueError, match="key and value dims equal"):
        chunked(TITANS, q, q, torch.randn(2, 5, 3, 5), Gates(lr=gates.lr, momentum=gates.lr, decay=gates.lr))
    _, state = chunked(DELTANET, q, q, q, gates, None, 4)
    assert state.position == 1
    with pytest.raises(ValueError, match="the state was left 1 tokens into a chunk of 4; continue it with "
                                         "chunk_size=4"):
        chunked(DELTANET, q, q, q, gates, state, 1)
    with pytest.raises(ValueError, match="state.position is 1: .* continue it with the chunk_size it was made with"):
        chunked(DELTANET, q, q, q, gates, dataclasses.replace(state, chunk_size=0), 1)  # a state saved before
    with pytest.raises(TypeError, match="the state's tensors must have q, k and v's dtype torch.float64"):
        chunked(DELTANET, q.double(), q.double(), q.double(), Gates(lr=gates.lr.double()), state)
    with pytest.raises(ValueError, match="state.position must be an integer >= 0"):
        chunked(DELTANET, q, q, q, gates, dataclasses.replace(state, position=-1))
    with pytest.raises(TypeError, match="rule must be a miras.memory.MemoryRule"):
        chunked("deltanet", q, q, q, gates)
    with pytest.raises(ValueError, match="at least one sequence and one head, got B=0"):
        chunked(DELTANET, q[:0], q[:0], q[:0], Gates(lr=gates.lr[:0]))
    with pytest.raises(TypeError, match="gates.lr must be a tensor of q, k and v's dtype torch.float32, got "
                                        "torch.float64"):
        chunked(DELTANET, q, q, q, Gates(lr=gates.lr.double()))
    with pytest.raises(TypeError, match="gates.lr must be a tensor .*, got float"):
        chunked(DELTANET, q, q, q, Gates(lr=0.1))
    # another device (meta stands in for a GPU) for an input, a gate or the state; a string rule on the delta path;
    # a state whose weights are not tensors
    with pytest.raises(ValueError, match=r"q, k, v and the gates must be on one device, got q on meta, k on cpu"):
        chunked(DELTANET, q.to("meta"), q, q, gates)
    with pytest.raises(ValueError, match=r"must be on one device, got .*gates.lr on meta"):
        chunked(DELTANET, q, q, q, Gates(lr=gates.lr.to("meta")))
    with pytest.raises(ValueError, match=r"the state must be on q, k and v's device cpu, got \['meta'\] "
                                         r"\(state.to\('cpu'\) moves it\)"):
        chunked(DELTANET, q, q, q, gates, state.to("meta"), 4)
    with pytest.raises(TypeError, match="rule must be a miras.memory.MemoryRule"):
        delta("deltanet", q, q, q, gates)
    with pytest.raises(TypeError, match=r"state.weights must be tensors, got \['str'\]"):
        chunked(DELTANET, q, q, q, gates, dataclasses.replace(state, weights=("a",), chunk_start=None, position=0))
    titans_gates = {"lr": gates.lr, "momentum": gates.lr, "decay": gates.lr}
    for name, value, message in [("momentum", -0.5, r"in \[0.0, 1.0\], got values in \[-0.5, -0.5\]"),
                                 ("decay", 1.5, r"in \[0.0, 1.0\]"), ("lr", math.nan, ">= 0.0"),
                                 ("lr", math.inf, ">= 0.0")]:
        bad = Gates(**{**titans_gates, name: torch.full_like(gates.lr, value)})
        for path in (chunked, recurrent):  # they disagreed on such gates (by 2.7 at momentum -0.5)
            with pytest.raises(ValueError, match=f"gates.{name} must be finite and {message}"):
                path(TITANS, q, q, q, bad, None, 4)
    with pytest.raises(ValueError, match="gates.threshold must be finite and > 0.0"):
        chunked(get_rule("yaad"), q, q, q, Gates(lr=gates.lr, decay=gates.lr, threshold=torch.zeros_like(gates.lr)))
    # read: the retrieval of a state, checked against q
    titans_state = initial_state(TITANS, 2, 3, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"state.weights must have shapes \[\(2, 3, 32, 8\)"):
        read(TITANS, titans_state, torch.randn(2, 5, 3, 8))
    with pytest.raises(TypeError, match="weights must have q's dtype torch.float64"):
        read(TITANS, titans_state, q.double())
    with pytest.raises(TypeError, match="state must be a miras.memory.MemoryState"):
        read(TITANS, None, q)
    with pytest.raises(ValueError, match="key and value dims equal"):
        initial_state(TITANS, 2, 3, 4, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        initial_state(TITANS, 2, 3, 4, 4, dtype=torch.long)


def test_a_whole_model_compile_leaves_the_engine_out_of_its_graph(monkeypatch):
    """torch.compile over a model (compile=true) runs the engine outside the trace: traced, its loop was
    unrolled over every chunk (no training step within 10 minutes of compiling titans-lmm-tiny). The compiled
    layer equals the eager one."""
    import miras.layers.memory_layer as module

    traced = []

    def spy(*args, **kwargs):
        traced.append(torch.compiler.is_compiling())
        return engine(*args, **kwargs)

    engine = module.chunked
    monkeypatch.setattr(module, "chunked", spy)
    torch.manual_seed(0)
    layer, x = MemoryLayer(16, 2, chunk_size=4), torch.randn(2, 12, 16)
    expected, _ = layer(x)
    compiled, _ = torch.compile(layer)(x)
    assert traced == [False, False]
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)


def test_nan_gates_from_a_diverged_input_say_where_they_come_from():
    """A layer fed NaN (an earlier layer diverged) computes NaN gates: the error says the input is the cause. A
    finite input with out-of-range gates keeps the engine's own message."""
    from miras.memory.state import InputRangeError

    torch.manual_seed(0)
    layer = MemoryLayer(16, heads=2, chunk_size=4)
    x = torch.randn(1, 6, 16)
    x[0, 3, 5] = math.nan
    with pytest.raises(InputRangeError, match=r"^gates.lr must be finite and >= 0.0, got values in \[nan, nan\]: this "
                                             r"memory layer's input holds NaN or inf, so an earlier layer, or the "
                                             r"state carried into the model, has diverged$"):
        layer(x)
    with torch.no_grad():
        layer.gate_proj.bias.fill_(math.nan)
    with pytest.raises(InputRangeError, match=r"got values in \[nan, nan\]$"):
        layer(torch.randn(1, 6, 16))
