"""Model configs and presets: ``<family>-<size>``, e.g. ``create("titans-lmm-tiny")``.

A config is a frozen, keyword-only dataclass saved as JSON. The family picks the token mixer; the
size picks widths (Titans Table 5 for the paper sizes: 170M/340M/760M/1.3B).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields

from ..layers.memory_layer import IMPLS, recompute_tokens
from ..memory import LinearMemory, MemoryRule, get_rule, supports_delta
from ..memory.rules import AXES
from ..memory.state import supports_channel_gates

# family -> memory rule preset (miras.memory.PRESETS) for the memory families, None for attention.
FAMILIES: dict[str, str | None] = {
    "titans-lmm": "titans",
    "titans-mac": "titans",
    "titans-mag": "titans",
    "titans-mal": "titans",
    "transformer": None,
    "swa-transformer": None,
    "deltanet": "deltanet",
    "gated-deltanet": "gated-deltanet",
    "longhorn": "longhorn",
    "mamba2": "mamba2",
    "retnet": "retnet",
    "linear-attention": "linear-attention",
    "ttt-linear": "ttt-linear",
    "ttt-mlp": "ttt-mlp",
    "moneta": "moneta",
    "yaad": "yaad",
    "memora": "memora",
    "moneta-h": "moneta",
    "yaad-h": "yaad",
    "memora-h": "memora",
}
# Samba-style hybrids (MIRAS §5.4): blocks alternate the memory layer and sliding-window attention.
HYBRID_FAMILIES = ("moneta-h", "yaad-h", "memora-h")
# The classic delta-rule RNNs run their exact online rule (chunk_size=1) through the blockwise delta path.
ONLINE_FAMILIES = ("deltanet", "gated-deltanet", "longhorn")
# RetNet's decay is fixed per head, not data-dependent.
FIXED_GATE_FAMILIES = ("retnet",)
# The families with sliding-window attention (``window``); MAC alone has segments (``segment``).
WINDOW_FAMILIES = ("swa-transformer", "titans-mag", "titans-mal", *HYBRID_FAMILIES)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that defines a model's architecture."""

    family: str
    vocab_size: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 8 / 3  # SwiGLU hidden width = mlp_ratio * dim, rounded up to a multiple of 8
    chunk_size: int = 16  # memory update granularity (Titans §3.2); 1 = the online rule
    window: int = 64  # sliding-window attention span (swa-transformer, MAG, MAL, the -h hybrids)
    persistent: int = 0  # N_p learned persistent tokens per layer (Titans Eq. 19)
    segment: int = 64  # MAC segment length (attention span of one segment)
    tie_embeddings: bool = True
    impl: str = "chunked"  # memory path: "chunked" | "compiled" | "recurrent" | "delta"
    block_size: int = 64  # tokens per block of the exact delta path (impl="delta")
    gate_rank: int = 0  # 0: token-level memory gates; > 0: channel-wise, through a rank-gate_rank projection
    # > 0: backward recomputes the memory in groups of this many chunks (blocks for impl="delta", whose chunk is
    # one token) and each block's MLP in groups of as many tokens (``recompute_tokens``), keeping only the
    # groups' inputs (less memory, one more forward)
    recompute: int = 0
    decay_init: float = 0.001  # the memory's forgetting gate α at initialisation (retention 1 − α per token)
    # the memory's inner learning rate θ at initialisation (titans-mac presets 0.01, MAC_GATES; Moneta, Yaad,
    # Memora presets 0.003, MIRAS_GATES)
    lr_init: float = 0.1
    # the deep memory's MLP: depth L_M (Titans §5.5 ablates 1 to 4; 1 is a matrix memory) and hidden width
    # factor; 0 keeps the family's own (depth 2, expansion 4). Only the families with an MLP memory read them.
    memory_depth: int = 0
    memory_expansion: int = 0
    # MIRAS axes that replace the family's, each as MemoryRule.to_dict writes it: {"bias": {"kind": "huber"}}
    # gives Titans Yaad's Huber bias, {"retention": {"kind": "lq", "q": 4, "power": 2, "carry": "A"}} gives
    # Moneta its Eq. 24 as printed; {}: the family's own rule. memory_depth and memory_expansion apply after.
    memory_axes: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; valid: {sorted(FAMILIES)}")
        positive = ("vocab_size", "dim", "layers", "heads", "chunk_size", "window", "segment", "block_size")
        for name in (*positive, "persistent", "gate_rank", "recompute", "memory_depth", "memory_expansion"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.persistent < 0:
            raise ValueError(f"persistent must be >= 0, got {self.persistent}")
        for name in ("decay_init", "lr_init"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if (not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool)
                or not 0 < self.mlp_ratio * self.dim < math.inf or int(self.mlp_ratio * self.dim) < 1):
            raise ValueError(f"mlp_ratio must be a finite number > 0 with mlp_ratio * dim >= 1 (the MLP's width), "
                             f"got {self.mlp_ratio!r} for dim {self.dim}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, got {self.impl!r}")
        if self.recompute < 0:
            raise ValueError(f"recompute must be >= 0 (0: off), got {self.recompute}")
        for name in ("memory_depth", "memory_expansion"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the family's own), got {getattr(self, name)}")
        if self.memory_axes and FAMILIES[self.family] is not None:
            unknown = set(self.memory_axes) - set(AXES)
            if unknown or not all(isinstance(spec, dict) for spec in self.memory_axes.values()):
                raise ValueError(f"memory_axes maps axes {list(AXES)} to their specs (dicts with a 'kind', as "
                                 f"MemoryRule.to_dict writes them), got {self.memory_axes!r}")
            try:
                given = self.axes_rule().to_dict()
            except (TypeError, ValueError) as error:
                raise ValueError(f"memory_axes {self.memory_axes}: {error}") from None
            # an axis spelled as the family's own builds the same model: dropped, so that the config (which
            # resuming and loading a state compare) is the plain preset's
            own = get_rule(self.rule).to_dict()
            object.__setattr__(self, "memory_axes", {axis: spec for axis, spec in self.memory_axes.items()
                                                     if given[axis] != own[axis]})
        if self.gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0 (0: token-level gates), got {self.gate_rank}")
        if self.gate_rank and FAMILIES[self.family] is None:
            raise ValueError(f"gate_rank sets the memory's gates, and {self.family} has no memory: leave it at 0")
        if FAMILIES[self.family] is not None:
            self._check_memory_options()
        if self.family in HYBRID_FAMILIES and self.layers < 2:
            raise ValueError(f"{self.family} alternates memory and sliding-window attention blocks: layers must be "
                             f">= 2, got {self.layers}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")

    def _check_memory_options(self) -> None:
        """What the memory layer would refuse, said in the model's own fields (not the layer's arguments)."""
        rule = self.memory_rule()
        if self.gate_rank and self.family in FIXED_GATE_FAMILIES:
            raise ValueError(f"gate_rank must be 0 for {self.family}: its gates are fixed constants")
        if self.impl == "delta" and (self.chunk_size != 1 or not supports_delta(rule)):
            raise ValueError(f"impl=delta (the exact online rule, chunk_size 1) takes a matrix memory with the L2 "
                             f"bias, linear retention and (implicit) GD; got chunk_size={self.chunk_size} and "
                             f"{rule.name()}: pass impl=chunked for other chunk sizes or rules")
        if self.gate_rank and (self.impl == "delta" or not supports_channel_gates(rule)):
            why = ("impl=delta takes token-level gates: pass impl=chunked too" if supports_channel_gates(rule) else
                   f"its rule {rule.name()} takes token-level gates only (as PreDecay, KLSoftmax and implicit GD do): "
                   "leave gate_rank at 0")
            raise ValueError(f"gate_rank={self.gate_rank} gives {self.family} channel-wise memory gates, but {why}")
        if self.family in FIXED_GATE_FAMILIES and not rule.needed_gates() <= {"decay"}:
            raise ValueError(f"{self.family}'s gates are fixed constants (lr and decay), and memory_axes giving "
                             f"{rule.name()} needs the gates {sorted(rule.needed_gates())}: put these axes in a "
                             "family with learned gates (e.g. gated-deltanet)")

    @property
    def rule(self) -> str | None:
        return FAMILIES[self.family]

    def memory_rule(self) -> MemoryRule | None:
        """The memory's rule: the family's preset (``rule``) with ``memory_depth`` and ``memory_expansion``
        applied to its MLP memory (depth 1: ``LinearMemory``, e.g. titans-lmm becomes ``TITANS_LINEAR``)."""
        if self.rule is None:
            return None
        rule = self.axes_rule()
        mlp = rule.architecture
        if mlp.kind != "mlp" or not (self.memory_depth or self.memory_expansion):
            return rule
        depth = self.memory_depth or mlp.depth
        memory = LinearMemory() if depth == 1 else dataclasses.replace(
            mlp, depth=depth, expansion=self.memory_expansion or mlp.expansion)
        return dataclasses.replace(rule, architecture=memory)

    def axes_rule(self) -> MemoryRule:
        """The family's preset with ``memory_axes`` in place of its axes (before memory_depth/expansion)."""
        rule = get_rule(self.rule)
        if not self.memory_axes:
            return rule
        return MemoryRule.from_dict({**rule.to_dict(), **self.memory_axes})

    @property
    def recompute_tokens(self) -> int:
        """The tokens of one ``recompute`` group (0: off): ``recompute`` chunks, or blocks on the delta path (a
        model without a memory has no path: its chunk_size alone groups its MLPs)."""
        impl = self.impl if self.rule is not None else "chunked"
        return recompute_tokens(self.recompute, impl, self.chunk_size, self.block_size)

    @property
    def mlp_hidden(self) -> int:
        return -(-int(self.mlp_ratio * self.dim) // 8) * 8

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**check_overrides(data, require_family=True))


SIZES: dict[str, dict] = {
    "tiny": {"dim": 64, "layers": 2, "heads": 2, "chunk_size": 8, "window": 32, "segment": 16},
    "small": {"dim": 256, "layers": 4, "heads": 4, "chunk_size": 16, "window": 256, "segment": 128},
    "170m": {"vocab_size": 32000, "dim": 768, "layers": 12, "heads": 16, "window": 2048, "segment": 512},
    "340m": {"vocab_size": 32000, "dim": 1024, "layers": 24, "heads": 16, "window": 2048, "segment": 512},
    "760m": {"vocab_size": 32000, "dim": 1536, "layers": 24, "heads": 16, "window": 2048, "segment": 512},
    "1.3b": {"vocab_size": 32000, "dim": 2048, "layers": 18, "heads": 8, "window": 2048, "segment": 512},
}
# Persistent tokens for the families that use them (the papers' 128 at the paper sizes).
PERSISTENT = {"tiny": 4, "small": 16, "170m": 128, "340m": 128, "760m": 128, "1.3b": 128}
PERSISTENT_FAMILIES = ("titans-mac", "titans-mag", "titans-mal")

ONLINE = {"chunk_size": 1, "impl": "delta"}
# MAC writes its memory with the attention output, and that attention reads the memory: with the layer's
# default θ = 0.1 (momentum 0.9: an effective step of 1) this loop amplifies any difference, so the
# untrained model's float32 logits leave its float64 ones by 0.1-0.3 within 512 tokens (a 1e-12 nudge
# of the embeddings grows a thousandfold or more); from θ = 0.01 they stay within 1e-5 (tiny) and 2e-3
# (small) over 512 tokens. LMM, MAG and MAL, with no such loop, stay within 1e-5 either way (by hand; the test
# in tests/models/test_models.py holds every untrained Titans preset within 1e-4 over 384 tokens). The loop
# still amplifies, more slowly: 1.2e-3 at 4K tokens and 0.25 at 8K (tiny; layers/memory_layer.py).
MAC_GATES = {"lr_init": 0.01}
# Moneta, Yaad and Memora (plain GD, a non-linear bias or retention) are chaotic from θ = 0.1 even without
# such a loop: untrained, their float32 logits leave float64 by 0.5-1.1 (as large as the logits) within 384
# tokens, and a float64 stream cut mid-chunk drifts from one call by 1e-4. From θ = 0.01 Moneta still does
# by 1K tokens (0.95); from θ = 0.003 all six presets stay within 2e-4 over 1K tokens (tiny, seed 0, by hand;
# the test in tests/models/test_models.py holds every untrained tiny preset within 1e-4 over 384 tokens).
MIRAS_GATES = {"lr_init": 0.003}
# A matrix memory trained with momentum (Titans with memory_depth=1, or memory_axes naming a linear memory) has no
# LayerNorm bounding its error, and inside a chunk every gradient is taken at the chunk-start weights: b tokens with
# one key are one step of θ·Σ_{t≤b} (1 − η^t)/(1 − η), 87θ at chunk 16 and η = 0.9. From θ = 0.1 a run of one
# repeated byte then makes the state blow up (titans-lmm-small, memory_depth=1: 1.2e3 after 80 such bytes, NaN by
# 2K; by hand); from 0.01 it stays under 1 over 2K of them (tiny and small, LMM and MAC; tested). Such a config
# starts from this θ unless lr_init is given.
LINEAR_MOMENTUM_GATES = {"lr_init": 0.01}
MIRAS_FAMILIES = ("moneta", "yaad", "memora", *HYBRID_FAMILIES)

PRESETS: dict[str, dict] = {
    f"{family}-{size}": {"family": family, **values,
                         **({"persistent": PERSISTENT[size]} if family in PERSISTENT_FAMILIES else {}),
                         **(ONLINE if family in ONLINE_FAMILIES else {}),
                         **(MAC_GATES if family == "titans-mac" else {}),
                         **(MIRAS_GATES if family in MIRAS_FAMILIES else {})}
    for family in FAMILIES for size, values in SIZES.items()}


def check_overrides(values: dict, *, require_family: bool = False) -> dict:
    """Unknown keys and wrongly typed values are errors that say what is valid."""
    hints = typing.get_type_hints(ModelConfig)
    valid = {f.name for f in fields(ModelConfig)}
    unknown = set(values) - valid
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    if require_family and "family" not in values:
        raise ValueError("a model config needs a 'family'")
    for key, value in values.items():
        expected = hints[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else \
            isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise TypeError(f"config field {key!r} must be {expected.__name__}, got {value!r}")
    return values


def unused_fields(config: ModelConfig) -> dict[str, str]:
    """The fields ``config``'s model does not read, each with why: a window without sliding-window attention,
    a segment outside MAC, the memory's settings without a memory, block_size off the delta path, a gate's
    start value for a gate the rule does not have (or fixed gates)."""
    unused = {}
    if config.family not in WINDOW_FAMILIES:
        unused["window"] = "it has no sliding-window attention"
    if config.family != "titans-mac":
        unused["segment"] = "segments are MAC's"
    if config.rule is None:
        unused["memory_axes"] = "it has no memory"
    if config.rule is None or config.axes_rule().architecture.kind != "mlp":
        unused.update(dict.fromkeys(("memory_depth", "memory_expansion"),
                                    "it has no memory" if config.rule is None else "its memory is not an MLP"))
    elif config.memory_depth == 1:
        unused["memory_expansion"] = "memory_depth=1 is a matrix memory, which has no hidden width"
    if config.rule is None:
        unused.update(dict.fromkeys(("impl", "block_size", "decay_init", "lr_init"), "it has no memory"))
        if not config.recompute:  # with recompute the MLPs run in groups of recompute_tokens
            unused["chunk_size"] = "without a memory, chunk_size only sizes recompute's groups, and recompute is 0"
        return unused
    if config.impl != "delta":
        unused["block_size"] = "block_size is the delta path's (impl='delta')"
    if config.family in FIXED_GATE_FAMILIES:
        unused.update(dict.fromkeys(("decay_init", "lr_init"), "its gates are fixed"))
    elif "decay" not in config.memory_rule().needed_gates():
        unused["decay_init"] = "its rule has no forgetting gate"
    return unused


def used_overrides(name: str, overrides: dict) -> dict:
    """The ``overrides`` that preset ``name``'s model reads (``unused_fields``): for one set of overrides
    applied to several families (``miras bench --overrides``)."""
    if name not in PRESETS:
        raise ValueError(unknown_preset(name))
    unused = unused_fields(ModelConfig(**{**PRESETS[name], **check_overrides(overrides)}))
    return {key: value for key, value in overrides.items() if key not in unused}


def unknown_preset(name) -> str:
    """The error for a name that is not a preset: the closest preset names, then how names are made."""
    close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.75) if isinstance(name, str) else []
    guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return (f"unknown preset {name!r}{guess}; a preset is <family>-<size>, families: {', '.join(FAMILIES)}; "
            f"sizes: {', '.join(SIZES)}")


def preset_config(name: str, **overrides) -> ModelConfig:
    """The config of preset ``name`` with ``overrides`` applied."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(unknown_preset(name))
    check_overrides(overrides)
    if "family" in overrides and overrides["family"] != PRESETS[name]["family"]:
        raise ValueError(f"family={overrides['family']!r} contradicts preset {name!r} (family "
                         f"{PRESETS[name]['family']!r}): name the family in the preset, e.g. "
                         f"'{overrides['family']}-{name.rsplit('-', 1)[1]}'")
    config = ModelConfig(**{**PRESETS[name], **overrides})
    rule = config.memory_rule()
    if ("lr_init" not in overrides and rule is not None and isinstance(rule.architecture, LinearMemory)
            and rule.algorithm.uses_momentum and config.lr_init > LINEAR_MOMENTUM_GATES["lr_init"]):
        config = dataclasses.replace(config, **LINEAR_MOMENTUM_GATES)
    preset = ModelConfig(**PRESETS[name])
    unused = unused_fields(config)
    ignored = sorted(key for key in overrides if key in unused and overrides[key] != getattr(preset, key))
    if ignored:
        them = "it" if len(ignored) == 1 else "them"
        why = "; ".join(f"{key}: {unused[key]}" for key in ignored)
        raise ValueError(f"{config.family} does not use {', '.join(ignored)} ({why}; its model would be the same "
                         f"without {them}): leave {them} out")
    return config
