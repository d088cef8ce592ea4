"""Throughput and peak memory of MemoryLayer (TITANS rule) against a causal SDPA attention layer of
the same width, and against titans-pytorch's NeuralMemory where a throwaway venv has it.

    make bench                                          # everything, ~30 min on 2 cores
    .venv/bin/python benchmarks/memory_layer.py --quick # a subset, ~3 min
    make bench-baseline-venv                            # once: titans-pytorch 0.5.5 in .bench/

Every case runs in its own process (peak RSS is per process), after a correctness check in float64
(chunked == recurrent) and a bf16-autocast accuracy check against float64. Achieved GFLOP/s counts
the matmul FLOPs of forward (+ backward) with torch's FlopCounterMode and is compared to the float32
(and bf16) matmul rate measured in the same run; it is counted after the timing, so that the
counting pass (an eager twin of a compiled layer) stays out of the case's peak RSS. Results:
benchmarks/results/memory_layer.{json,md}. Exits 1 if a case failed (its row says why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
DIM, HEADS = 256, 4
BASELINE_PYTHON = ROOT.parent / ".bench" / "titans-venv" / "bin" / "python"


class CausalAttention(nn.Module):
    """The comparison layer: q/k/v/o projections and causal SDPA, same width as the memory layer."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), None


def build(case):
    from miras.layers import MemoryLayer
    from miras.memory import TITANS

    torch.manual_seed(0)
    if case["layer"] == "attention":
        return CausalAttention(DIM, HEADS)
    return MemoryLayer(DIM, heads=HEADS, rule=TITANS, chunk_size=case["chunk"], impl=case["layer"],
                       gating=case.get("gating", "token"))


def make_step(layer, x, case):
    """One timed unit: forward (no grad) or forward + backward of a squared-mean loss."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["dtype"] == "bfloat16")

    def step(inp=x):
        if case["mode"] == "fwd":
            with torch.no_grad(), autocast:
                return layer(inp)[0]
        layer.zero_grad(set_to_none=True)
        with autocast:
            y = layer(inp)[0]
        y.float().square().mean().backward()
        return y

    return step


def time_case(case, step) -> dict:
    """Warm up once, then time up to ``repeats`` runs within ``budget_s``; median, peak RSS (read here, before
    anything else runs in the process)."""
    from miras.bench import peak_rss_mb

    rss_before = peak_rss_mb()
    finite = bool(torch.isfinite(step().float()).all())
    times = []
    while len(times) < case["repeats"] and sum(times) < case["budget_s"]:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {**case, "seconds": seconds, "tokens_per_s": case["batch"] * case["T"] / seconds, "gflops": None,
            "runs": len(times), "finite": finite, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}


def run_case(case) -> dict:
    """Runs in a child process: build, time, then count FLOPs (after timing: the count runs an eager twin
    whose memory must not enter the case's peak RSS)."""
    torch.set_num_threads(case["threads"])
    layer = build(case)
    x = torch.randn(case["batch"], case["T"], DIM, generator=torch.Generator().manual_seed(1))
    step = make_step(layer, x, case)
    result = time_case(case, step)
    if case["layer"] != "recurrent":
        from torch.utils.flop_counter import FlopCounterMode

        from miras.bench import attention_flop_formulas

        # Count on the eager twin (same math, same FLOPs): the counter cannot see into compiled code.
        twin = make_step(build({**case, "layer": "chunked"}), x, case) if case["layer"] == "compiled" else step
        # The memory layer's FLOPs are linear in T: counted on 1024 tokens and scaled. Attention's are not (and
        # torch counts none for its CPU kernel without these formulas): counted at the full T.
        count_t = case["T"] if case["layer"] == "attention" else min(case["T"], 1024)
        counter = FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
        with counter:
            twin(x[:, :count_t])
        result["gflops"] = counter.get_total_flops() * case["T"] / count_t / result["seconds"] / 1e9
    return result


def check_correctness() -> dict:
    """chunked == recurrent (float64, layer level, with gradients); bf16 engine error vs float64."""
    from miras.layers import MemoryLayer
    from miras.memory import TITANS, chunked

    torch.manual_seed(0)
    fast = MemoryLayer(64, heads=2, rule=TITANS, chunk_size=16).double()
    slow = MemoryLayer(64, heads=2, rule=TITANS, chunk_size=16, impl="recurrent").double()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    y_fast, y_slow = fast(x)[0], slow(x)[0]
    y_fast.square().sum().backward()
    y_slow.square().sum().backward()
    grad_err = max((a.grad - b.grad).abs().max().item() for a, b in zip(fast.parameters(), slow.parameters()))
    out_err = (y_fast - y_slow).abs().max().item()
    assert out_err < 1e-9 and grad_err < 1e-8, (out_err, grad_err)

    # Engine accuracy in float32 and under bf16 autocast, relative to float64, at the bench config.
    from miras.memory import Gates, MemoryState, initial_state

    gen = torch.Generator().manual_seed(2)
    b, t, h, d = 1, 1024, HEADS, DIM // HEADS
    q, k = (F.normalize(torch.randn(b, t, h, d, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64)
    gates = Gates(lr=torch.full((b, t, h), 0.1, dtype=torch.float64), momentum=torch.full((b, t, h), 0.9,
                  dtype=torch.float64), decay=torch.full((b, t, h), 0.01, dtype=torch.float64))
    state = initial_state(TITANS, b, h, d, d, dtype=torch.float64)
    y64, _ = chunked(TITANS, q, k, v, gates, state, 16)

    def rel(dtype_autocast):
        f = lambda z: z.float()  # noqa: E731
        g32 = Gates(**{n: f(x) for n, x in gates.present().items()})
        s32 = MemoryState(tuple(map(f, state.weights)), tuple(map(f, state.momentum)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_autocast):
            y, _ = chunked(TITANS, f(q), f(k), f(v), g32, s32, 16)
        return ((y.double() - y64).norm() / y64.norm()).item()

    return {"layer_out_err_f64": out_err, "layer_grad_err_f64": grad_err, "engine_rel_err_f32": rel(False),
            "engine_rel_err_bf16": rel(True)}


def cases(quick: bool, threads: int, baseline: bool):
    lengths = [1024, 4096] if quick else [1024, 4096, 16384]
    batches = [1] if quick else [1, 4]
    common = {"threads": threads, "repeats": 3, "budget_s": 20.0}
    for mode in ("fwd", "fwdbwd"):
        for chunk in (16, 64):
            for batch in batches:
                for length in lengths:
                    yield {"layer": "chunked", "chunk": chunk, "batch": batch, "T": length, "mode": mode,
                           "dtype": "float32", **common}
        for batch in batches:
            for length in lengths:
                yield {"layer": "attention", "chunk": None, "batch": batch, "T": length, "mode": mode,
                       "dtype": "float32", **common}
        yield {"layer": "recurrent", "chunk": 16, "batch": 1, "T": 1024, "mode": mode, "dtype": "float32",
               **common, "repeats": 1}
    # impl="compiled": each chunk step under torch.compile (compiled once per process, in the warm-up).
    for chunk in (16, 64):
        for batch in batches:
            for length in lengths:
                yield {"layer": "compiled", "chunk": chunk, "batch": batch, "T": length, "mode": "fwdbwd",
                       "dtype": "float32", **common}
    for length in (lengths[0], lengths[-1]):
        yield {"layer": "compiled", "chunk": 16, "batch": 1, "T": length, "mode": "fwd", "dtype": "float32", **common}
    for layer in ("chunked", "compiled"):
        for length in lengths:
            yield {"layer": layer, "chunk": 16, "batch": 1, "T": length, "mode": "fwdbwd", "dtype": "bfloat16",
                   **common}
    # Channel-wise gates (rank-32 projection, per memory input channel) against the token-level default.
    for length in lengths[:2]:
        yield {"layer": "chunked", "chunk": 16, "batch": 1, "T": length, "mode": "fwdbwd", "dtype": "float32",
               "gating": "channel", **common}
    if baseline:
        for chunk in (16, 64):
            for length in lengths[:2]:
                yield {"layer": "titans-pytorch", "chunk": chunk, "batch": 1, "T": length, "mode": "fwdbwd",
                       "dtype": "float32", **common}
        yield {"layer": "titans-pytorch", "chunk": 16, "batch": 1, "T": 1024, "mode": "fwdbwd", "dtype": "bfloat16",
               **common}


def spawn(case, cmd: list[str] | None = None) -> dict:
    """Run ``case`` in a child process (``cmd``, default: this script's ``--case``); its JSON result."""
    env = None
    if cmd is None and case["layer"] == "titans-pytorch":
        cmd = [str(BASELINE_PYTHON), str(ROOT / "titans_baseline.py"), json.dumps(case)]
        # miras is not installed there; its measurement helpers (miras.bench: torch and the stdlib) are imported
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT.parent / "src"),
                                                                         os.environ.get("PYTHONPATH")]))}
    elif cmd is None:
        cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        return {**case, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results, rates) -> str:
    rows = ["| layer | chunk | batch | T | mode | dtype | tokens/s | GFLOP/s | % of fp32 matmul | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['layer']} | {r['chunk']} | {r['batch']} | {r['T']} | {r['mode']} | {r['dtype']} "
                        f"| error: {r['error']} | | | |")
            continue
        gflops = "" if r.get("gflops") is None else f"{r['gflops']:.1f}"
        share = "" if r.get("gflops") is None else f"{100 * r['gflops'] / rates['float32']:.0f}%"
        layer = r["layer"] + (" (channel gates)" if r.get("gating") == "channel" else "")
        rows.append(f"| {layer} | {r['chunk'] or ''} | {r['batch']} | {r['T']} | {r['mode']} | {r['dtype']} "
                    f"| {r['tokens_per_s']:,.0f} | {gflops} | {share} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="T in {1K, 4K}, batch 1 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip titans-pytorch even if installed")
    parser.add_argument("--out", type=Path, default=None,
                        help="where memory_layer.json / .md go (default: benchmarks/results; with --quick, nowhere "
                             "unless given, so that a quick run never replaces the committed full results)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    checks = check_correctness()
    print("correctness:", json.dumps(checks), flush=True)
    from miras.bench import matmul_rate

    rates = {name: matmul_rate(torch.device("cpu"), args.threads, dtype=dtype)
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    print(f"matmul 2048^3 GFLOP/s: float32 {rates['float32']:.0f}, bf16 {rates['bfloat16']:.0f}", flush=True)
    baseline = not args.no_baseline and BASELINE_PYTHON.exists()
    if not baseline:
        print("titans-pytorch baseline: skipped (run `make bench-baseline-venv` to compare)")
    results = []
    for case in cases(args.quick, args.threads, baseline):
        result = spawn(case)
        results.append(result)
        print(table([result], rates).splitlines()[-1], flush=True)
    from miras.files import atomic_write_bytes

    out = args.out if args.out is not None else None if args.quick else ROOT / "results"
    if out is None:
        print("--quick: nothing written (give --out to keep the results)")
        return _failed(results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "quick": args.quick}
    atomic_write_bytes(out / "memory_layer.json", json.dumps(
        {"meta": meta, "matmul_gflops": rates, "correctness": checks, "results": results}, indent=1).encode())
    md = (f"Matmul rate (2048³, {args.threads} threads): float32 {rates['float32']:.0f} GFLOP/s, "
          f"bf16 {rates['bfloat16']:.0f} GFLOP/s. torch {torch.__version__}.\n\n" + table(results, rates) + "\n")
    atomic_write_bytes(out / "memory_layer.md", md.encode())
    print(f"wrote {out / 'memory_layer.md'}")
    return _failed(results)


def _failed(results: list[dict]) -> int:
    """The exit status: 1 (and a line naming them) when cases failed, so that a script or CI sees it."""
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(results)} cases failed (their rows say why)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
