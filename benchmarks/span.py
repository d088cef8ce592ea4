"""The span form (miras.memory.span) against the chunk-by-chunk loop: training steps on short rows.

    .venv/bin/python benchmarks/span.py            # ~5 min on an idle machine
    .venv/bin/python benchmarks/span.py --quick    # two families, a few steps (a smoke test)

Each case is one model and one row shape (batch x tokens, the demo's 16 x 32 and 8 x 64): a full
training step (forward, loss, backward, AdamW), one thread, as each of the demo's workers runs it.
The two paths are timed alternately in the same process (``chunked``'s automatic choice with its
span threshold at 0, i.e. the chunk loop, and at its default), several rounds each; the table gives
the median step time of each and their ratio. Results: benchmarks/results/span.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from miras.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parent
TINY = ["titans-lmm", "titans-mac", "titans-mag", "titans-mal", "ttt-mlp", "yaad"]
SMALL = ["titans-lmm", "titans-mac"]
SHAPES = [(16, 32), (8, 64)]


def time_case(preset: str, batch: int, tokens: int, rounds: int, steps: int) -> dict:
    from miras.models import create

    chunked = importlib.import_module("miras.memory.chunked")
    default = chunked.SPAN_TOKENS
    torch.manual_seed(0)
    model = create(preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens + 1), generator=torch.Generator().manual_seed(1))

    def step():
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = {"chunk loop": [], "span": []}
    try:
        for _ in range(rounds):
            for path, threshold in (("chunk loop", 0), ("span", default)):
                chunked.SPAN_TOKENS = threshold
                step()  # warm-up after the switch
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[path].append((time.perf_counter() - start) / steps)
    finally:
        chunked.SPAN_TOKENS = default
    loop, span = (statistics.median(times[p]) for p in ("chunk loop", "span"))
    return {"preset": preset, "batch": batch, "tokens": tokens, "loop_ms": 1e3 * loop, "span_ms": 1e3 * span,
            "speedup": loop / span, "rounds": rounds, "steps": steps}


def table(results: list[dict]) -> str:
    rows = ["| model | batch x tokens | chunk loop ms/step | span ms/step | speedup |", "|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['preset']} | {r['batch']} x {r['tokens']} | {r['loop_ms']:.1f} | {r['span_ms']:.1f} | "
                    f"{r['speedup']:.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two tiny families, one shape, few steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for span.json / span.md (default: benchmarks/results; --quick: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        cases = [(f"{f}-tiny", *SHAPES[0], 2, 2) for f in TINY[:2]]
    else:
        cases = [(f"{f}-tiny", b, t, 5, 8) for f in TINY for b, t in SHAPES]
        cases += [(f"{f}-small", b, t, 4, 4) for f in SMALL for b, t in SHAPES]
    results = []
    for preset, batch, tokens, rounds, steps in cases:
        results.append(time_case(preset, batch, tokens, rounds, steps))
        r = results[-1]
        print(f"{preset} {batch}x{tokens}: loop {r['loop_ms']:.1f} ms, span {r['span_ms']:.1f} ms, "
              f"{r['speedup']:.2f}x", flush=True)
    print(table(results))
    out = args.out or (None if args.quick else ROOT / "results")
    if out is None:
        return
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "span.json", (json.dumps({"machine": machine, "results": results}, indent=1)
                                           + "\n").encode())
    atomic_write_bytes(out / "span.md", (
        f"# Span form vs chunk loop: training step on short rows\n\n{machine}; median of the rounds, the two "
        f"paths alternating in one process (`benchmarks/span.py`).\n\n{table(results)}\n").encode())


if __name__ == "__main__":
    main()
