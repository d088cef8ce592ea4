"""Random engine inputs for tests: unit-norm q and k, gates in their ranges, a perturbed state."""

import torch
import torch.nn.functional as F

from miras.memory import Gates, MemoryRule, MemoryState, initial_state


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
    gates = {"lr": 0.05 + 0.5 * uniform(batch, tokens, heads)}
    if "momentum" in rule.needed_gates():
        gates["momentum"] = 0.05 + 0.9 * uniform(batch, tokens, heads)
    if "decay" in rule.needed_gates():
        gates["decay"] = 0.3 * uniform(batch, tokens, heads)
    state = initial_state(rule, batch, heads, dim, dim, dtype=dtype)
    weights = tuple(w + 0.1 * normal(*w.shape) for w in state.weights)
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
