"""Where a Titans training step's time goes: the memory's chunk loop against everything around it.

    .venv/bin/python benchmarks/step_budget.py                         # T = 4096, about 1 min, prints only
    .venv/bin/python benchmarks/step_budget.py --lengths 4096 16384    # the committed run, about 6 min

Only the committed run (``--lengths 4096 16384``) writes benchmarks/results/step_budget.{md,json}; any
other run prints its table and writes only where ``--out`` says.

One forward + backward on [1, T] per case, float32, `small` presets, the Titans models with
``impl=compiled`` and no ``recompute`` (their fastest setting on this CPU, not their leanest). Cases:

- ``transformer``: the SDPA Transformer preset (``transformer-small``, 3.2M parameters);
- ``transformer, MAC's size``: the same with as many layers as bring it nearest MAC's parameter count
  (7 layers, 5.60M against titans-mac-small's 5.63M): the issue's yardstick is "a same-size SDPA
  Transformer", and the presets differ in size (a MAC block holds an attention, a memory layer and an MLP);
- ``titans-mac`` / ``titans-lmm``: the models as they are;
- ``... null engine``: the same model with the memory's chunk loop (``chunked``: every chunk's write
  and read) replaced by an elementwise stand-in of the same inputs and output shape, so the time
  left is everything else: projections, conv, gates, norms, attention, MAC's retrieval read, MLPs,
  embedding and head, forward and backward.

The models are built once and timed in alternation (one step of each case per round, ``--rounds``
rounds after a warm-up round), so machine noise hits every case alike; the median is reported.
The null-engine model is not a model anyone should train: it only bounds what a faster engine can
give. If ``MAC, null engine`` is already slower than an aim (a multiple of a Transformer's step),
no engine work alone reaches it. The aims are worked out against both Transformers. At 16K MAC
alone needs about 12.5 GB (no ``recompute``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import miras.layers.memory_layer as memory_layer
from miras.files import atomic_write_bytes
from miras.models import create

ROOT = Path(__file__).resolve().parent
COMMITTED = [4096, 16384]  # the lengths of the committed results


def null_engine(rule, q, k, v, gates, memory, chunk_size, **_):
    """The chunk loop's stand-in: same output shape, gradients reach q, k, v and the lr gate; the
    memory state is returned unchanged."""
    return q + k + v * gates.lr[..., None], memory


@contextmanager
def engine(null: bool):
    if not null:
        yield
        return
    with mock.patch.object(memory_layer, "chunked", null_engine):
        yield


def step(model, ids: torch.Tensor) -> None:
    logits, _ = model(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    model.zero_grad(set_to_none=True)


SAME_SIZE = "transformer, MAC's size"


def same_size(preset: str, target: int) -> nn.Module:
    """``preset`` (a Transformer) with the layer count that brings its parameter count nearest ``target``."""
    models = [create(preset, layers=1)]
    while models[-1].num_parameters() < target:  # one more layer until it holds at least ``target``
        models = [models[-1], create(preset, layers=models[-1].config.layers + 1)]
    return min(models, key=lambda model: abs(model.num_parameters() - target))


def measure(length: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    titans = {family: create(f"{family}-small", impl="compiled") for family in ("titans-mac", "titans-lmm")}
    cases = [("transformer", create("transformer-small"), False),
             (SAME_SIZE, same_size("transformer-small", titans["titans-mac"].num_parameters()), False)]
    for family, model in titans.items():
        cases += [(family, model, False), (f"{family}, null engine", model, True)]
    ids = torch.randint(0, 256, (1, length))
    times = {name: [] for name, _, _ in cases}
    for round_ in range(rounds + 1):
        for name, model, null in cases:
            with engine(null):
                start = time.perf_counter()
                step(model, ids)
                elapsed = time.perf_counter() - start
            if round_:  # round 0 warms up (and compiles)
                times[name].append(elapsed)
    reference, same = statistics.median(times["transformer"]), statistics.median(times[SAME_SIZE])
    rows = []
    for name, model, _ in cases:
        median = statistics.median(times[name])
        rows.append({"case": name, "T": length, "ms": 1000 * median, "tokens_per_s": length / median,
                     "vs_transformer": median / reference, "vs_same_size": median / same,
                     "layers": model.config.layers, "params": model.num_parameters(),
                     "all_ms": [1000 * t for t in times[name]]})
    return rows


def table(rows: list[dict], aims: list[float]) -> str:
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1, forward + backward, "
             "median over rounds (each round times every case once)", "",
             "| case | layers | parameters | T | ms per step | tokens/s | x transformer | x transformer, MAC's size |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['layers']} | {row['params']:,} | {row['T']} | {row['ms']:,.0f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['vs_transformer']:.2f} | {row['vs_same_size']:.2f} |")
    lines.append("")
    for length in sorted({row["T"] for row in rows}):
        by = {row["case"]: row for row in rows if row["T"] == length}
        mac, null = by["titans-mac"], by["titans-mac, null engine"]
        engine_ms = mac["ms"] - null["ms"]
        needs = []
        for reference in ("transformer", SAME_SIZE):
            for aim in aims:
                budget = aim * by[reference]["ms"] - null["ms"]
                if budget <= 0:
                    need = "even a free engine is too slow"
                elif budget >= engine_ms:
                    need = f"met (the engine may take up to {budget:,.0f} ms)"
                else:
                    need = f"the engine must run in {budget:,.0f} ms ({engine_ms / budget:.1f}x faster)"
                needs.append(f"for MAC <= {aim} x the {reference} ({aim * by[reference]['ms']:,.0f} ms) {need}")
        lines.append(f"- T = {length}: MAC's engine takes {engine_ms:,.0f} of its {mac['ms']:,.0f} ms, the rest "
                     f"{null['ms']:,.0f}; " + "; ".join(needs) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096], help="tokens per step (default: 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--aims", type=float, nargs="+", default=[1.5, 1.0],
                        help="aims for MAC's step, as multiples of the Transformer's (issue: 1.5 at 4K, 1 at 16K)")
    parser.add_argument("--out", type=Path, default=None,
                        help="file stem: STEM.md and STEM.json (default: benchmarks/results/step_budget for the "
                             "committed run, --lengths 4096 16384; nowhere for any other)")
    args = parser.parse_args()
    for option, values in (("--lengths", args.lengths), ("--rounds", [args.rounds]), ("--threads", [args.threads])):
        if min(values) < 1:
            parser.error(f"{option} must be >= 1, got {' '.join(map(str, values))}")
    torch.set_num_threads(args.threads)
    rows = [row for length in args.lengths for row in measure(length, args.rounds)]
    text = table(rows, args.aims)
    print(text)
    out = args.out or (ROOT / "results" / "step_budget" if args.lengths == COMMITTED else None)
    if out is None:
        print("nothing written: only the committed run (--lengths 4096 16384) replaces benchmarks/results/"
              "step_budget; give --out to keep this one")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.parent / f"{out.name}.md", text.encode())
    atomic_write_bytes(out.parent / f"{out.name}.json", (json.dumps(rows, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
