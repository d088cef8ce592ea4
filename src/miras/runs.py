"""Run directories and checkpoints: ``config.json``, ``metrics.jsonl``, ``checkpoints/step_*.pt``.

Written by ``miras.train`` (see its docstring: atomic checkpoints, exact resume); ``load_run`` reads
a run back as a model, its config and its tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from .files import atomic_write, atomic_write_bytes
from .models import LanguageModel, ModelConfig
from .train_config import RUNTIME_FIELDS, UNCOMPARED_FIELDS, ConfigError, TrainConfig, first_line, lr_at

CHECKPOINT_FORMAT = "miras.checkpoint/1"
CHECKPOINT_KEYS = ("step", "elapsed", "model", "optimizer", "rng", "train_config", "model_config")
# Since 2026-12-06 a checkpoint also holds "digest", a SHA-256 of its tensors: torch.load does not check the
# zip's CRCs, so a file damaged inside (not truncated) would load. Checkpoints without it load unchecked.

def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", p.name)] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint file was saved at, from its name ``step_XXXXXXXX.pt``."""
    return int(path.stem.removeprefix("step_"))


def _load_checkpoint(path: Path, previous: Path | None = None) -> dict:
    """The checkpoint's payload; a ConfigError that says why not, and whether ``previous`` (the one
    before it) would do instead."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"checkpoint {path} is unreadable ({load_failure(error, path)}){_fallback(path, previous)}"
                          ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a miras checkpoint (format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in CHECKPOINT_KEYS if key not in payload]
    if missing:
        raise ConfigError(f"checkpoint {path} is damaged: it lacks {', '.join(map(repr, missing))}")
    wrong = _malformed(payload)
    if wrong:
        raise ConfigError(f"checkpoint {path} is damaged: {wrong}")
    if "digest" in payload and payload["digest"] != tensor_digest(payload):
        raise ConfigError(f"checkpoint {path} is damaged: its tensors do not match the checksum saved with them"
                          f"{_fallback(path, previous)}")
    return payload


def _fallback(path: Path, previous: Path | None) -> str:
    """The end of an unusable checkpoint's error: whether ``previous`` (the one before it) would do instead."""
    if previous is None:
        return ""
    try:
        _load_checkpoint(previous)
    except ConfigError:
        return f"; the one before it, {previous.name}, is unusable too"
    return f"; the one before it, {previous.name}, is readable: delete {path.name} to fall back to it"


def _malformed(payload: dict) -> str:
    """What is wrong with a checkpoint's entries' types ("" when nothing)."""
    step, model, optimizer, rng = payload["step"], payload["model"], payload["optimizer"], payload["rng"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"its step is {step!r}, not a count of steps"
    if not isinstance(payload["elapsed"], (int, float)):
        return f"its elapsed time is {payload['elapsed']!r}, not a number of seconds"
    if not isinstance(model, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in model.values()):
        return "its model entry is not a state dict of tensors"
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        return "its optimizer entry is not an optimizer state dict"
    rng_types = {"torch": torch.Tensor, "python": (tuple, list), "cuda": list}
    if not isinstance(rng, dict) or not all(isinstance(rng.get(key), kind) for key, kind in rng_types.items()):
        return "its random-generator states are not those a miras run saves"
    if not isinstance(payload["train_config"], dict) or not isinstance(payload["model_config"], dict):
        return "its configs are not dicts"
    return ""


def tensor_digest(payload: dict) -> str:
    """SHA-256 of every tensor of the payload's model and optimizer state, in their (saved) order."""
    digest = hashlib.sha256()

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key, item in value.items():
                digest.update(repr(key).encode())
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(payload["model"])
    walk(payload["optimizer"])
    return digest.hexdigest()


def check_model_state(path: Path, state: dict, expected: dict) -> None:
    """A ConfigError unless checkpoint ``path``'s model ``state`` has exactly the tensors (names, shapes) of
    ``expected`` (the state dict of the model it is loaded into): another code version or a damaged file
    would otherwise fail in ``load_state_dict`` or, with ``set_state_dict``, keep the fresh init silently."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    resized = [f"{name} {tuple(state[name].shape)} where the model has {tuple(expected[name].shape)}"
               for name in expected if name in state and tuple(state[name].shape) != tuple(expected[name].shape)]
    problems = []
    for what, names in (("lacks", missing), ("has unknown", unexpected), ("has resized", resized)):
        if names:
            problems.append(f"{what} {', '.join(names[:3])}" + (f" (+{len(names) - 3} more)" if len(names) > 3
                                                                  else ""))
    if problems:
        raise ConfigError(f"checkpoint {path} does not fit its model ({'; '.join(problems)}): made by another "
                          "version of miras, or damaged")


def load_failure(error: Exception, path: str | os.PathLike) -> str:
    """Why torch.load failed, in a few words (not torch's advice to unpickle with weights_only=False,
    which a miras checkpoint never needs)."""
    with contextlib.suppress(OSError), open(path, "rb") as file:
        head = file.read(4)
        if not head:
            return "an empty file"
        if head != b"PK\x03\x04":  # torch.save writes a zip archive; other bytes went to the legacy unpickler,
            return "not a torch checkpoint file"  # whose errors say nothing (KeyError: 101 for b"hello")
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        return "not a torch checkpoint file"
    if isinstance(error, EOFError) or "failed finding central directory" in text or "Invalid argument" in text:
        return "truncated or not a torch file"
    first = first_line(error)
    return first if len(first) <= 120 else first[:117] + "..."


def _run_config(run_dir: Path) -> tuple[dict | None, bool]:
    """``run_dir/config.json`` and whether it is damaged: (its dict, False); (None, False) when there is none;
    (None, True) when it is not a run config at all (torn, zeroed, another program's). A run config whose
    values this version refuses is not damage (a newer miras's, or edited: the errors it gives name the
    field); a file that cannot be read (permissions, I/O) is a ConfigError, never taken for damage."""
    path = run_dir / "config.json"
    try:
        text = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # (no folder there, or a file where the folder would be)
        return None, False
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        saved = json.loads(text)
    except ValueError:
        return None, True
    good = isinstance(saved, dict) and isinstance(saved.get("train"), dict) and isinstance(saved.get("model"), dict)
    return (saved, False) if good else (None, True)


def _damage(run_dir: Path) -> bool:
    """Whether ``run_dir/config.json`` exists and is not a run config at all (see ``_run_config``)."""
    return _run_config(run_dir)[1]


# Train fields not compared on resume: the uncompared ones, and the model overrides (the model they build is).
AS_BUILT = UNCOMPARED_FIELDS | {"model_overrides"}


def _differences(saved: dict, config: TrainConfig, model_config: ModelConfig) -> tuple[list[str], list[str]]:
    """Fields of ``saved`` ({"train": ..., "model": ...}) that differ: (defining the run, in RUNTIME_FIELDS).
    A field the saved config lacks (added to miras since) is compared at its default. The model is compared
    as built, not as asked for: overrides that give the same model config (an override equal to the default
    it replaces, or one a default now gives) are the same run."""
    defining, runtime = [], []
    for prefix, old, new in (("", _with_defaults(TrainConfig, saved["train"]), config.to_dict()),
                             ("model.", _with_defaults(ModelConfig, saved["model"]), model_config.to_dict())):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and not (not prefix and key in AS_BUILT):
                change = f"{prefix}{key}: {old.get(key)!r} -> {new.get(key)!r}"
                (runtime if not prefix and key in RUNTIME_FIELDS else defining).append(change)
    return defining, runtime


def _model_hint(defining: list[str], saved_model: dict, model_config: ModelConfig) -> str:
    """When only model fields differ (``defining``, from ``_differences``; e.g. a default changed since the run
    began): the overrides that rebuild the saved model, as an alternative to another out_dir."""
    old, new = _with_defaults(ModelConfig, saved_model), model_config.to_dict()
    differing = sorted(key for key in old if key in new and old[key] != new[key])
    if not differing or len(differing) != len(defining) or not all(c.startswith("model.") for c in defining):
        return ""
    values = [old[key] if isinstance(old[key], str) else json.dumps(old[key]) for key in differing]
    return f", or pass {' '.join(f'model.{key}={value}' for key, value in zip(differing, values))} to continue it"


def _with_defaults(kind, values: dict) -> dict:
    """``values`` with the fields of ``kind`` they lack at their defaults (through ``kind.from_dict``); fields
    this version does not know stay as they are, so they are reported as differences."""
    known = {f.name for f in dataclasses.fields(kind)}
    try:
        filled = kind.from_dict({key: value for key, value in values.items() if key in known}).to_dict()
    except (TypeError, ValueError):  # a value this version refuses (ConfigError is a ValueError): compare as saved
        return values
    return {**filled, **{key: value for key, value in values.items() if key not in known}}


def make_run_folder(run_dir: Path) -> None:
    """``run_dir/checkpoints`` (rank 0, after every check): a ConfigError when it cannot be made."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / "checkpoints"):  # both written below (an existing folder may be read-only)
            os.close(os.open(folder / ".miras-write-test", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
            os.unlink(folder / ".miras-write-test")
    except OSError as error:
        raise ConfigError(f"out_dir {run_dir}: cannot make or write the run folder there ({error.strerror}); "
                          "pass a folder path that can be written") from None


def lock_run_folder(run_dir: Path) -> int | None:
    """A descriptor of ``run_dir`` holding its exclusive lock (``os.close`` releases it; None where the system
    has no ``flock``): a second run started into the folder meanwhile is refused, where it would write over
    this one's checkpoints and metrics."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        return None
    lock = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise ConfigError(f"out_dir {run_dir} is in use: another `miras train` is writing there now; wait for it "
                          "to end, or use another out_dir") from None
    return lock


def resume_point(run_dir: Path, config: TrainConfig, model_config: ModelConfig) -> dict | None:
    """The checkpoint to continue from (None: start afresh), after checking that ``run_dir`` holds this run."""
    paths, (saved, damaged) = checkpoints(run_dir), _run_config(run_dir)
    if damaged and not paths:  # nothing says the folder is a run's: the file may be another program's
        raise ConfigError(f"{run_dir / 'config.json'} is not a miras run config; use another out_dir")
    # A folder with no checkpoint holds nothing to continue (e.g. a run that failed before its first save):
    # its config.json does not bind the next run.
    if not paths:
        return None
    # A missing or damaged config.json is passed over: the checkpoint holds the same configs (checked below),
    # and write_run_dir writes it again.
    step = checkpoint_step(paths[-1])
    if saved is not None:
        defining, runtime = _differences(saved, _keeping_schedule(config, saved["train"], step), model_config)
        if defining:
            raise ConfigError(f"{run_dir} holds a run with a different config ({'; '.join(defining)}); "
                              f"use another out_dir{_model_hint(defining, saved['model'], model_config)}")
    payload = _load_checkpoint(paths[-1], paths[-2] if len(paths) > 1 else None)
    defining, in_checkpoint = _differences({"train": payload["train_config"], "model": payload["model_config"]},
                                           _keeping_schedule(config, payload["train_config"], step), model_config)
    if defining:
        raise ConfigError(f"checkpoint {paths[-1]} belongs to a different config ({'; '.join(defining)})")
    runtime = runtime if saved is not None else in_checkpoint
    if runtime and not config.resume:
        raise ConfigError(f"{run_dir} holds this run with other settings ({'; '.join(runtime)}); "
                          "pass resume=true to continue it with the new ones")
    if config.max_steps < payload["step"]:
        raise ConfigError(f"{run_dir} is already at step {payload['step']}, past max_steps={config.max_steps}: "
                          f"pass max_steps >= {payload['step']} to continue it, or another out_dir")
    return payload


def _keeping_schedule(config: TrainConfig, saved: dict, step: int) -> TrainConfig:
    """``config`` as compared with a saved run's train config: with ``resume=true``, a ``decay_steps`` that
    leaves the learning rate of every step already trained as it was (e.g. ``decay_steps=<the old max_steps>``
    while extending a finished run, which then trains on at the floor) counts as the saved one."""
    old = saved.get("decay_steps") if isinstance(saved, dict) else None
    if not config.resume or old == config.decay_steps:
        return config
    try:
        before = TrainConfig.from_dict({**saved, "out_dir": config.out_dir})
    except (TypeError, ValueError):  # compared as saved: _differences names the field
        return config
    if all(lr_at(s, before) == lr_at(s, config) for s in range(step)):
        return dataclasses.replace(config, decay_steps=old)
    return config


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a training run's ``metrics.jsonl``: its JSON objects with an integer ``step``. Anything else
    (a line torn by a killed run, damaged bytes, blank lines) is skipped; the trainer cuts it away on resume."""
    records = []
    for line in Path(path).read_bytes().decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if (isinstance(record, dict) and isinstance(record.get("step"), int)
                    and not isinstance(record["step"], bool)):
                records.append(record)
    return records


def _keep_metrics_until(path: Path, step: int) -> None:
    """Keep the metrics records up to ``step``: drop those written after the checkpoint we resume from, and
    lines that are not records (``read_metrics``). The trainer writes each record as ``json.dumps`` writes it."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        records = read_metrics(path)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or error}); move it away to start the run's "
                          "metrics afresh") from None
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step).encode())


def write_run_dir(run_dir: Path, config: TrainConfig, model_config: ModelConfig, tokenizer, step: int) -> None:
    """config.json, the tokenizer, checkpoints/ and metrics.jsonl cut back to ``step`` (rank 0, after checks)."""
    make_run_folder(run_dir)
    # left by a crash during a save: a checkpoint's, or one of the run's own files' (files.atomic_write's temp
    # names, ".<name>.<random>.tmp"; the config, the metrics and the usual tokenizer files, _run_file)
    for stale in [*(run_dir / "checkpoints").glob(".step_*.tmp"), *run_dir.glob(".*.tmp")]:
        owner = re.fullmatch(r"\.(.+)\.[a-z0-9_]+\.tmp", stale.name)
        if stale.parent == run_dir / "checkpoints" or (owner and _run_file(owner[1])):
            stale.unlink(missing_ok=True)
    saved = {"train": config.to_dict(), "model": model_config.to_dict(), "tokenizer": tokenizer is not None}
    path = run_dir / "config.json"
    if _damage(run_dir):  # resume_point let it through: the checkpoints vouch for the folder; keep the bytes
        os.replace(path, path.with_name("config.json.damaged"))
        print(f"miras: {path} was damaged; written again from this run's config (the old bytes are in "
              "config.json.damaged)", file=sys.stderr)
    atomic_write_bytes(path, json.dumps(saved, indent=2).encode())
    if tokenizer is not None:
        tokenizer.save(run_dir)
    _keep_metrics_until(run_dir / "metrics.jsonl", step)


def _run_file(name: str) -> bool:
    """A file name that the run itself writes into its folder (its config, metrics, tokenizer)."""
    return name in ("config.json", "metrics.jsonl") or name.startswith(("tokenizer", "miras_tokenizer", "vocab",
                                                                         "merges", "special_tokens", "added_tokens"))


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
          model_config: ModelConfig, step: int, elapsed: float, main: bool, data: str | None = None) -> None:
    """Every rank gathers the full state dicts (FSDP needs all of them); rank 0 writes and prunes. ``data``: the
    training data's identity (``DataSource.identity``), checked when the run resumes."""
    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    payload = {"format": CHECKPOINT_FORMAT, "step": step, "elapsed": elapsed, "model": model_state,
               "optimizer": optimizer_state, "rng": rng, "train_config": config.to_dict(),
               "model_config": model_config.to_dict(), "data": data}
    payload["digest"] = tensor_digest(payload)
    path = run_dir / "checkpoints" / f"step_{step:08d}.pt"
    atomic_write(path, lambda handle: torch.save(payload, handle))
    for old in checkpoints(run_dir)[:-config.keep_checkpoints]:
        old.unlink()


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[LanguageModel, TrainConfig, object | None]:
    """The trained model of a run (latest checkpoint, eval mode), its TrainConfig and its tokenizer (None when
    the run's data had none, e.g. a generated task)."""
    run_dir = Path(run_dir)
    paths, (saved, damaged) = checkpoints(run_dir), _run_config(run_dir)
    if saved is None and not paths:
        if damaged:
            raise ConfigError(f"{run_dir / 'config.json'} is not a miras run config")
        if not run_dir.exists():
            raise ConfigError(f"{run_dir} does not exist")
        raise ConfigError(f"{run_dir} is not a run directory (no config.json){_runs_inside(run_dir)}")
    if not paths:
        raise ConfigError(f"{run_dir} has no checkpoint: its training stopped before the first save (save_every); "
                          "the same train command continues it")
    payload = _load_checkpoint(paths[-1], paths[-2] if len(paths) > 1 else None)
    source = run_dir / "config.json"
    if saved is None:  # config.json missing or damaged: the checkpoint holds the run's configs
        source = f"checkpoint {paths[-1]}"
        saved = {"train": payload["train_config"], "model": payload["model_config"], **_tokenizer_flag(run_dir)}
        print(f"miras: {run_dir / 'config.json'} is {'not a miras run config' if damaged else 'missing'}; using "
              f"the configs saved in {paths[-1].name}", file=sys.stderr)
    try:
        config, model_config = TrainConfig.from_dict(saved["train"]), ModelConfig.from_dict(saved["model"])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source} is damaged: {error}") from None
    # compared as _differences compares them: a field one of them lacks (added to miras since) at its default
    if _with_defaults(ModelConfig, payload["model_config"]) != model_config.to_dict():
        defining, _ = _differences({"train": saved["train"], "model": payload["model_config"]}, config, model_config)
        raise ConfigError(f"checkpoint {paths[-1]} belongs to a different model ({'; '.join(defining)})")
    model = LanguageModel(model_config)
    check_model_state(paths[-1], payload["model"], model.state_dict())
    model.load_state_dict(payload["model"])
    tokenizer = saved_tokenizer(run_dir, saved)
    if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"{run_dir}: the run's saved tokenizer has {tokenizer.vocab_size} ids but its model only "
                          f"{model_config.vocab_size}: the tokenizer files are not the ones it was trained with; "
                          "restore them (miras_tokenizer.json and what it names)")
    return model.to(device).eval(), config, tokenizer


def run_tokenizer(run_dir: Path):
    """The tokenizer saved in ``run_dir`` (see ``saved_tokenizer``)."""
    saved, _ = _run_config(run_dir)
    # config.json missing or damaged beside the checkpoints: whether a tokenizer is saved is read off the folder
    return saved_tokenizer(run_dir, saved if saved is not None else _tokenizer_flag(run_dir))


def holds_a_run(folder: Path) -> bool:
    """A config.json, or checkpoints whose configs stand in for a missing one (``load_run``): a folder that
    ``eval``, ``generate`` and ``export`` read, and that the demo must not write its report into."""
    return (folder / "config.json").is_file() or (folder / "checkpoints").is_dir()


def _runs_inside(run_dir: Path) -> str:
    """The end of a "not a run directory" error: the runs a level or two below (the demo's <model>/seed-<n>)."""
    inside = sorted(str(path.parent.relative_to(run_dir)) for pattern in ("*/checkpoints", "*/*/checkpoints")
                    for path in run_dir.glob(pattern) if path.is_dir())
    return f"; the runs inside it: {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''}" if inside else ""


def _tokenizer_flag(run_dir: Path) -> dict:
    """config.json's "tokenizer" entry, for a missing or damaged config.json: whether one is saved beside it."""
    from .data.tokenizers import METADATA

    return {"tokenizer": (run_dir / METADATA).exists()}


def saved_tokenizer(run_dir: Path, saved: dict):
    """The tokenizer the run saved (None if it saved none: task runs, custom data); a ConfigError if its files
    are missing or damaged."""
    if not saved.get("tokenizer"):
        return None
    from .data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(run_dir)
    except Exception as error:  # a missing file, bad JSON, a damaged tokenizers file: each says it differently
        raise ConfigError(f"{run_dir}: the run's saved tokenizer cannot be loaded ({first_line(error)}); it was "
                          "trained with it, so restore its tokenizer files (miras_tokenizer.json and what it names)"
                          ) from None
