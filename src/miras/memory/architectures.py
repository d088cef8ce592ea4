"""Memory architectures: the first MIRAS axis (what the memory M is).

An architecture is pure math: a frozen dataclass with no parameters. Both engine paths use it
through three methods, so a new architecture slots in without touching them:

- ``apply(x, linear)``: run M on ``x`` where ``linear(l, u)`` computes layer l's pre-activation
  ``W_l u``. The reference passes the plain matmul; the chunked path passes the dual-form read
  (``chunked``'s module docstring), whose layer-l weights differ per token. Layer 0 must read ``x`` itself
  (the chunked path precomputes its scores from the raw queries and keys).
- ``signals(weights, x, output_grad, linear=None, linear_t=None)``: forward at fixed weights, then
  the closed-form backward. Returns, per layer, the back-propagated signal δ_l ``[..., N, out]`` and
  the layer input a_l ``[..., N, in]``; the per-token weight gradient is their outer product
  δ_l ⊗ a_l. The weights are used only through ``linear(l, u) = W_l u`` and ``linear_t(l, g) = g W_l``
  (default: the matmuls with ``weights``), so a caller may hold them implicitly (memory/span.py).
- ``weight_shapes`` / ``default_weights``: the ``(out, in)`` of each layer and the default init.

Weights are ``[B, H, out, in]``; inputs ``[B, H, N, D]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

Linear = Callable[[int, Tensor], Tensor]
LN_EPS = 1e-5


def matmul_linear(weights: tuple[Tensor, ...] | list[Tensor]) -> Linear:
    """``linear(l, u) = u W_lᵀ``: the plain forward pass at fixed weights."""
    return lambda layer, u: torch.matmul(u, weights[layer].transpose(-1, -2))


def matmul_linear_t(weights: tuple[Tensor, ...] | list[Tensor]) -> Linear:
    """``linear_t(l, g) = g W_l``: a signal ``g`` [..., out] back through layer l at fixed weights."""
    return lambda layer, g: torch.matmul(g, weights[layer])


def batch_shared(t: Tensor) -> bool:
    """``t`` is one tensor expanded over a batch of more than one row (batch stride 0): a layer's learned
    initial memory as ``init_state`` gives it to every sequence."""
    return t.dim() > 0 and t.shape[0] > 1 and t.stride(0) == 0


def shared_matmul(u: Tensor, w: Tensor, *, transpose: bool) -> Tensor:
    """``u Wᵀ`` (or ``u W``) per batch row and head, u ``[B, H, T, d]``, w ``[B, H, out, in]``.

    Weights shared by every batch row (a learned initial memory expanded with batch stride 0) are
    multiplied once per head: ``torch.matmul`` would copy them per row (its batched path reshapes the
    expanded operand). The gradient w.r.t. ``w`` is still one per row (``_SharedMatmul``), as the plain
    matmul gives it: what ``w`` was expanded from gets their sum, and a caller that asks for the
    gradient w.r.t. the expanded tensor itself (``autograd.grad``, a leaf) gets every row's own. Under
    autocast it is the plain matmul, whose casts autocast owns (a float64 operand is not cast, a
    float32 one is, and the cast copies the rows)."""
    if (u.dim() != 4 or w.dim() != 4 or not batch_shared(w) or u.shape[0] != w.shape[0]
            or torch.is_autocast_enabled(u.device.type)):
        return _per_row(u, w, transpose)
    return _SharedMatmul.apply(u, w, transpose)


def _rows_shared(u: Tensor, w: Tensor, transpose: bool) -> Tensor:
    """``u Wᵀ`` (or ``u W``) with W = w[0] for every row: one matmul per head over all rows' tokens."""
    batch, heads, tokens, dim = u.shape
    out = torch.matmul(u.transpose(0, 1).reshape(heads, batch * tokens, dim), w[0].transpose(-1, -2) if transpose
                       else w[0])
    return out.view(heads, batch, tokens, -1).transpose(0, 1)


def _per_row(u: Tensor, w: Tensor, transpose: bool) -> Tensor:
    """``u Wᵀ`` (or ``u W``) with each row's own W (a tangent or gradient of the shared weights is per row)."""
    return torch.matmul(u, w.transpose(-1, -2) if transpose else w)


class _SharedMatmul(torch.autograd.Function):
    """``shared_matmul``'s stride-0 case. Forward multiplies by w[0] alone; backward gives u its gradient
    the same way and w one gradient per row, [B, H, out, in] (what backward through an expand makes
    anyway). Backward and the forward-mode ``jvp`` are made of differentiable ops (backward through this
    function again), so second derivatives and ``torch.func`` (grad, jvp, vmap) work."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, w: Tensor, transpose: bool) -> Tensor:
        return _rows_shared(u, w, transpose)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        u, w, transpose = inputs
        ctx.save_for_backward(u, w)
        ctx.save_for_forward(u, w)
        ctx.transpose = transpose

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, w = ctx.saved_tensors
        grad_u = grad_w = None
        if ctx.needs_input_grad[0]:  # out = u M with M = Wᵀ (transpose) or W: du = grad Mᵀ
            grad_u = shared_matmul(grad, w, transpose=not ctx.transpose)
        if ctx.needs_input_grad[1]:  # dM = uᵀ grad per row; dW = dMᵀ when M = Wᵀ
            grad_w = (torch.matmul(grad.transpose(-1, -2), u) if ctx.transpose
                      else torch.matmul(u.transpose(-1, -2), grad))
        return grad_u, grad_w, None

    @staticmethod
    def jvp(ctx, tangent_u: Tensor | None, tangent_w: Tensor | None, _) -> Tensor:
        u, w = ctx.saved_tensors
        out = None if tangent_u is None else shared_matmul(tangent_u, w, transpose=ctx.transpose)
        if tangent_w is not None:  # a per-row tangent of the shared weights
            term = _per_row(u, tangent_w, ctx.transpose)
            out = term if out is None else out + term
        return out


def _silu_backward(grad: Tensor, z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return grad * s * (1.0 + z * (1.0 - s))


# name -> (activation, backward(grad_out, pre_activation) -> grad_in). Each backward must itself be
# differentiable (the outer loop differentiates through it): aten's gelu_backward is, silu's is not.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "gelu": (F.gelu, torch.ops.aten.gelu_backward),
    "silu": (F.silu, _silu_backward),
    "relu": (F.relu, lambda grad, z: grad * (z > 0).to(grad.dtype)),
}


def random_weights(shapes: list[tuple[int, int]], *, dtype: torch.dtype, device=None) -> list[Tensor]:
    """N(0, 1/fan_in) matrices of ``(out, in)`` shapes, from a fixed seed (the same on every call)."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(out, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)).to(dtype=dtype, device=device)
            for out, inp in shapes]


@dataclass(frozen=True, kw_only=True)
class LinearMemory:
    """A matrix memory: M(W; x) = W x, W ``[dv, dk]``. Default (state=None) init: zeros."""

    kind: ClassVar[str] = "linear"

    def check_dims(self, dk: int, dv: int) -> None:
        pass

    def weight_shapes(self, dk: int, dv: int) -> list[tuple[int, int]]:
        return [(dv, dk)]

    def default_weights(self, dk: int, dv: int, *, dtype: torch.dtype, device=None) -> list[Tensor]:
        return [torch.zeros(dv, dk, dtype=dtype, device=device)]

    def apply(self, x: Tensor, linear: Linear) -> Tensor:
        return linear(0, x)

    def signals(self, weights, x: Tensor, output_grad: Callable[[Tensor], Tensor], linear: Linear | None = None,
                linear_t: Linear | None = None):
        pred = (linear or matmul_linear(weights))(0, x)
        return pred, [output_grad(pred)], [x]


@dataclass(frozen=True, kw_only=True)
class MLPMemory:
    """A deep memory (Titans §3.1, MIRAS §5.3): M(x) = x + LN(W_L σ(… σ(W_1 x))).

    LN is ``layer_norm`` over the last dim with no affine parameters (eps 1e-5); hidden width is
    ``expansion * d``; σ is exact (erf) GELU by default. The residual needs dk == dv.
    Default (state=None) init: N(0, 1/fan_in) from a fixed seed, identical for every batch row and
    head (a zero init is a saddle point of the inner loss: no gradient would ever reach W_1).
    """

    depth: int = 2
    expansion: int = 4
    activation: str = "gelu"
    kind: ClassVar[str] = "mlp"

    def __post_init__(self):
        for name in ("depth", "expansion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MLPMemory {name} must be an integer, got {value!r}")
        if self.depth < 2:
            raise ValueError(f"MLPMemory needs depth >= 2 (depth 1 is LinearMemory), got {self.depth}")
        if self.expansion < 1:
            raise ValueError(f"MLPMemory expansion must be >= 1, got {self.expansion}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {sorted(ACTIVATIONS)}")

    def check_dims(self, dk: int, dv: int) -> None:
        if dk != dv:
            raise ValueError(f"MLPMemory has a residual connection and needs key and value dims equal, got {dk}, {dv}")

    def weight_shapes(self, dk: int, dv: int) -> list[tuple[int, int]]:
        hidden = self.expansion * dk
        widths = [dk] + [hidden] * (self.depth - 1) + [dv]
        return [(widths[i + 1], widths[i]) for i in range(self.depth)]

    def default_weights(self, dk: int, dv: int, *, dtype: torch.dtype, device=None) -> list[Tensor]:
        return random_weights(self.weight_shapes(dk, dv), dtype=dtype, device=device)

    def apply(self, x: Tensor, linear: Linear) -> Tensor:
        act = ACTIVATIONS[self.activation][0]
        u = x
        for layer in range(self.depth):
            u = linear(layer, u)
            if layer < self.depth - 1:
                u = act(u)
        return x + F.layer_norm(u, u.shape[-1:], eps=LN_EPS)

    def signals(self, weights, x: Tensor, output_grad: Callable[[Tensor], Tensor], linear: Linear | None = None,
                linear_t: Linear | None = None):
        act, act_backward = ACTIVATIONS[self.activation]
        linear, linear_t = linear or matmul_linear(weights), linear_t or matmul_linear_t(weights)
        acts, pre = [x], []
        u = x
        for layer in range(self.depth):
            # Under autocast the matmul returns bf16; the elementwise work stays in the engine dtype.
            z = linear(layer, u).to(x.dtype)
            pre.append(z)
            if layer < self.depth - 1:
                u = act(z)
                acts.append(u)
        # aten's LayerNorm forward/backward pair: one kernel each, and twice differentiable.
        shape = [z.shape[-1]]
        normed, mean, rstd = torch.ops.aten.native_layer_norm(z, shape, None, None, LN_EPS)
        pred = x + normed
        dz = torch.ops.aten.native_layer_norm_backward(output_grad(pred), z, shape, mean, rstd, None, None,
                                                       [True, False, False])[0]
        deltas = [dz]
        for layer in range(self.depth - 1, 0, -1):
            dz = act_backward(linear_t(layer, dz).to(x.dtype), pre[layer - 1])
            deltas.append(dz)
        return pred, deltas[::-1], acts
