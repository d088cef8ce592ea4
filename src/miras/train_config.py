"""The training config: ``TrainConfig``, its checks, and ``key=value`` overrides (``miras train``).

``miras.train`` re-exports everything here; see its docstring for what the fields mean to a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from .models import PRESETS, ModelConfig, check_buildable, preset_config
from .models.config import check_overrides, unknown_preset, used_overrides

# Fields that may change when a run is resumed with resume=true: they do not change the maths of a
# step (grad_accum included: see the module docstring), or they extend the run (max_steps; without
# decay_steps the cosine then stretches to the new end, and train says how the learning rate moves).
# decay_steps may change too when every step already trained keeps its learning rate (runs._keeping_schedule).
# The losses after such a change match an uninterrupted run's to float rounding, not bit for bit (another
# summation order with grad_accum; bf16 where precision=auto meets another device).
RUNTIME_FIELDS = frozenset({"max_steps", "grad_accum", "compile", "parallel", "device", "log_every", "eval_every",
                            "eval_batches", "save_every", "keep_checkpoints", "tensorboard"})
# Not compared at all: where the run lives, the flag that allows RUNTIME_FIELDS to change, and the display.
UNCOMPARED_FIELDS = frozenset({"out_dir", "resume", "progress"})
VALIDATION_SEED_OFFSET = 1_000_003  # task validation batches: the same task under seed + this offset


class ConfigError(ValueError):
    """A bad config, out_dir or checkpoint: raised before anything is written, with a one-line message."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name if it has none): for a one-line ConfigError
    made from another library's multi-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def resolve_device(name: str):
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``...: a torch.device
    that this machine has, or a ConfigError that says what is valid."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; e.g. auto, cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; e.g. auto, cpu, cuda, cuda:1")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _key(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A TrainConfig field with what it does (``miras train --help`` lists each field with its help)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory. Each field's
    ``metadata["help"]`` says what it does."""

    model: str = _key(help="a preset of miras.models.PRESETS")
    model_overrides: dict = _key(help="model config fields, e.g. {\"dim\": 128}; on the command line "
                                      "model.<field>=VALUE", factory=dict)
    data: str = _key("text:stdlib", "text:<corpus> (stdlib, a file, folder, glob, hf:<name>[:<split>], "
                                    "hf:<name>:<config>:<split>[:<field>]) or task:<name> "
                                    "(miras.data.tasks)")
    data_params: dict = _key(help="the task's parameters as JSON, e.g. {\"pairs\": 4} "
                                  "(miras.data.tasks.make_task)", factory=dict)
    tokenizer: str = _key("byte", "text data: byte, bpe:<vocab> (trained here, saved with the run) or a local HF "
                                  "tokenizer")
    seq_len: int = _key(256, "tokens per training row")
    batch_size: int = _key(16, "rows per optimizer step, over all ranks and accumulation steps")
    grad_accum: int = _key(1, "micro-batches per step")
    max_steps: int = _key(1000, "optimizer steps in all (a rerun continues up to it)")
    lr: float = _key(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _key(0.1, "the cosine decay ends at lr x this")
    warmup_steps: int = _key(100, "linear warmup steps")
    decay_steps: int | None = _key(None, "the step where the cosine reaches lr x min_lr_ratio, held after it (none: "
                                         "max_steps; extending a finished run, decay_steps=<its max_steps> keeps its "
                                         "schedule)")
    weight_decay: float = _key(0.1, "AdamW weight decay (linear maps only)")
    betas: tuple[float, float] = _key((0.9, 0.95), "AdamW betas")
    grad_clip: float = _key(1.0, "max global gradient norm (0: no clipping)")
    bptt: int | None = _key(None, "truncated-BPTT segment length, the state carried between segments (none: "
                                  "whole rows)")
    precision: str = _key("auto", "auto (bf16 where it is faster: CUDA, AMX CPUs), fp32 or bf16 (autocast)")
    compile: bool = _key(False, "torch.compile the model (the memory's chunk loop: model.impl=compiled)")
    parallel: str = _key("ddp", "ddp or fsdp, under torchrun")
    seed: int = _key(0, "initialisation and data order")
    out_dir: str = _key("", "the run folder (empty: runs/<preset>)")
    log_every: int = _key(10, "steps between metrics.jsonl lines")
    eval_every: int = _key(200, "steps between validation losses (0: never; needs data with a validation split)")
    eval_batches: int = _key(8, "batches per validation")
    save_every: int = _key(500, "steps between checkpoints")
    keep_checkpoints: int = _key(3, "checkpoints kept (the latest ones)")
    tensorboard: bool = _key(False, "also write TensorBoard logs (needs tensorboard)")
    progress: bool = _key(True, "show progress (a bar, or lines without a terminal) and a closing line")
    device: str = _key("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    resume: bool = _key(False, "let max_steps, logging, device and the other run-time keys "
                               "change on a rerun")

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if self.model not in PRESETS:
            raise ConfigError(unknown_preset(self.model))
        try:
            check_buildable(preset_config(self.model, **check_overrides(self.model_overrides)))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model_overrides: {error}") from None
        kind, _, spec = self.data.partition(":")
        if kind not in ("task", "text") or not spec:
            raise ConfigError(f"data must be 'task:<name>' or 'text:<corpus>', got {self.data!r}")
        if kind == "task" and ("context_length" in self.data_params or self.tokenizer != "byte"):
            raise ConfigError("a task's length is seq_len + 1 and its tokens are bytes: set seq_len, not "
                              "data_params.context_length, and leave tokenizer='byte'")
        for name in ("seq_len", "batch_size", "grad_accum", "log_every", "eval_batches", "save_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if kind == "text" and self.data_params:
            raise ConfigError(f"data_params are a task's parameters (data=task:<name>); text data takes none, "
                              f"got {self.data_params}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"decay_steps must be >= 1 or none (none: max_steps), got {self.decay_steps}")
        if self.bptt is not None and self.bptt < 1:
            raise ConfigError(f"bptt must be >= 1 or none, got {self.bptt}")
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr_ratio <= 1 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"need a finite lr > 0, 0 <= min_lr_ratio <= 1, 0 <= betas < 1; got lr={self.lr}, "
                              f"min_lr_ratio={self.min_lr_ratio}, betas={list(self.betas)}")
        for name, valid in (("precision", ("auto", "fp32", "bf16")), ("parallel", ("ddp", "fsdp"))):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if not self.out_dir:
            object.__setattr__(self, "out_dir", f"runs/{self.model}")

    def to_dict(self) -> dict:
        """JSON-ready: ``json.dumps(config.to_dict())`` round-trips through ``from_dict``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        valid = {f.name for f in fields(cls)}
        unknown = set(values) - valid
        if unknown:
            raise ConfigError(f"unknown train config key(s) {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
        if "model" not in values:
            raise ConfigError("a train config needs a 'model' (a preset name)")
        overrides = values.get("model_overrides")
        if isinstance(overrides, dict) and values["model"] in PRESETS:
            # a saved run's overrides that its family does not read (accepted before 802487f) are dropped:
            # the model is the same without them, and a new config may not name them
            try:
                values = {**values, "model_overrides": used_overrides(values["model"], overrides)}
            except (TypeError, ValueError):
                pass  # a bad value: __post_init__ says what is wrong with it
        return cls(**values)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (from 0): linear warmup to ``lr`` over ``warmup_steps``,
    then a cosine that reaches ``lr * min_lr_ratio`` at the last step (of ``decay_steps``, else of
    ``max_steps``) and stays there. With ``decay_steps <= warmup_steps + 1`` there is no cosine: the run
    ends at (or before) the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    end = config.decay_steps or config.max_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, end - config.warmup_steps - 1))
    low = config.lr * config.min_lr_ratio
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - low)


def config_from_args(model: str, pairs: Sequence[str]) -> TrainConfig:
    """``config_from_args("titans-lmm-tiny", ["lr=3e-4", "bptt=64", "model.dim=128"])``: each ``key=value``
    parsed as its field's type (bool: true/false; dict and tuple: JSON; optional: none). Model fields are
    ``model.<field>``. Unknown keys and badly typed values raise ConfigError saying what is valid."""
    hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(ModelConfig)
    values, overrides = {}, {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key:
            raise ConfigError(f"override {pair!r} is not key=value")
        if key.startswith("model."):
            name = key.removeprefix("model.")
            if name not in model_hints:
                raise ConfigError(f"unknown model field {name!r}; valid: "
                                  f"{', '.join('model.' + n for n in sorted(model_hints))}")
            overrides[name] = parse_value(key, text, model_hints[name])
        elif key == "model":
            raise ConfigError("the preset is the first argument (miras train <preset> key=value ...), not a key")
        elif key in hints:
            values[key] = parse_value(key, text, hints[key])
        else:
            valid = sorted(set(hints) - {"model"}) + ["model.<field>"]
            raise ConfigError(f"unknown key {key!r}; valid: {', '.join(valid)}")
    if overrides:
        values["model_overrides"] = {**values.get("model_overrides", {}), **overrides}
    try:
        return TrainConfig(model=model, **values)
    except TypeError as error:
        raise ConfigError(str(error)) from None


def _optional(kind) -> tuple[object, bool]:
    """``int | None`` -> (int, True); any other type -> (it, False)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _type_name(kind) -> str:
    inner, optional = _optional(kind)
    names = {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string",
             dict: 'a JSON object like {"key": 1}'}
    name = names.get(inner, "a JSON list like [0.9, 0.95]")
    return name + " or none" if optional else name


def parse_value(key: str, text: str, kind) -> object:
    """A ``key=value`` string as a value of type ``kind``; ConfigError if it is not one."""
    inner, optional = _optional(kind)
    if optional and text.lower() in ("none", "null"):
        return None
    booleans = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        if inner is bool:
            return booleans[text.lower()]
        if inner in (int, float, str):
            return inner(text)
        return json.loads(text)  # dict and tuple fields; their shape is checked by the dataclass
    except (KeyError, ValueError):
        raise ConfigError(f"{key}={text!r}: expected {_type_name(kind)}") from None


def _coerce(name: str, value, kind):
    """``value`` checked against the field type ``kind`` (ints accepted as floats, lists as tuples)."""
    inner, optional = _optional(kind)
    if value is None and optional:
        return None
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(_coerce(name, v, item) for v, item in zip(value, items))
    elif inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, inner) and not (inner is int and isinstance(value, bool)):
        return value
    raise TypeError(f"{name} must be {_type_name(kind)}, got {value!r}")
