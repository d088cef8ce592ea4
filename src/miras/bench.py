"""Training and decoding throughput, peak memory and state size per model family (``miras bench``).

    miras bench                                          # every family at `small`: T 1K, 4K; contexts 1K, 16K, 64K
    miras bench --families titans-mac transformer --lengths 1024 4096 16384
    .venv/bin/python benchmarks/models.py                # the same, results into benchmarks/results/

Each case runs in its own process (peak RSS is per process), 2 threads, float32:
- train: one forward + backward of a next-token loss on [1, T] random tokens, median of timed runs;
- decode: stream a context of C tokens through the model in 4K-token segments (bounded memory),
  then time 64 single-token decoding steps; report tokens/s, peak RSS and the state size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def run_case(case) -> dict:
    from .models import create

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create(f"{case['family']}-{case.get('size', 'small')}")
    gen = torch.Generator().manual_seed(1)
    if case["kind"] == "train":
        ids = torch.randint(0, 256, (1, case["T"] + 1), generator=gen)

        def step():
            model.zero_grad(set_to_none=True)
            logits, _ = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).backward()

        step()
        times = []
        while len(times) < 3 and sum(times) < 30:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        return {**case, "tokens_per_s": case["T"] / seconds, "params": model.num_parameters(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    state = None
    with torch.no_grad():
        for start in range(0, case["context"], 4096):
            length = min(4096, case["context"] - start)
            _, state = model(torch.randint(0, 256, (1, length), generator=gen), state)
        token = torch.zeros(1, 1, dtype=torch.long)
        model(token, state)  # warm-up
        start = time.perf_counter()
        for _ in range(64):
            logits, state = model(token, state)
            token = logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
    return {**case, "tokens_per_s": 64 / seconds, "ms_per_token": 1000 * seconds / 64,
            "state_mb": model.state_bytes(state) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cases(families: list[str], size: str, lengths: list[int], contexts: list[int]):
    for family in families:
        for length in lengths:
            yield {"family": family, "size": size, "kind": "train", "T": length}
    for family in families:
        for context in contexts:
            yield {"family": family, "size": size, "kind": "decode", "context": context}


def spawn(case) -> dict:
    try:
        out = subprocess.run([sys.executable, "-m", "miras.bench", "--case", json.dumps(case)], capture_output=True,
                             text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {**case, "error": "timed out after 900 s"}
    if out.returncode != 0:
        return {**case, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tables(results) -> str:
    train = ["| family | T | train tokens/s | peak RSS MB | params |", "|---|---|---|---|---|"]
    decode = ["| family | context | decode tokens/s | ms/token | state MB | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            (train if r["kind"] == "train" else decode).append(f"| {r['family']} | error: {r['error']} |")
        elif r["kind"] == "train":
            train.append(f"| {r['family']} | {r['T']} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} "
                         f"| {r['params']:,} |")
        else:
            decode.append(f"| {r['family']} | {r['context']} | {r['tokens_per_s']:,.1f} | {r['ms_per_token']:.1f} "
                          f"| {r['state_mb']:.2f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(train) + "\n\n" + "\n".join(decode) + "\n"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import FAMILIES, SIZES

    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                        help="model families (default: all)")
    parser.add_argument("--size", default="small", choices=list(SIZES), help="preset size (default: small)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="training lengths")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384, 65536], help="decoding contexts")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for models.json / models.md")


def run_bench(args: argparse.Namespace) -> int:
    """Measure every case in its own process; write models.json and models.md into ``args.out``."""
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    results = []
    for case in cases(args.families, args.size, args.lengths, args.contexts):
        results.append(spawn(case))
        print(tables([results[-1]]).strip().splitlines()[2 if results[-1]["kind"] == "train" else -1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": 2, "preset": args.size, "dtype": "float32",
            "lengths": args.lengths, "contexts": args.contexts}
    (args.out / "models.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "models.md").write_text(f"torch {torch.__version__}, 2 threads, float32, `<family>-{args.size}`.\n\n"
                                        + tables(results))
    print(f"wrote {args.out / 'models.md'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
