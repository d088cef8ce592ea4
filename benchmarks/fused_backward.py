"""The memory's hand-written backward (miras.memory.fused) against autograd, one MemoryLayer (TITANS
rule, dim 256, 4 heads, chunk 16: the layer of titans-*-small), forward + backward of [1, T].

    .venv/bin/python benchmarks/fused_backward.py                 # T = 4K and 16K, ~10 min on 2 cores
    .venv/bin/python benchmarks/fused_backward.py --lengths 4096  # prints only (give --out to keep it)

For each path (eager / compiled, with and without recompute=16) the layer runs once with autograd
through the chunk loop (fused=False) and once with the fused backward (fused=True), each case in its
own process (peak RSS is per process). Before timing, the two are checked equal on the same input
(outputs and every parameter gradient, float32). Results: benchmarks/results/fused_backward.{json,md},
written only by the committed run (the default lengths) or where ``--out`` says. Exits 1 if a case failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_layer import DIM, HEADS, ROOT, _failed, make_step, spawn, time_case  # noqa: E402

COMMITTED = [4096, 16384]  # the lengths of the committed results
PATHS = [("chunked", 0), ("chunked", 16), ("compiled", 0), ("compiled", 16)]


def build(case):
    from miras.layers import MemoryLayer
    from miras.memory import TITANS

    torch.manual_seed(0)
    return MemoryLayer(DIM, heads=HEADS, rule=TITANS, chunk_size=16, impl=case["impl"], recompute=case["recompute"],
                       fused=case["fused"])


def run_case(case) -> dict:
    torch.set_num_threads(case["threads"])
    layer = build(case)
    x = torch.randn(1, case["T"], DIM, generator=torch.Generator().manual_seed(1))
    return time_case(case, make_step(layer, x, case))


def check_equal() -> float:
    """Largest relative difference, fused against autograd, of outputs and parameter gradients (T = 300)."""
    x = torch.randn(1, 300, DIM, generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        layer = build({"impl": "chunked", "recompute": 0, "fused": fused})
        y = layer(x)[0]
        y.square().mean().backward()
        results.append([y.detach()] + [p.grad for p in layer.parameters()])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*results))


def table(results) -> str:
    rows = ["| impl | recompute | T | backward | tokens/s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for r in results:
        backward = "fused" if r["fused"] else "autograd"
        value = f"error: {r['error']}" if "error" in r else f"{r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f}"
        rows.append(f"| {r['impl']} | {r['recompute']} | {r['T']} | {backward} | {value} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=COMMITTED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for fused_backward.json / .md (default: benchmarks/results for the committed "
                             "run, the default lengths; nowhere for any other)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    for option, values in (("--lengths", args.lengths), ("--threads", [args.threads])):
        if min(values) < 1:
            parser.error(f"{option} must be >= 1, got {' '.join(map(str, values))}")
    difference = check_equal()
    print(f"fused == autograd: largest relative difference {difference:.1e}", flush=True)
    if difference > 1e-4:
        raise SystemExit("the fused backward disagrees with autograd")
    results = []
    for length in args.lengths:
        for impl, recompute in PATHS:
            for fused in (False, True):
                case = {"impl": impl, "recompute": recompute, "fused": fused, "T": length, "threads": args.threads,
                        "mode": "fwdbwd", "dtype": "float32", "batch": 1, "repeats": 3, "budget_s": 60}
                results.append(spawn(case, [sys.executable, __file__, "--case", json.dumps(case)]))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    out = args.out or (ROOT / "results" if args.lengths == COMMITTED else None)
    if out is None:
        print("nothing written: only the committed run (the default lengths) replaces benchmarks/results/"
              "fused_backward; give --out to keep this one")
        return _failed(results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "relative_difference": difference}
    from miras.files import atomic_write_bytes

    atomic_write_bytes(out / "fused_backward.json",
                       json.dumps({"meta": meta, "results": results}, indent=1).encode())
    command = " ".join(["python benchmarks/fused_backward.py", *sys.argv[1:]])
    atomic_write_bytes(out / "fused_backward.md", (
        f"Command: `{command}`. torch {torch.__version__}, {args.threads} threads, float32; MemoryLayer(256, "
        f"4 heads, TITANS, chunk 16), forward + backward of [1, T]; fused == autograd to {difference:.0e} "
        f"(relative, float32).\n\n" + table(results) + "\n").encode())
    print(f"wrote {out / 'fused_backward.md'}")
    return _failed(results)


if __name__ == "__main__":
    sys.exit(main())
