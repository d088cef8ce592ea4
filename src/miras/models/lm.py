"""The language model shared by every family (Llama macro).

embedding → blocks (pre-RMSNorm residual: x + mixer(norm(x)), x + SwiGLU(norm(x))) → RMSNorm → head.
One forward signature for all: ``model(ids [B, T], state=None) -> (logits [B, T, V], state)``;
feeding a document in segments with the state carried equals one pass over it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import json
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers import Attention, MemoryLayer
from .config import FIXED_GATE_FAMILIES, HYBRID_FAMILIES, ModelConfig, preset_config, unused_fields
from .hybrids import MemoryAsGate, MemoryAsLayer
from .mac import MemoryAsContext
from .state import ModelState

# every config field's default: a state layout saved before a field was added held it at its default
_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
             for f in dataclasses.fields(ModelConfig)}


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages of the C heap that hold no live allocation back to the OS (glibc's ``malloc_trim(0)``;
    nothing with another C library). Freed tensors' memory otherwise stays in the process, so its peak
    resident memory is set by how the allocations were laid out, not by what was live."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _release_after_backward(grad: Tensor) -> None:
    release_freed_memory()


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is any TokenMixer.

    With ``persistent`` > 0 the block owns N_p learned, input-independent tokens P (Titans Eq. 19)
    and, at the start of a stream, runs on P ‖ x and drops P's outputs: the mixer's state then
    holds what it made of P (the memory wrote it; MAG's attention keeps P visible as sink positions, while
    MAL's plain sliding window lets P fall out of its window like any other token).

    ``recompute`` > 0 (tokens): under autograd, x + mlp(norm(x)) runs in groups of that many tokens,
    each checkpointed, so backward keeps only each group's input and recomputes the rest (the MLP's
    hidden activations are most of what a long training row keeps). Same values and gradients.
    On the CPU it also hands back to the OS the heap pages that freed tensors left behind
    (``release_freed_memory``), after the mixer's forward and after the block's backward: glibc keeps them,
    and a recomputing mixer frees many mid-sized tensors between the ones it keeps. One 16K-token step of
    titans-mac-small with ``recompute=64`` peaked at ~1,670 MiB RSS without it and ~1,230 MiB with it, at
    the same speed; transformer-small at ~1,470 and ~1,320 (by hand, one process each).
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp: nn.Module, persistent: int = 0, recompute: int = 0):
        super().__init__()
        self.mixer_norm, self.mixer = nn.RMSNorm(dim, eps=1e-6), mixer
        self.mlp_norm, self.mlp = nn.RMSNorm(dim, eps=1e-6), mlp
        self.persistent = nn.Parameter(0.02 * torch.randn(persistent, dim)) if persistent else None
        self.recompute = recompute

    def forward(self, x: Tensor, state=None, *, start: bool = False):
        prefix = 0
        if start and self.persistent is not None:
            prefix = self.persistent.shape[0]
            x = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        y, state = self.mixer(self.mixer_norm(x), state)
        recomputes = bool(self.recompute) and torch.is_grad_enabled()
        if recomputes and x.device.type == "cpu":
            release_freed_memory()
            if x.requires_grad:  # called once this block's backward has given x its gradient
                x.register_hook(_release_after_backward)
        x = x + y
        if recomputes:
            x = torch.cat([checkpoint(self._mlp_residual, group, use_reentrant=False)
                           for group in x.split(self.recompute, dim=1)], dim=1)
        else:
            x = self._mlp_residual(x)
        return x[:, prefix:], state

    def _mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.mlp_norm(x))

    def init_state(self, batch: int):
        return self.mixer.init_state(batch)


def build_mixer(config: ModelConfig, index: int = 0) -> nn.Module:
    """The token mixer of block ``index``."""
    if config.family == "transformer":
        return Attention(config.dim, config.heads)
    if config.family == "swa-transformer" or (config.family in HYBRID_FAMILIES and index % 2 == 1):
        return Attention(config.dim, config.heads, window=config.window)
    memory = MemoryLayer(config.dim, config.heads, rule=config.memory_rule(), chunk_size=config.chunk_size,
                         impl=config.impl, block_size=config.block_size,
                         gating=_gating(config), gate_rank=config.gate_rank or 32,
                         # MAC calls its memory once per segment, so it groups whole segments itself
                         # (its memory then keeps no per-chunk activations: the fused backward)
                         recompute=0 if config.family == "titans-mac" else config.recompute,
                         fused=True if config.family == "titans-mac" and config.recompute else None,
                         gate_init={"decay": config.decay_init, "lr": config.lr_init})
    if config.family == "titans-mag":
        return MemoryAsGate(memory, Attention(config.dim, config.heads, window=config.window,
                                              sinks=config.persistent))
    if config.family == "titans-mal":
        return MemoryAsLayer(memory, Attention(config.dim, config.heads, window=config.window))
    if config.family == "titans-mac":
        return MemoryAsContext(memory, config.dim, config.heads, config.segment, config.persistent,
                               recompute=config.recompute)
    return memory


def _gating(config: ModelConfig) -> str:
    if config.family in FIXED_GATE_FAMILIES:  # (a gate_rank there is refused by ModelConfig)
        return "fixed"
    return "channel" if config.gate_rank else "token"


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"LanguageModel takes a ModelConfig (or use create('titans-lmm-tiny')), "
                            f"got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(
            Block(config.dim, build_mixer(config, index), SwiGLU(config.dim, config.mlp_hidden),
                  # MAC keeps its persistent tokens inside its attention context instead.
                  0 if config.family == "titans-mac" else config.persistent,
                  recompute=config.recompute_tokens)
            for index in range(config.layers))
        self.norm = nn.RMSNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self._state_types: tuple[type, ...] | None = None  # each block's state type, for checking states
        self._left_out = self._layout_left_out()
        layout = config.to_dict()
        if config.rule is not None and config.axes_rule().architecture.kind == "mlp":
            # the memory in effect: a field naming the family's own value (memory_depth=2) is recorded as 0
            own, used = config.axes_rule().architecture, config.memory_rule().architecture
            if used.kind == "linear":
                layout.update(memory_depth=1, memory_expansion=0)
            else:
                layout.update(memory_depth=0 if used.depth == own.depth else used.depth,
                              memory_expansion=0 if used.expansion == own.expansion else used.expansion)
        self._state_layout = json.dumps({k: v for k, v in layout.items() if k not in self._left_out},
                                        sort_keys=True, separators=(",", ":"))

    @property
    def state_layout(self) -> str:
        """The config fields that shape this model's state (JSON): what ModelState.model records, so that a
        state is refused by a model of another family, width, head count, segment, window, chunk size...
        Fields that only choose how it is computed or how it starts (impl, block_size, recompute, gate inits) and
        those outside the mixers (vocabulary, MLP width, tied embeddings), and fields the family does not read
        (``unused_fields``), are left out."""
        return self._state_layout

    def _layout_left_out(self) -> set[str]:
        left_out = {"impl", "block_size", "recompute", "decay_init", "lr_init", "vocab_size", "mlp_ratio",
                    "tie_embeddings", *unused_fields(self.config)}
        if self.config.rule is None:  # attention keeps no chunks (chunk_size only groups its MLP's recompute)
            left_out.add("chunk_size")
        return left_out

    def init_state(self, batch: int) -> ModelState:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
            raise ValueError(f"batch must be an integer >= 0 (sequences in the state), got {batch!r}")
        return ModelState(tuple(block.init_state(batch) for block in self.blocks), 0, self.state_layout)

    def forward(self, ids: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        _check_tensor("ids", ids)
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"ids must be an int64 or int32 tensor [B, T], got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[0] < 1:
            raise ValueError("ids must hold at least one sequence (B >= 1)")
        if ids.device != self.head.weight.device:
            device = self.head.weight.device
            raise ValueError(f"ids are on {ids.device}, the model on {device}: move them there, "
                             f"ids.to({str(device)!r})")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if state is None:
            state = self.init_state(ids.shape[0])
        else:
            self._check_state(state, ids.shape[0])
        if ids.shape[1] == 0:  # nothing to read: no logits, the state as it was
            return self.head.weight.new_zeros(ids.shape[0], 0, self.config.vocab_size), _returned(state)
        x = self.embed(ids)
        new_states = []
        for block, block_state in zip(self.blocks, state.layers):
            x, block_state = block(x, block_state, start=state.seen == 0)
            new_states.append(block_state)
        return self.head(self.norm(x)), _returned(ModelState(tuple(new_states), state.seen + ids.shape[1],
                                                             self.state_layout))

    def _check_state(self, state, batch: int) -> None:
        """A state this model made (``init_state`` or a previous call) for ``batch`` sequences."""
        if not isinstance(state, ModelState) or len(state.layers) != len(self.blocks):
            got = f"{len(state.layers)} layer states" if isinstance(state, ModelState) else type(state).__name__
            raise ValueError(f"state must be a ModelState with one state per block ({len(self.blocks)} for this "
                             f"{self.config.family} model; from init_state or a previous call), got {got}")
        if state.model and state.model != self.state_layout:
            # (states saved before 802487f recorded every field, the unread window and segment too)
            # (and a field added since is absent from older layouts: it had its default)
            # Another family's layout lacks the fields it does not read: only the fields both record are compared.
            theirs, ours = ModelState.layout(state.model), json.loads(self.state_layout)
            same = theirs.get("family") == ours["family"]
            if same:
                theirs = {**{k: v for k, v in _DEFAULTS.items() if k in ours}, **theirs}
            fields = (set(theirs) | set(ours)) if same else (set(theirs) & set(ours))
            differ = ", ".join(f"{k}={theirs.get(k)!r} (this model: {ours.get(k)!r})"
                               for k in sorted(fields - self._left_out) if theirs.get(k) != ours.get(k))
            if differ:
                raise ValueError(f"state comes from a different model: {differ}; pass a state this model made "
                                 "(init_state or a previous call)")
        if self._state_types is None:  # what each block's mixer carries, found once
            self._state_types = tuple(type(block.init_state(1)) for block in self.blocks)
        for i, (layer, expected) in enumerate(zip(state.layers, self._state_types)):
            if type(layer) is not expected:
                raise ValueError(f"state of block {i} is a {type(layer).__name__}, but this {self.config.family} "
                                 f"model's block {i} carries a {expected.__name__}: the state comes from a "
                                 f"different model")
        if torch.is_grad_enabled() and any(t.is_inference() for t in state.tensors()):
            raise ValueError("state was made under torch.inference_mode(), and autograd cannot keep its tensors for "
                             "backward: state.detach() gives a copy this call can use")
        if state.layers[0].batch != batch:
            raise ValueError(f"state is for a batch of {state.layers[0].batch} sequences, ids for {batch}: "
                             f"pass the state of a previous call on the same batch, or init_state({batch})")
        if not isinstance(state.seen, int) or isinstance(state.seen, bool) or state.seen < 0:
            raise ValueError(f"state.seen must be the number of tokens the state has read (an integer >= 0), got "
                             f"{state.seen!r}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_bytes(self, state: ModelState) -> int:
        """Recurrent state size in bytes per sequence (0 for a state of no sequences)."""
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState (from init_state or a call), got {type(state).__name__}")
        return state.nbytes() // max(1, state.layers[0].batch) if state.layers else 0

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, state: ModelState | None = None,
                 vocab_limit: int | None = None) -> tuple[Tensor, ModelState]:
        """Prefill the prompt (fast path), then decode one token at a time with the carried state.
        ``temperature=0`` is greedy; ``vocab_limit``: draw only ids below it (a tokenizer with fewer ids than
        the model's vocabulary). Returns the new tokens [B, max_new_tokens] (int64) and the state after the
        prompt and every new token but the last, which nothing has read yet (as a KV cache holds the tokens
        before the one to feed): ``generate(new[:, -1:], n, state=state)`` continues exactly, and so does
        ``model(torch.cat([new[:, -1:], more], 1), state)``. With ``max_new_tokens=0`` it has read the prompt.
        The rows draw from one generator seeded with ``seed``: a sampled row depends on the batch it is in."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        _check_tensor("prompt_ids", prompt_ids)
        vocab = self.config.vocab_size
        if vocab_limit is not None and not (_integer(vocab_limit) and 1 <= vocab_limit <= vocab):
            raise ValueError(f"vocab_limit must be an integer in [1, {vocab}] or None, "
                             f"got {vocab_limit!r}")
        if prompt_ids.dim() == 2 and prompt_ids.shape[1] == 0 and max_new_tokens:
            raise ValueError("prompt_ids is empty: generation needs at least one prompt token per row")
        generator = torch.Generator(device=prompt_ids.device).manual_seed(int(seed))  # (a NumPy int too)
        logits, state = self(prompt_ids, state)
        tokens = []
        for step in range(max_new_tokens):
            tokens.append(_sample(logits[:, -1, :vocab_limit], temperature, top_k, top_p, generator))
            if step + 1 < max_new_tokens:  # the last token is left for the next call to read
                logits, state = self(tokens[-1][:, None], state)
        if not tokens:
            return torch.zeros(prompt_ids.shape[0], 0, dtype=torch.long, device=prompt_ids.device), state
        return torch.stack(tokens, 1), state


def _check_tensor(name: str, ids) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be an int64 or int32 tensor [B, T], got {type(ids).__name__} "
                        f"(torch.tensor({name}) makes one)")


def _integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int = 0,
                   name=lambda argument: argument) -> None:
    """``generate``'s sampling arguments, each in its range, or a ValueError that says which is not
    (called ``name(argument)``: the CLI names its flags)."""
    def real(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if not _integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens')} must be an integer >= 0, got {max_new_tokens!r}")
    if not real(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _integer(top_k) or top_k < 1):
        raise ValueError(f"{name('top_k')} must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
    if not _integer(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"{name('seed')} must be an integer in [0, 2**63) (the sampling generator's seed), got "
                         f"{seed!r}")


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator) -> Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling
    (the arguments checked as ``generate`` checks them)."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2 or logits.shape[1] < 1:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor [B, V] with V >= 1, got {got}")
    check_sampling(0, temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> Tensor:
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or a temperature float32 holds as 0: greedy
        return logits.argmax(-1)
    logits = logits.float()
    # the row maximum first: a tiny temperature then sends the others to -inf, never the maximum to inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:  # exactly k tokens, ties broken by topk's order
        kept = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)
    if top_p is not None and top_p < 1:  # at 1, float32 cumsums reaching 1 early would drop the tail
        ordered, index = logits.sort(-1, descending=True)
        probabilities = ordered.softmax(-1)
        drop = probabilities.cumsum(-1) - probabilities >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_buildable(config: ModelConfig) -> None:
    """The layers' own checks of ``config`` (e.g. impl against the memory rule), beyond ModelConfig's: the
    model is built on the meta device, so nothing is allocated. Raises what the layers raise."""
    with torch.device("meta"):
        LanguageModel(config)


def create(name: str, **overrides) -> LanguageModel:
    """``create("titans-lmm-tiny", dim=32)``: a model from a preset; unknown names and fields are errors."""
    return LanguageModel(preset_config(name, **overrides))


def _returned(state: ModelState) -> ModelState:
    """The state a call returns. Without autograd it is detached: nothing in it then requires grad or is a
    view of a parameter (a memory still at its learned initial weights, ``MemoryState.detach``), so
    changing the model in place later (``load_state_dict``, an optimizer step) leaves it as it was."""
    return state if torch.is_grad_enabled() else state.detach()
