"""MAC, MAG and MAL against references written out by hand (float64): the composition of each model, token by
token, from the layers' own weights. The other model tests hold the fast paths to each other (causal, streaming,
cached decoding); these hold them to the definitions (Titans §4; DESIGN's pinned MAC, MAG and MAL): a norm, a
gate, a RoPE position or a normalisation left out passes those and fails these."""

import math

import torch
import torch.nn.functional as F

from miras.models import create

from ..layers.helpers import rotate_by_hand


def memory_mlp(weights, u):
    """M(u) = u + LN(W_2 GELU(W_1 u)) per head: weights [H, out, in], u [H, D]."""
    z = u
    for layer, w in enumerate(weights):
        z = torch.einsum("hoi,hi->ho", w, z)
        z = F.gelu(z) if layer < len(weights) - 1 else z
    return u + F.layer_norm(z, z.shape[-1:], eps=1e-5)


class MemoryByHand:
    """A Titans MemoryLayer token by token: projections, causal conv, SiLU, L2-normalised q and k, gates
    θ = max_lr·σ, α = σ, η = σ, gradients at the chunk-start weights, momentum, decay, read after write,
    then per-head RMSNorm, a SiLU gate from x and the output projection."""

    def __init__(self, layer):
        self.layer, self.count = layer, 0
        self.weights = [w.detach().clone() for w in layer.initial_weights]
        self.momentum = [torch.zeros_like(w) for w in self.weights]
        self.start = self.weights
        self.history = torch.zeros(layer.conv_weight.shape[1] - 1, layer.conv_weight.shape[0], dtype=torch.float64)

    def __call__(self, x):  # x [T, dim] -> [T, dim]
        layer, heads, dim = self.layer, self.layer.heads, self.layer.head_dim
        projected, reads = layer.qkv(x), []
        for t in range(x.shape[0]):
            self.history = torch.cat([self.history, projected[t:t + 1]])
            mixed = (self.history * layer.conv_weight.T).sum(0)  # kernel 4 over this token and the 3 before
            self.history = self.history[1:]
            q, k, v = F.silu(mixed).view(3, heads, dim)
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            gates = dict(zip(layer.gate_names, layer.gate_proj(x[t]).view(len(layer.gate_names), heads)))
            lr = layer.max_lr * torch.sigmoid(gates["lr"])
            decay, eta = torch.sigmoid(gates["decay"]), torch.sigmoid(gates["momentum"])
            if self.count % layer.chunk_size == 0:
                self.start = [w.clone() for w in self.weights]
            at = [w.clone().requires_grad_() for w in self.start]
            grads = torch.autograd.grad(0.5 * ((memory_mlp(at, k) - v) ** 2).sum(), at)
            self.momentum = [eta[:, None, None] * s - lr[:, None, None] * g for s, g in zip(self.momentum, grads)]
            self.weights = [(1 - decay[:, None, None]) * w + s for w, s in zip(self.weights, self.momentum)]
            reads.append(memory_mlp(self.weights, q))
            self.count += 1
        y = F.rms_norm(torch.stack(reads), (dim,), layer.out_norm_weight, eps=1e-6).reshape(x.shape[0], -1)
        return layer.out_proj(y * F.silu(layer.out_gate(x)))


def attend(q, k, v, visible):
    """Softmax attention of one query over the keys ``visible`` lists: q [H, D], k, v [H, K, D]."""
    weights = torch.softmax(torch.einsum("hd,hkd->hk", q, k[:, visible]) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("hk,hkd->hd", weights, v[:, visible]).reshape(-1)


def test_mac_equals_its_definition_by_hand():
    """Per segment: h = M_before(L2norm(W_Q x)) projected back; attention over [P ‖ h ‖ S] with RoPE at P 0..N_p−1,
    h_j N_p + j, S_j N_p + segment + j, query i seeing P, h_1..h_i, S_1..S_i; the memory writes y; o = y ⊙
    σ(RMSNorm(M(y))). Two segments and 7 tokens, max_lr 0.5 and data-dependent gates."""
    torch.manual_seed(0)
    model = create("titans-mac-tiny").double()
    mac = model.blocks[0].mixer
    memory = mac.memory
    with torch.no_grad():
        memory.gate_proj.weight.normal_(0, 0.3)
        memory.max_lr = 0.5
    segment, persistent, heads, head_dim = mac.segment, mac.n_persistent, mac.heads, mac.head_dim
    x = torch.randn(1, 2 * segment + 7, mac.dim, dtype=torch.float64)

    def project(z, positions):
        q, k, v = mac.qkv(z).view(z.shape[0], 3, heads, head_dim).permute(1, 2, 0, 3)
        return rotate_by_hand(q, positions), rotate_by_hand(k, positions), v

    by_hand, outputs = MemoryByHand(memory), []
    for first in range(0, x.shape[1], segment):
        s = x[0, first:first + segment]
        n = s.shape[0]
        before = [w.clone() for w in by_hand.weights]
        query = F.normalize(mac.retrieve_q(s).view(n, memory.heads, memory.head_dim), dim=-1)
        h = mac.retrieve_out(torch.stack([memory_mlp(before, query[i]) for i in range(n)]).reshape(n, -1))
        _, k_p, v_p = project(mac.persistent, torch.arange(persistent))
        _, k_h, v_h = project(h, persistent + torch.arange(n))
        q_s, k_s, v_s = project(s, persistent + segment + torch.arange(n))
        keys, values = torch.cat([k_p, k_h, k_s], 1), torch.cat([v_p, v_h, v_s], 1)
        y = mac.out(torch.stack([attend(q_s[:, i], keys, values,
                                        [*range(persistent), *(persistent + j for j in range(i + 1)),
                                         *(persistent + n + j for j in range(i + 1))]) for i in range(n)]))
        r = by_hand(y)
        outputs.append(y * torch.sigmoid(F.rms_norm(r, (mac.dim,), mac.gate_norm.weight, eps=1e-6)))
    torch.testing.assert_close(mac(x)[0], torch.cat(outputs)[None], rtol=1e-10, atol=1e-10)


def test_mag_and_mal_blocks_equal_their_definitions_by_hand():
    """MAG: y = SWA*(P ‖ x) (the window always sees the N_p persistent tokens), m = LMM(P ‖ x), o = RMSNorm_a(y) ⊙
    σ(RMSNorm_b(m)). MAL: o = SWA(LMM(P ‖ x)), no sinks. Both inside the pre-norm block, P dropped after its MLP;
    75 tokens, past twice the window."""
    for family in ("titans-mag", "titans-mal"):
        torch.manual_seed(0)
        model = create(f"{family}-tiny").double()
        block = model.blocks[0]
        mixer, persistent = block.mixer, block.persistent.shape[0]
        with torch.no_grad():
            mixer.memory.gate_proj.weight.normal_(0, 0.3)
            for name, parameter in block.named_parameters():  # norm gains away from 1: swapping two shows
                if "norm" in name:
                    parameter.uniform_(0.5, 1.5)
        x = torch.randn(1, 75, model.config.dim, dtype=torch.float64)
        full = torch.cat([block.persistent, x[0]])
        normed = block.mixer_norm(full)

        def window_attention(z, sinks):
            attention = mixer.attention
            q, k, v = attention.qkv(z).view(z.shape[0], 3, attention.heads, attention.head_dim).permute(1, 2, 0, 3)
            positions = torch.arange(z.shape[0])
            q, k = rotate_by_hand(q, positions), rotate_by_hand(k, positions)
            return attention.out(torch.stack([
                attend(q[:, i], k, v, [j for j in range(i + 1) if i - j < model.config.window or j < sinks])
                for i in range(z.shape[0])]))

        if family == "titans-mag":
            y, m = window_attention(normed, persistent), MemoryByHand(mixer.memory)(normed)
            o = (F.rms_norm(y, (model.config.dim,), mixer.attention_norm.weight, eps=1e-6)
                 * torch.sigmoid(F.rms_norm(m, (model.config.dim,), mixer.memory_norm.weight, eps=1e-6)))
        else:
            o = window_attention(MemoryByHand(mixer.memory)(normed), 0)
        z = full + o
        z = z + block.mlp(block.mlp_norm(z))
        torch.testing.assert_close(block(x, None, start=True)[0], z[persistent:][None], rtol=1e-10, atol=1e-10,
                                   msg=family)


def test_the_transformer_is_the_llama_macro_by_hand():
    """embedding → per block x + attention(RMSNorm(x)), x + SwiGLU(RMSNorm(x)) with SwiGLU(z) = W_down(SiLU(W_g z)
    ⊙ W_u z) → RMSNorm → the head tied to the embedding: dropping any norm or the SiLU passed every other test."""
    torch.manual_seed(0)
    model = create("transformer-tiny").double()
    with torch.no_grad():  # norm gains away from 1, so that dropping one shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    ids = torch.randint(0, 256, (1, 23))
    dim = model.config.dim

    def norm(module, z):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * module.weight

    x = model.embed.weight[ids[0]]
    for block in model.blocks:
        attention, z = block.mixer, norm(block.mixer_norm, x)
        q, k, v = attention.qkv(z).view(z.shape[0], 3, attention.heads, attention.head_dim).permute(1, 2, 0, 3)
        positions = torch.arange(z.shape[0])
        q, k = rotate_by_hand(q, positions), rotate_by_hand(k, positions)
        x = x + attention.out(torch.stack([attend(q[:, i], k, v, list(range(i + 1))) for i in range(z.shape[0])]))
        z = norm(block.mlp_norm, x)
        gate, up = (z @ block.mlp.gate_up.weight.T).split(block.mlp.down.weight.shape[1], dim=-1)
        x = x + (F.silu(gate) * up) @ block.mlp.down.weight.T
    logits = norm(model.norm, x) @ model.embed.weight.T
    assert model.head.weight is model.embed.weight and logits.shape == (23, 256) and dim == x.shape[-1]
    torch.testing.assert_close(model(ids)[0][0], logits, rtol=1e-10, atol=1e-10)
