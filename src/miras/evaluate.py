"""Evaluation: task accuracy over a sweep of context lengths, perplexity, and a report.

From the shell (the ``eval`` subcommand of ``miras``)::

    miras eval runs/passkey                                   # the run's task, train length x 1 .. 64
    miras eval runs/passkey --tasks passkey,mqar --lengths 256,1024,16384 --examples 200
    miras eval runs/text --perplexity stdlib --out reports/text

From Python::

    from miras.evaluate import evaluate, markdown_table, plot_accuracy, write_json
    results = evaluate({"lmm": model}, {"mqar": MQAR(context_length=256)}, [256, 1024, 16384])
    print(markdown_table(results))

Choices written down here:

- **Streaming.** Every length, however long, is fed through ``model(ids, state)`` in segments of
  ``segment`` tokens with the state carried (exact for every model: see ``models/lm.py``). Only the
  logits that are scored are kept: a task's answer is the last part of its example, so
  ``stream_logits`` keeps the last ``keep`` positions and drops the rest of each segment at once.
  Memory is then one segment's activations plus the model's state: constant for the recurrent
  models, a KV cache that grows with the context for the full-attention Transformer (the baseline).
- **Scoring** is the tasks module's ``exact_match``, applied to the tail of each example that starts
  one token before its first answer token (the same verdict as on the whole example).
- **Seeds.** Example ``i`` at context length ``L`` is drawn from a ``torch.Generator`` seeded by a hash
  of ``(seed, L, i)``: independent of the batch size, the other lengths and the model.
- **Confidence interval**: the 95% Wilson score interval of the binomial proportion (it stays inside
  [0, 1] and is not empty at 0 or n successes, unlike the normal approximation). The JSON holds its
  ends (``ci_low``, ``ci_high``); the markdown's cells show them as ``acc [low–high]``.
- **State size** is ``model.state_bytes(state)`` (bytes per sequence), the largest seen while
  streaming; ``None`` for a model without ``state_bytes``.
- **Perplexity** is ``exp`` of the mean next-token loss over consecutive windows of ``seq_len``
  tokens (``miras.data.text.windows``: every token but the first is predicted exactly once), each
  window starting from an empty state; ``bits_per_token`` is the loss in bits. A run that reads BPE or HF
  token ids (the tasks are written in bytes) is asked for its perplexity alone: by default on the validation
  split of the corpus it trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .data.base import IGNORE
from .data.tasks import Example, Task, exact_match, generate
from .data.tasks.haystack import CORPUS_PREFIX
from .data.text import windows
from .files import atomic_write_bytes
from .runs import read_metrics
from .train_config import first_line

RESULTS_FORMAT = "miras.eval/1"
WILSON_Z = 1.959963984540054  # the 97.5% quantile of the standard normal: a two-sided 95% interval
PERPLEXITY_TOKENS = 2**18  # tokens scored for a perplexity unless --perplexity-tokens says


# ------------------------------------------------------------------------------------------- streaming


def _segments(model: nn.Module, ids: Tensor, segment: int) -> Iterator[tuple[int, Tensor, object]]:
    """``(start, logits [B, t, V], state)`` for each segment ``ids[:, start:start + segment]``, state carried."""
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    state = None
    for start in range(0, ids.shape[1], segment):
        logits, state = model(ids[:, start : start + segment], state)
        yield start, logits, state


def _state_bytes(model: nn.Module, state) -> int | None:
    measure = getattr(model, "state_bytes", None)
    return None if measure is None else int(measure(state))


def _device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass(frozen=True)
class Streamed:
    """What ``stream_logits`` keeps: the last positions' logits, the final state and the peak state size."""

    logits: Tensor            # [B, keep, V]: logits of positions T - keep .. T - 1
    state: object             # the state after all T tokens
    state_bytes: int | None   # the largest state seen, in bytes per sequence (None: the model does not say)


@torch.no_grad()
def stream_logits(model: nn.Module, ids: Tensor, segment: int, keep: int = 1) -> Streamed:
    """Feed ``ids [B, T]`` through ``model`` in segments of ``segment`` tokens and keep the logits of the last
    ``keep`` positions only, so memory does not grow with T (beyond the model's own state)."""
    length = ids.shape[1]
    if not 1 <= keep <= length:
        raise ValueError(f"keep must be in [1, T={length}], got {keep}")
    first, tail, peak, state = length - keep, [], None, None
    for start, logits, state in _segments(model, ids.to(_device(model)), segment):
        if start + logits.shape[1] > first:
            # clone: a view would keep the whole segment's logits alive
            tail.append(logits[:, max(0, first - start) :].clone())
        size = _state_bytes(model, state)
        peak = size if peak is None else max(peak, size)
    return Streamed(torch.cat(tail, dim=1), state, peak)


# ------------------------------------------------------------------------------------------ task accuracy


def example_generator(seed: int, context_length: int, index: int) -> torch.Generator:
    """The generator of example ``index`` at ``context_length``: a hash, so nearby triples get unrelated streams.
    Tagged "eval/", so that no example is ever a training row (those hash "seed/step/row": without the tag,
    evaluating with the training seed at length L gave example i the generator of step L's row i)."""
    digest = hashlib.blake2b(f"eval/{seed}/{context_length}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def wilson_interval(successes: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    p, z2 = successes / trials, z * z
    center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # exact at the ends, where rounding would leave 1 - 1e-16
    return (0.0 if successes == 0 else center - half), (1.0 if successes == trials else center + half)


def _correct(model: nn.Module, examples: Sequence[Example], segment: int) -> tuple[int, int | None]:
    """How many of ``examples`` (one length) the model gets exactly right, and the peak state size."""
    tokens = torch.stack([example.tokens for example in examples])
    # Score the tail from one token before the earliest answer token: the logits of the inputs
    # tokens[:-1] at those positions are all that exact_match reads.
    start = min(int(example.answer.nonzero()[0]) for example in examples) - 1
    streamed = stream_logits(model, tokens[:, :-1], segment, keep=tokens.shape[1] - 1 - start)
    tails = [Example(example.tokens[start:], example.answer[start:]) for example in examples]
    return int(exact_match(streamed.logits, tails).sum()), streamed.state_bytes


def task_accuracy(model: nn.Module, task: Task, lengths: Sequence[int], examples: int = 100, seed: int = 0,
                  segment: int = 1024, batch_size: int = 8) -> list[dict]:
    """Exact-match accuracy of ``model`` on ``task`` at each context length, one dict per length: ``context_length``,
    ``examples``, ``correct``, ``accuracy``, ``ci_low`` / ``ci_high`` (95% Wilson), ``seconds``, ``tokens_per_s``
    and ``state_bytes`` (peak, per sequence)."""
    if examples < 1 or batch_size < 1:
        raise ValueError(f"examples={examples} and batch_size={batch_size} must be >= 1")
    rows = []
    for length in lengths:
        config = dataclasses.replace(task, context_length=length)
        correct, peak, began = 0, None, time.perf_counter()
        for first in range(0, examples, batch_size):
            batch = [generate(config, example_generator(seed, length, i))
                     for i in range(first, min(first + batch_size, examples))]
            right, size = _correct(model, batch, segment)
            correct += right
            peak = size if peak is None else max(peak, size)
        seconds = time.perf_counter() - began
        low, high = wilson_interval(correct, examples)
        rows.append({"context_length": length, "examples": examples, "correct": correct,
                     "accuracy": correct / examples, "ci_low": low, "ci_high": high, "seconds": seconds,
                     "tokens_per_s": examples * (length - 1) / max(seconds, 1e-9), "state_bytes": peak})
    return rows


# ---------------------------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(model: nn.Module, tokens: np.ndarray, seq_len: int, segment: int | None = None,
               max_tokens: int | None = None, batch_size: int = 1) -> dict:
    """Mean next-token ``loss`` (nats), ``perplexity`` and ``bits_per_token`` over consecutive windows of
    ``seq_len`` tokens, each streamed in segments of ``segment`` (default: whole windows). ``max_tokens``
    scores only the first that many targets."""
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    device, total, count, began = _device(model), 0.0, 0, time.perf_counter()
    for inputs, targets in windows(tokens, seq_len, batch_size):
        targets = targets.to(device)
        for start, logits, _ in _segments(model, inputs.to(device), segment or seq_len):
            target = targets[:, start : start + logits.shape[1]]
            total += F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((target != IGNORE).sum())
    loss, seconds = total / count, time.perf_counter() - began
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2), "tokens": count,
            "seconds": seconds, "tokens_per_s": count / max(seconds, 1e-9)}


# ------------------------------------------------------------------------------------------------ evaluate


def _task_record(task: Task) -> dict:
    config = {"name": task.name, **dataclasses.asdict(task)}
    corpus = config.get("corpus")
    if corpus is not None and not corpus.startswith(CORPUS_PREFIX):  # filler text itself would swamp the JSON
        config["corpus"] = f"<{len(corpus)} characters>"
    return config


def evaluate(models: dict[str, nn.Module], tasks: dict[str, Task], lengths: Sequence[int], *, examples: int = 100,
             seed: int = 0, segment: int = 1024, batch_size: int = 8, train_length: int | None = None,
             text: np.ndarray | None = None, seq_len: int | None = None, max_tokens: int | None = None,
             log: Callable[[str], None] | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Every task's accuracy for every model over ``lengths`` (those a task is too short for are skipped and
    listed), and the perplexity on ``text`` (token ids, windows of ``seq_len``) when given: a JSON-ready dict.
    ``progress`` is called with that dict, as measured so far, after each length (a caller keeps what was
    measured when a later length fails or is interrupted)."""
    log = log or (lambda message: None)
    progress = progress or (lambda results: None)
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must be distinct (each is a column of the results), got {list(lengths)}")
    results = {"format": RESULTS_FORMAT, "lengths": list(lengths), "examples": examples, "seed": seed,
               "segment": segment, "train_length": train_length,
               "models": {name: {"parameters": sum(p.numel() for p in model.parameters())}
                          for name, model in models.items()},
               "tasks": {}}
    for task_name, task in tasks.items():
        usable = [length for length in lengths if length >= task.minimum_length()]
        entry = {"config": _task_record(task), "skipped_lengths": [n for n in lengths if n not in usable],
                 "results": {}}
        results["tasks"][task_name] = entry
        for model_name, model in models.items():
            entry["results"][model_name] = rows = []
            for length in usable:  # one length at a time, each logged when it is done
                rows += task_accuracy(model, task, [length], examples, seed, segment, batch_size)
                log(f"{task_name} {model_name} L={length}: {rows[-1]['accuracy']:.3f} "
                    f"({rows[-1]['seconds']:.1f} s)")
                progress(results)
    if text is not None:
        if seq_len is None:
            raise ValueError("perplexity on `text` needs its window length `seq_len`")
        results["perplexity"] = {"seq_len": seq_len, "results": {}}
        for model_name, model in models.items():
            row = perplexity(model, text, seq_len, segment, max_tokens, batch_size)
            results["perplexity"]["results"][model_name] = row
            log(f"perplexity {model_name}: {row['perplexity']:.3f}")
    return results


# ------------------------------------------------------------------------------------------------- report


def write_json(results: dict, path: str | os.PathLike) -> Path:
    """``results`` as JSON, written atomically (a failed write leaves the previous file whole)."""
    return atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())


def _save_figure(figure, path: str | os.PathLike) -> Path:
    """The figure in the format its file name says (PNG without a suffix), written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def _short(length: int) -> str:
    for size, suffix in ((2**20, "M"), (2**10, "K")):
        if length >= size and length % size == 0:
            return f"{length // size}{suffix}"
    return str(length)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell(row: dict | None) -> str:
    """``accuracy [low–high]``: the interval as it is (a Wilson interval is not centred on the accuracy)."""
    return "–" if row is None else f"{row['accuracy']:.2f} [{row['ci_low']:.2f}–{row['ci_high']:.2f}]"


def _peak_states(results: dict) -> dict[str, dict[int, int]]:
    """model -> context length -> the largest state size (bytes per sequence) over the tasks."""
    states: dict[str, dict[int, int]] = {}
    for entry in results["tasks"].values():
        for model_name, rows in entry["results"].items():
            for row in rows:
                if row["state_bytes"] is not None:
                    known = states.setdefault(model_name, {})
                    known[row["context_length"]] = max(known.get(row["context_length"], 0), row["state_bytes"])
    return states


def task_label(task_name: str, entry: dict) -> str:
    """The task's name and the parameters it ran with that are not its defaults (``--task-params``, the training
    task's ``data_params``): ``mqar (pairs=2, queries=1)``."""
    from .data.tasks import TASKS

    config = entry.get("config") or {}
    kind = TASKS.get(config.get("name"))
    if kind is None:
        return task_name
    defaults = {f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING}
    changed = [f"{key}={value}" for key, value in config.items()
               if key in defaults and key != "context_length" and value != defaults[key]]
    return f"{task_name} ({', '.join(changed)})" if changed else task_name


def markdown_table(results: dict) -> str:
    """One table per task (rows: models, columns: context lengths, cells ``accuracy [low–high]``, the 95% Wilson
    interval), the state size per sequence, and the perplexity when measured."""
    lines, lengths = [], results["lengths"]
    header = ["model", *(_short(n) for n in lengths)]
    for task_name, entry in results["tasks"].items():
        rows = []
        for model_name, cells in entry["results"].items():
            found = {row["context_length"]: row for row in cells}
            rows.append([model_name, *(_cell(found.get(n)) for n in lengths)])
        lines += [f"### {task_label(task_name, entry)}: exact-match accuracy ({results['examples']} examples, 95% "
                  "Wilson interval)", "", *_table(header, rows), ""]
        if entry.get("skipped_lengths"):
            lines += [f"Not run at {', '.join(f'{n:,}' for n in entry['skipped_lengths'])} tokens (–): shorter than "
                      "the task needs.", ""]
    states = _peak_states(results)
    if states:
        rows = [[name, *(f"{known[n] / 2**10:.1f}" if n in known else "–" for n in lengths)]
                for name, known in states.items()]
        lines += ["### State size per sequence (KiB)", "", *_table(header, rows), ""]
    if "perplexity" in results:
        rows = [[name, f"{row['loss']:.4f}", f"{row['perplexity']:.3f}", str(row["tokens"])]
                for name, row in results["perplexity"]["results"].items()]
        lines += [f"### Perplexity (windows of {results['perplexity']['seq_len']} tokens)", "",
                  *_table(["model", "loss", "perplexity", "tokens"], rows), ""]
    return "\n".join(lines)


def _figure(panels: int):
    # Figure + its own Agg canvas, not pyplot: no global backend switch, no window, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * panels, 4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def plot_accuracy(results: dict, path: str | os.PathLike) -> Path:
    """Accuracy vs context length (log2 axis), one panel per task, one line per model; error bars from each row's
    ``ci_low``-``ci_high`` (``miras eval``: the Wilson interval; the demo: its pooled interval)."""
    figure, axes = _figure(max(1, len(results["tasks"])))
    for axis, (task_name, entry) in zip(axes, results["tasks"].items()):
        for model_name, rows in entry["results"].items():
            x = [row["context_length"] for row in rows]
            y = np.array([row["accuracy"] for row in rows])
            errors = [y - [row["ci_low"] for row in rows], [row["ci_high"] for row in rows] - y]
            axis.errorbar(x, y, yerr=np.clip(errors, 0, None), marker="o", capsize=3, label=model_name)
        if results.get("train_length"):
            axis.axvline(results["train_length"], color="gray", linestyle=":", label="train length")
        axis.set_xscale("log", base=2)
        axis.set(title=task_label(task_name, entry), xlabel="context length (tokens)", ylabel="exact-match accuracy",
                 ylim=(-0.03, 1.03))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return _save_figure(figure, path)


def plot_losses(metrics: dict[str, str | os.PathLike], path: str | os.PathLike) -> Path:
    """Training loss (solid) and validation loss (dashed, when logged) against step, one colour per run."""
    figure, (axis,) = _figure(1)
    for index, (name, source) in enumerate(metrics.items()):
        records, color = read_metrics(source), f"C{index}"
        for key, style, label in (("loss", "-", name), ("val_loss", "--", f"{name} (validation)")):
            points = [(record["step"], record[key]) for record in records if key in record]
            if points:
                axis.plot(*zip(*points), style, marker="o", markersize=2, color=color, label=label)
    axis.set(xlabel="step", ylabel="loss (nats per token)", title="training")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:  # a run with no logged step yet draws an empty plot, without a warning
        axis.legend(fontsize="small")
    return _save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------- CLI


def _integers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers like 256,1024") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected context lengths >= 2")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: a context length is given twice; give each once")
    return sorted(values)  # the table's columns and the plot's x axis run from short to long


def _depths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated depths like 0,0.5,1") from None
    if not values or not all(0 <= value <= 1 for value in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct depths in [0, 1] (fractions of the haystack)")
    return sorted(values)


def _sweep(text: str) -> tuple[str, list]:
    """``--sweep FIELD=V1,V2,...``: a task parameter and its values (numbers where they parse as numbers)."""
    field, _, listed = text.partition("=")
    values = [part.strip() for part in listed.split(",") if part.strip()]
    if not field.strip().isidentifier() or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a task parameter and its values, like pairs=1,4,16")

    def number(value: str):  # an int, a finite float, else the text itself (nan, inf: text)
        for kind in (int, float):
            try:
                parsed = kind(value)
            except ValueError:
                continue
            if math.isfinite(parsed):
                return parsed
        return value

    parsed = [number(value) for value in values]
    if len(set(parsed)) != len(parsed):
        raise argparse.ArgumentTypeError(f"{text!r}: a value is given twice; give each once")
    return field.strip(), parsed


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated task names like passkey,mqar")
    return names


def json_object(option: str, example: str) -> Callable[[str], dict]:
    """An argparse type: ``option``'s JSON object, parsed as ``miras train`` parses its dict fields."""
    def parse(text: str) -> dict:
        from .train_config import ConfigError, parse_value

        try:
            value = parse_value(option, text, dict)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{option} must be a JSON object like {example}, got {text!r}")
        return value

    return parse


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``miras eval <run_dir>``."""
    parser.add_argument("run_dir", help="a training run's folder (its config.json and checkpoints)")
    parser.add_argument("--tasks", type=_names, default=None,
                        help="comma-separated task names (default: the run's task, or passkey,mqar for text runs)")
    parser.add_argument("--lengths", type=_integers, default=None,
                        help="comma-separated context lengths, each once (sorted; default: the training length x 1, "
                             "2, 4, ..., 64)")
    parser.add_argument("--task-params", type=json_object("--task-params", '{"pairs": 16}'), default=None,
                        metavar="JSON",
                        help="task parameters for every evaluated task, over the run's own, e.g. "
                             "'{\"pairs\": 16}' (more facts than in training)")
    parser.add_argument("--depths", type=_depths, default=None,
                        help="comma-separated needle depths (fractions of the haystack, 0 = its start), each "
                             "evaluated apart as <task>@<depth>, e.g. 0,0.25,0.5,0.75,1 (RULER's sweep; default: "
                             "a uniform depth per example)")
    parser.add_argument("--sweep", type=_sweep, default=None, metavar="FIELD=V1,V2,...",
                        help="evaluate each task that has the parameter FIELD once per value, as "
                             "<task>@FIELD=<value>, e.g. pairs=1,4,16,64 with --tasks mqar (recall against the "
                             "number of facts; MQAR asks 8 queries unless --task-params '{\"queries\": 1}')")
    parser.add_argument("--examples", type=int, default=100, help="examples per task and length (default 100)")
    parser.add_argument("--segment", type=int, default=None,
                        help="tokens per forward call while streaming (default: the training length)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per forward call (default 8; with --lm-eval 1, as generation tasks need)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated examples (default 0)")
    parser.add_argument("--perplexity", metavar="CORPUS", default=None,
                        help="also the perplexity on CORPUS's validation split "
                             "(stdlib, a file, folder, glob or hf:<name>; as train's data=text:CORPUS names it, "
                             "with or without the text: prefix)")
    parser.add_argument("--perplexity-tokens", type=int, default=None,
                        help=f"tokens scored for the perplexity (default {PERPLEXITY_TOKENS}; where one is measured: "
                             "--perplexity, or a run of BPE or HF ids)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--out", default=None,
                        help="folder for results.json, results.md and the plots (default: run_dir)")
    return parser


def check_out_folder(out: Path) -> None:
    """``--out`` (or the run folder) can hold the results: a folder, or one that can be made. Tried by
    making (and removing) an empty folder in it or in its nearest existing parent: nothing is left."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".miras-eval-", dir=parent))
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def _training_length(train_config) -> int:
    """The run's ``seq_len``: the tokens a training row feeds the model (a task example of ``seq_len + 1``
    tokens gives ``seq_len`` inputs and their next tokens). The default lengths are its multiples."""
    return train_config.seq_len


def at_depths(tasks: dict[str, Task], depths: Sequence[float]) -> dict[str, Task]:
    """Each task that places its needle at a ``depth`` once per depth, named ``<name>@<depth>`` (RULER's sweep
    of the needle's position); the others as they are. An error if none of them places a needle."""
    return swept(tasks, "depth", depths)


def swept(tasks: dict[str, Task], field: str, values: Sequence) -> dict[str, Task]:
    """Each task that has ``field`` once per value, named ``<name>@<field>=<value>`` (``<name>@<depth>`` for
    the needle's depth), e.g. MQAR over ``pairs`` (the number of facts); the others as they are. An error if
    none of them has the field, or if a task refuses a value (it says which and why)."""

    def has(task) -> bool:
        return any(item.name == field for item in dataclasses.fields(task))

    if field == "context_length":
        raise ValueError("context lengths are swept by --lengths")
    if not any(has(task) for task in tasks.values()):
        from .data.tasks import TASKS

        having = sorted(name for name, kind in TASKS.items() if has(kind))
        if field == "depth":
            raise ValueError(f"depths are where a needle is put, and none of {sorted(tasks)} puts one; "
                             f"tasks that do: {', '.join(having)}")
        raise ValueError(f"none of the tasks {sorted(tasks)} has a parameter {field!r}"
                         + (f"; tasks that do: {', '.join(having)}" if having else ""))
    result = {}
    for name, task in tasks.items():
        if not has(task):
            result[name] = task
            continue
        for value in values:
            shown = f"{value:.12g}" if isinstance(value, float) else str(value)
            label = f"{name}@{shown if field == 'depth' else f'{field}={shown}'}"
            if label in result:
                raise ValueError(f"{field} values {values} give two tasks the same name {label!r}: give distinct "
                                 "values")
            try:
                result[label] = dataclasses.replace(task, **{field: value})
            except (TypeError, ValueError) as error:  # the value, or what it does to the task's other parameters
                raise ValueError(f"{label}: {error} (the task's other parameters are set with --task-params)") \
                    from None
    return result


def _kept(measured: list[dict], out: Path, why: str) -> str:
    """What an evaluation stopped by ``why`` had measured, written to ``out`` as results.json and results.md
    (marked ``incomplete``): the end of its error line, or "" when nothing was measured or written."""
    if not measured or not any(rows for entry in measured[0]["tasks"].values() for rows in entry["results"].values()):
        return ""
    results = {**measured[0], "incomplete": why}
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(results, out / "results.json")
        atomic_write_bytes(out / "results.md", (f"**Incomplete** ({why}): the lengths measured before it.\n\n"
                                                + markdown_table(results)).encode())
        with contextlib.suppress(FileNotFoundError):  # an earlier evaluation's plot, not of these results
            (out / "accuracy.png").unlink()
    except OSError:
        return ""
    return f"; the lengths measured before it are in {out / 'results.json'}"


def _run_tasks(train_config, names: list[str] | None, overrides: dict | None = None) -> dict[str, Task]:
    """The task configs to evaluate: the run's own task with its parameters, the others with their defaults;
    ``overrides`` (``--task-params``) over both. Their context length is left unbounded (frozen configs:
    nothing is built) until ``_fitting``, after any sweep has changed their sizes."""
    from .data.tasks import TASKS, make_task

    if overrides and "context_length" in overrides:
        raise ValueError("--task-params sets no context_length: the lengths come from --lengths")
    kind, _, spec = train_config.data.partition(":")
    own = spec if kind == "task" else None
    names = names or ([own] if own else ["passkey", "mqar"])
    for name in (name for name in names if name in TASKS):  # (make_task names an unknown task)
        valid = [f.name for f in dataclasses.fields(TASKS[name]) if f.init and f.name != "context_length"]
        if unknown := sorted(set(overrides or {}) - set(valid)):
            raise ValueError(f"--task-params: {name} has no parameter(s) {', '.join(unknown)}; its parameters: "
                             f"{', '.join(valid)}")
    return {name: make_task(name, context_length=2**40, **{**(train_config.data_params if name == own else {}),
                                                            **(overrides or {})})
            for name in names}


def _fitting(tasks: dict[str, Task], length: int) -> dict[str, Task]:
    """The tasks that fit in ``length`` tokens, at that length; the others are reported and left out (an error
    if none fits)."""
    kept, short = {}, []
    for name, task in tasks.items():
        if task.minimum_length() > length:
            short.append(f"{name} needs at least {task.minimum_length()}")
        else:
            kept[name] = dataclasses.replace(task, context_length=length)
    if short and not kept:
        raise ValueError(f"every task is longer than the longest of --lengths ({length} tokens): {'; '.join(short)}")
    for reason in short:
        print(f"miras eval: skipping {reason} tokens (the longest of --lengths is {length})", file=sys.stderr)
    return kept


def run_eval(args: argparse.Namespace) -> int:
    """``miras eval``: evaluate a run and write results.json, results.md, accuracy.png (and loss.png)."""
    from .train import load_run
    from .train_config import resolve_device

    out = Path(args.out or args.run_dir)
    text = None
    try:  # every argument checked, the run and the corpus loaded, before the (long) evaluation
        for name in ("examples", "batch_size", "segment"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.perplexity_tokens is not None and args.perplexity_tokens < 2:
            raise ValueError(f"--perplexity-tokens must be >= 2, got {args.perplexity_tokens}")
        if args.out is not None:
            check_out_folder(out)
        model, train_config, tokenizer = load_run(args.run_dir, device=str(resolve_device(args.device)))
        if args.out is None:  # the run folder itself (checked once it is known to be a run)
            check_out_folder(out)
        train_length = _training_length(train_config)
        lengths = args.lengths or [train_length * 2**k for k in range(7)]
        if tokenizer is not None and tokenizer.kind != "byte":
            # the tasks are written in bytes; fed to a model of BPE or HF ids they are other tokens altogether,
            # and their accuracies are noise (once a warning, with the numbers written all the same)
            given = [f"--{name.replace('_', '-')}" for name in ("tasks", "task_params", "depths", "sweep")
                     if getattr(args, name, None)]
            if given:
                raise ValueError(f"{', '.join(given)}: the run reads {tokenizer.kind!r} token ids and the tasks are "
                                 "written in bytes: "
                                 "evaluate its perplexity (no --tasks: on the corpus it trained on, or --perplexity "
                                 "CORPUS), or evaluate tasks on a run trained with tokenizer=byte")
            if not args.perplexity:  # what such a run can be asked: its own corpus's validation split
                args.perplexity = train_config.data.removeprefix(CORPUS_PREFIX)
                print(f"miras eval: the perplexity on the validation split of {args.perplexity!r}, the corpus the run "
                      "trained on (--perplexity names another)", file=sys.stderr)
            tasks = {}
        else:
            tasks = _run_tasks(train_config, args.tasks, args.task_params)
            if getattr(args, "depths", None):
                if "depth" in (args.task_params or {}):
                    raise ValueError("--depths and a depth in --task-params: give one of them")
                tasks = at_depths(tasks, args.depths)
            if getattr(args, "sweep", None):
                field, values = args.sweep
                if field in (args.task_params or {}):
                    raise ValueError(f"--sweep {field}=... and a {field} in --task-params: give one of them")
                if field == "depth" and getattr(args, "depths", None):
                    raise ValueError("--sweep depth=... and --depths: give one of them")
                tasks = swept(tasks, field, values)
            tasks = _fitting(tasks, max(lengths))
        if args.perplexity_tokens is not None and not args.perplexity:
            raise ValueError("--perplexity-tokens: this run measures no perplexity (it reads bytes, and the "
                             "perplexity of a byte run is asked for with --perplexity CORPUS)")
        if args.perplexity:
            from .data.text import cached_tokens, load_corpus
            from .data.tokenizers import ByteTokenizer

            corpus = load_corpus(args.perplexity.removeprefix(CORPUS_PREFIX))
            if note := corpus.skipped_note():
                print(f"miras eval: {note}", file=sys.stderr)
            text = cached_tokens(corpus, tokenizer or ByteTokenizer(), "validation")
    except (TypeError, ValueError, OSError) as error:
        print(f"miras eval: error: {error}", file=sys.stderr)
        return 2
    name = Path(args.run_dir).resolve().name
    if tasks:
        print(f"miras eval: {len(tasks)} task(s) x {len(lengths)} length(s) up to {max(lengths):,} tokens x "
              f"{args.examples} examples, one line per task and length as each is done", file=sys.stderr)
    measured: list[dict] = []  # the results so far (evaluate's own dict, filled in as each length is done)

    def keep(results: dict) -> None:
        measured[:] = [results]

    try:
        results = evaluate({name: model}, tasks, lengths, examples=args.examples, seed=args.seed,
                           segment=args.segment or train_length, batch_size=args.batch_size or 8,
                           train_length=train_length, text=text, seq_len=train_config.seq_len,
                           max_tokens=args.perplexity_tokens or PERPLEXITY_TOKENS,
                           log=lambda message: print(message, file=sys.stderr), progress=keep)
    except (RuntimeError, MemoryError) as error:  # the allocator's refusal: one line (other errors stay loud)
        if not (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)):
            raise
        print(f"miras eval: error: out of memory (lengths up to {max(lengths):,} tokens, --batch-size "
              f"{args.batch_size or 8}, --segment {args.segment or train_length}): {first_line(error)}; fewer "
              f"or shorter --lengths, or a smaller --batch-size{_kept(measured, out, 'out of memory')}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"miras eval: interrupted{_kept(measured, out, 'interrupted')}", file=sys.stderr)
        return 130
    table = markdown_table(results)
    print(table)
    for task_name, entry in results["tasks"].items():
        if entry["skipped_lengths"]:
            skipped = ", ".join(map(str, entry["skipped_lengths"]))
            print(f"miras eval: {task_name} skipped at {skipped} tokens: it needs at least "
                  f"{tasks[task_name].minimum_length()}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(results, out / "results.json")
        atomic_write_bytes(out / "results.md", table.encode())
        plot_accuracy(results, out / "accuracy.png")
        metrics = Path(args.run_dir) / "metrics.jsonl"
        if metrics.exists():
            plot_losses({name: metrics}, out / "loss.png")
    except OSError as error:
        print(f"miras eval: could not write the results to {out} ({error.strerror or error}); "
              "the table above is all there is", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and the plots in {out}")
    return 0
