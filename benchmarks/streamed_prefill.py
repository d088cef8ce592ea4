"""The Transformer fed a long context in segments (streamed prefill, as ``miras eval`` does), with the cache
continued by two flash-attention calls (``layers/attention.py``, ``_continued``) against the masked call it
replaced (the same model with the fast path switched off).

    .venv/bin/python benchmarks/streamed_prefill.py      # about 1.5 min on 2 cores; prints a table

Each case runs in its own process (peak RSS is per process); no grad, float32, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = [("transformer-tiny", 65536, 4096), ("transformer-small", 16384, 4096)]


def run_case(preset: str, tokens: int, segment: int, masked: bool) -> dict:
    import torch

    import miras.layers.attention as attention
    from miras.bench import peak_rss_mb
    from miras.models import create

    if masked:
        attention._FLASH_CPU = None  # _can_continue is then False: the masked call runs
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create(preset).eval()
    ids = torch.randint(0, 256, (1, tokens))
    started = time.perf_counter()
    with torch.no_grad():
        state = None
        for start in range(0, tokens, segment):
            _, state = model(ids[:, start:start + segment], state)
    return {"seconds": time.perf_counter() - started,
            "peak_mib": peak_rss_mb()}  # VmHWM: this process's own peak, not the parent's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)  # preset tokens segment masked (a child)
    args = parser.parse_args()
    if args.case:
        preset, tokens, segment, masked = args.case
        print(json.dumps(run_case(preset, int(tokens), int(segment), masked == "1")))
        return
    print("| preset | tokens (segment) | masked call: s, peak MiB | two flash calls: s, peak MiB | speed-up |")
    print("|---|---|---|---|---|")
    for preset, tokens, segment in CASES:
        found = {}
        for masked in ("1", "0"):
            out = subprocess.run([sys.executable, __file__, "--case", preset, str(tokens), str(segment), masked],
                                 capture_output=True, text=True, check=True).stdout
            found[masked] = json.loads(out.splitlines()[-1])
        old, new = found["1"], found["0"]
        print(f"| {preset} | {tokens:,} ({segment:,}) | {old['seconds']:.1f}, {old['peak_mib']:,.0f} | "
              f"{new['seconds']:.1f}, {new['peak_mib']:,.0f} | {old['seconds'] / new['seconds']:.1f}x |")


if __name__ == "__main__":
    main()
