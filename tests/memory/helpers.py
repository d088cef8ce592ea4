"""Random engine inputs for tests: unit-norm q and k, gates in their ranges, a perturbed state."""

import torch
import torch.nn.functional as F

from miras.memory import MEMORA, MONETA, Gates, MemoryRule, MemoryState, initial_state

# Moneta (p = 3 bias, normalised every chunk) and Memora (softmax of the logits) are chaotic maps at
# inner steps θ ~ 0.5 on these tiny random problems: two float64 evaluations in a different order
# then drift apart exponentially (1e-15 -> 1e-7 over 37 tokens), which no implementation can match.
# At 10x smaller steps (the layer's initial θ is 0.1) they are well-conditioned.
LR_SCALE = {MONETA: 0.1, MEMORA: 0.1}


def make_inputs(rule: MemoryRule, batch=2, tokens=13, heads=3, dim=4, *, dtype=torch.float64, seed=0,
                requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    q = F.normalize(normal(batch, tokens, heads, dim), dim=-1)
    k = F.normalize(normal(batch, tokens, heads, dim), dim=-1)
    v = normal(batch, tokens, heads, dim)
    gates = {"lr": LR_SCALE.get(rule, 1.0) * (0.05 + 0.5 * uniform(batch, tokens, heads))}
    if "momentum" in rule.needed_gates():
        gates["momentum"] = 0.05 + 0.9 * uniform(batch, tokens, heads)
    if "decay" in rule.needed_gates():
        gates["decay"] = 0.3 * uniform(batch, tokens, heads)
    if "threshold" in rule.needed_gates():  # RMS errors here are O(1): both Huber branches occur
        gates["threshold"] = 0.2 + 1.5 * uniform(batch, tokens, heads)
    state = initial_state(rule, batch, heads, dim, dim, dtype=dtype)
    weights = tuple(w + 0.1 * normal(*w.shape) for w in state.weights)
    if hasattr(rule.retention, "initial"):  # a constrained memory: random logits mapped onto it
        weights = rule.retention.initial(tuple(0.5 * normal(*w.shape) for w in state.weights))
    momentum = None if state.momentum is None else tuple(0.1 * normal(*s.shape) for s in state.momentum)
    state = MemoryState(weights, momentum)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        gates = {name: g.requires_grad_() for name, g in gates.items()}
        for t in state.weights + (state.momentum or ()):
            t.requires_grad_()
    return q, k, v, Gates(**gates), state


def leaves(q, k, v, gates: Gates, state: MemoryState):
    """Every differentiable input, in a fixed order, with names for error messages."""
    named = [("q", q), ("k", k), ("v", v)]
    named += [(f"gates.{n}", g) for n, g in gates.present().items()]
    named += [(f"state.weights[{i}]", w) for i, w in enumerate(state.weights)]
    named += [(f"state.momentum[{i}]", s) for i, s in enumerate(state.momentum or ())]
    return named


def run_with_grads(fn, rule, inputs, chunk_size, seed=1):
    """Outputs, final state and the gradient of a random linear function of both w.r.t. every input."""
    q, k, v, gates, state = inputs
    y, final = fn(rule, q, k, v, gates, state, chunk_size)
    gen = torch.Generator().manual_seed(seed)
    outs = [y, *final.weights, *(final.momentum or ())]
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    named = leaves(*inputs)
    grads = torch.autograd.grad(loss, [t for _, t in named])
    return outs, dict(zip([n for n, _ in named], grads))


def assert_close(a, b, what, tol=1e-10):
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} (scale {scale:.2e})"
