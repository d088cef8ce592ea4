"""Training and decoding throughput, peak memory and state size per model family (``miras bench``).

    miras bench                                          # every family at `small`: T 1K, 4K; contexts 1K, 16K, 64K
    miras bench --families titans-mac transformer --lengths 1024 4096 16384
    miras bench --families titans-lmm --lengths 16384 --overrides recompute=16   # config overrides
    miras bench --lengths 1024 4096 16384 --long-overrides recompute=64   # the 16K rows recompute (fit in memory)
    miras bench --device cuda                            # on a GPU (peak memory: CUDA allocator's peak)
    .venv/bin/python benchmarks/models.py                # the same, results into benchmarks/results/

Each case runs in its own process (peak RSS is per process), 2 threads (``--threads``), float32:
- train: one forward + backward of a next-token loss on [1, T] random tokens, median of the timed
  runs (3, or fewer when they pass 30 s: ``runs`` in the JSON); model GFLOP/s = 3x the FLOPs of one
  forward pass (the usual fwd + 2x bwd convention, as model-FLOPs utilisation counts them;
  ``model_gflops`` in the JSON is that 3x) over the measured step time, compared with a dense
  float32 matmul's rate measured in the same run. The forward's FLOPs are counted with torch's
  FlopCounterMode on an eager twin: every matmul, and attention as the kernel is called (every
  query-key pair of a masked call, half of them under ``is_causal``). These are the FLOPs the model
  needs, not those a step executes: recompute is not counted, and the memories' backward passes
  run more than 2x their forward (FlopCounterMode over forward + backward, `small`, 512 tokens:
  1.47x the 3x-forward count for titans-lmm, 1.57x for ttt-mlp, 1.81x for gated-deltanet's exact
  delta path, 1.00x for the Transformer), so their GFLOP/s understate how busy the matmul units are;
- decode: stream a context of C tokens through the model in 4K-token segments (bounded memory),
  then time 64 single-token decoding steps; report tokens/s, peak RSS and the state size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LONG_FROM = 16384  # --long-from's default: the training length from which --long-overrides apply


def _peak_mb(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): ``VmHWM`` from /proc/self/status, which starts afresh at exec.
    ``getrusage(...).ru_maxrss`` does not: on Linux a child started by fork + exec inherits its parent's peak, so
    a small case run from a large parent would report the parent's. (ru_maxrss where /proc is missing.)"""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_case(case) -> dict:
    from .models import create

    torch.set_num_threads(case.get("threads", 2))
    torch.manual_seed(0)
    device = torch.device(case.get("device", "cpu"))
    model = create(f"{case['family']}-{case.get('size', 'small')}", **case.get("overrides", {})).to(device)
    gen = torch.Generator().manual_seed(1)
    if case["kind"] == "train":
        ids = torch.randint(0, 256, (1, case["T"] + 1), generator=gen).to(device)

        def step():
            model.zero_grad(set_to_none=True)
            logits, _ = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).backward()

        step()
        times = []
        while len(times) < 3 and sum(times) < 30:
            start = _clock(device)
            step()
            times.append(_clock(device) - start)
        seconds = statistics.median(times)
        peak = _peak_mb(device)  # before counting: the twin's forward is not part of the measured step
        flops = model_flops(case, ids[:, :-1])
        return {**case, "tokens_per_s": case["T"] / seconds, "runs": len(times), "params": model.num_parameters(),
                "peak_rss_mb": peak, "model_gflops": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}
    state = None
    with torch.no_grad():
        for start in range(0, case["context"], 4096):
            length = min(4096, case["context"] - start)
            _, state = model(torch.randint(0, 256, (1, length), generator=gen).to(device), state)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        _, state = model(token, state)  # warm-up
        # the largest state of the 64 steps: mid-chunk a memory also keeps its chunk-start weights, and
        # 64 steps from a chunk boundary end on one (as evaluate reports it: the largest state seen)
        largest = model.state_bytes(state)
        start = _clock(device)
        for _ in range(64):
            logits, state = model(token, state)
            largest = max(largest, model.state_bytes(state))
            token = logits[:, -1:].argmax(-1)
        seconds = _clock(device) - start
    # sizes in MiB (2**20 bytes), as the tables label them
    return {**case, "tokens_per_s": 64 / seconds, "ms_per_token": 1000 * seconds / 64,
            "state_mb": largest / 2**20, "peak_rss_mb": _peak_mb(device)}


def model_flops(case, ids: torch.Tensor) -> float:
    """3x the matmul and attention FLOPs of one forward pass of the case's model on ``ids``."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create

    overrides = dict(case.get("overrides", {}))
    if overrides.get("impl") == "compiled":  # same math; the counter cannot see into compiled code
        overrides["impl"] = "chunked"
    twin = create(f"{case['family']}-{case.get('size', 'small')}", **overrides).to(ids.device).requires_grad_(False)
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
    with torch.no_grad(), counter:
        twin(ids)
    return 3.0 * counter.get_total_flops()


def attention_flop_formulas() -> dict:
    """FlopCounterMode's ``custom_mapping`` for the attention kernels it has no formula for (it counts the CPU
    flash kernel as 0): forward as ``attention_flops``, the CPU kernel's backward as twice that."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _flash_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_attention_backward_flops,
            aten._scaled_dot_product_flash_attention: _flash_attention_flops,
            aten._scaled_dot_product_efficient_attention: _biased_attention_flops,
            aten._scaled_dot_product_cudnn_attention: _biased_attention_flops}


def _flash_attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                                    *args, **kwargs) -> int:
    """dQ, dK, dV: twice the forward's two products (the CPU kernel's backward; arguments as shapes)."""
    return 2 * attention_flops(query, key, value, is_causal)


def _flash_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """The flash-attention kernels (CPU and CUDA; arguments as shapes)."""
    return attention_flops(query, key, value, is_causal)


def _biased_attention_flops(query, key, value, attn_bias=None, compute_log_sumexp=False, dropout_p=0.0,
                            is_causal=False, *args, **kwargs) -> int:
    """The memory-efficient and cuDNN attention kernels (CUDA; arguments as shapes)."""
    return attention_flops(query, key, value, is_causal)


def attention_flops(query, key, value, is_causal: bool) -> int:
    """Q·Kᵀ and P·V over the query-key pairs an attention kernel computes (torch's FlopCounterMode
    counts every pair, causal or not). Shapes [B, H, T, D]."""
    batch, heads, queries, dim = query
    keys, value_dim = key[-2], value[-1]
    pairs = queries * keys
    if is_causal:  # torch's causal mask is top-left aligned: query i sees keys 0..i
        seen = min(queries, keys)
        pairs = seen * (seen + 1) // 2 + (queries - seen) * keys
    return 2 * batch * heads * pairs * (dim + value_dim)


def matmul_rate(device: torch.device, threads: int, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n³ matmul in ``dtype`` (median of 10), the machine's dense rate for comparison."""
    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start = _clock(device)
        a @ b
        times.append(_clock(device) - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def cases(families: list[str], size: str, lengths: list[int], contexts: list[int], overrides: dict | None = None,
          device: str = "cpu", threads: int = 2, long_overrides: dict | None = None, long_from: int = LONG_FROM):
    """Each case with the ``overrides`` its family uses (``used_overrides``: e.g. no ``impl`` for the Transformer);
    training cases of ``long_from`` tokens or more also take ``long_overrides`` (over ``overrides``)."""
    from .models.config import used_overrides

    common = {"size": size, "device": device, "threads": threads}
    used = {family: used_overrides(f"{family}-{size}", overrides or {}) for family in families}
    longer = {family: used_overrides(f"{family}-{size}", {**(overrides or {}), **(long_overrides or {})})
              for family in families}
    for family in families:
        for length in lengths:
            yield {"family": family, **common, "overrides": longer[family] if length >= long_from else used[family],
                   "kind": "train", "T": length}
    for family in families:
        for context in contexts:
            yield {"family": family, **common, "overrides": used[family], "kind": "decode", "context": context}


def spawn(case) -> dict:
    try:
        out = subprocess.run([sys.executable, "-m", "miras.bench", "--case", json.dumps(case)], capture_output=True,
                             text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {**case, "error": "timed out after 900 s"}
    if out.returncode != 0:
        return {**case, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


TRAIN_HEADER = ["| family | T | train tokens/s | model GFLOP/s | % of matmul | peak RSS MiB | params |",
                "|---|---|---|---|---|---|---|"]
# a run with --long-overrides adds a column: each training row's own overrides
SETTINGS_HEADER = [TRAIN_HEADER[0] + " overrides |", TRAIN_HEADER[1] + "---|"]
DECODE_HEADER = ["| family | context | decode tokens/s | ms/token | state MiB | peak RSS MiB |",
                 "|---|---|---|---|---|---|"]


def table_row(r: dict, matmul_gflops: float | None = None, settings: bool = False) -> str:
    """One case's row of its table (TRAIN_HEADER's or DECODE_HEADER's, as ``r["kind"]`` says; SETTINGS_HEADER's
    with ``settings``)."""
    # with settings, a training row's own overrides in the last column (a failed row's too: they say what failed)
    own = (" " + (", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "none") + " |"
           if settings and r["kind"] == "train" else "")
    if "error" in r:
        where = f" | {r['T']}" if r["kind"] == "train" else f" | {r['context']}"
        # (with settings: the four cells after the error's left empty, then the overrides)
        return f"| {r['family']}{where} | error: {r['error']} |{'  |' * 4 + own if own else ''}"
    if r["kind"] == "train":
        share = f"{100 * r['gflop_per_s'] / matmul_gflops:.0f}%" if matmul_gflops else ""
        return (f"| {r['family']} | {r['T']} | {r['tokens_per_s']:,.0f} | {r['gflop_per_s']:.1f} | {share} "
                f"| {r['peak_rss_mb']:,.0f} | {r['params']:,} |{own}")
    return (f"| {r['family']} | {r['context']} | {r['tokens_per_s']:,.1f} | {r['ms_per_token']:.1f} "
            f"| {r['state_mb']:.2f} | {r['peak_rss_mb']:,.0f} |")


def tables(results, matmul_gflops: float | None = None, settings: bool = False) -> str:
    train = (SETTINGS_HEADER if settings else TRAIN_HEADER) + [table_row(r, matmul_gflops, settings)
                                                               for r in results if r["kind"] == "train"]
    decode = DECODE_HEADER + [table_row(r, matmul_gflops) for r in results if r["kind"] != "train"]
    return "\n".join(train) + "\n\n" + "\n".join(decode) + "\n"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import FAMILIES, SIZES

    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                        help="model families (default: all)")
    parser.add_argument("--size", default="small", choices=list(SIZES), help="preset size (default: small)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096], help="training lengths (none: skip)")
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 16384, 65536],
                        help="decoding contexts (none: skip)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model config overrides, e.g. recompute=16; each family takes those it reads (no "
                             "impl for the Transformer), and one that no listed family reads is an error")
    parser.add_argument("--long-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides for the training lengths of --long-from tokens or more (over "
                             "--overrides), e.g. recompute=64 so that 16K rows fit in memory")
    parser.add_argument("--long-from", type=int, default=None,
                        help=f"the training length from which --long-overrides apply (default {LONG_FROM})")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto (CUDA if there is one)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per case, >= 1 (default 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="folder for models.json / models.md (default: runs/bench)")


def _parse_overrides(option: str, items: list[str]) -> dict:
    """``KEY=VALUE`` items of ``option`` as a dict of typed model config values, or a ConfigError."""
    import typing

    from .models import ModelConfig
    from .train_config import ConfigError, parse_value

    hints, overrides = typing.get_type_hints(ModelConfig), {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ConfigError(f"{option} takes KEY=VALUE with KEY a model config field "
                              f"({', '.join(sorted(hints))}), got {item!r}")
        try:
            overrides[key] = parse_value(key, value, hints[key])
        except ConfigError as error:
            raise ConfigError(f"{option} {error}") from None
    return overrides


def check_bench_args(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """Every option checked before anything is timed or written: the parsed ``--overrides`` and
    ``--long-overrides`` and the device (``auto`` resolved), or a ConfigError with a one-line message that says
    what is allowed. Sets ``args.long_from`` to its default when it was not given."""
    from .models import check_buildable, preset_config
    from .models.config import used_overrides
    from .train_config import ConfigError, resolve_device

    overrides = _parse_overrides("--overrides", args.overrides)
    long_overrides = _parse_overrides("--long-overrides", args.long_overrides)
    try:
        device = resolve_device(args.device)
    except ConfigError as error:
        raise ConfigError(f"--device: {error}") from None
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1 (torch CPU threads per case), got {args.threads}")
    for option, values, least, what in (("--lengths", args.lengths, 1, "training lengths"),
                                        ("--contexts", args.contexts, 0, "decoding contexts"),
                                        ("--long-from", [] if args.long_from is None else [args.long_from], 1,
                                         "a training length")):
        bad = [value for value in values if value < least]
        if bad:
            raise ConfigError(f"{option} must be >= {least} ({what} in tokens), got {' '.join(map(str, bad))}")
    if args.long_from is not None and not args.long_overrides:
        raise ConfigError(f"--long-from {args.long_from} without --long-overrides: there are no overrides to apply "
                          "from there; give --long-overrides KEY=VALUE ... too, or leave --long-from out")
    if args.long_from is None:  # (None: not given; run_bench reads it from args)
        args.long_from = LONG_FROM
    if not args.lengths and not args.contexts:
        raise ConfigError("--lengths and --contexts are both empty: nothing to measure; give at least one")
    if long_overrides and not any(length >= args.long_from for length in args.lengths):
        lengths = " ".join(map(str, args.lengths)) or "none"
        raise ConfigError(f"--long-overrides {' '.join(args.long_overrides)}: no training length is >= --long-from "
                          f"{args.long_from} (--lengths {lengths}): they would apply to nothing; leave them out or "
                          "lower --long-from")
    existing = args.out
    # the folder mkdir will start from (a broken symlink stops the walk: mkdir could not make a folder there)
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {str(args.out)!r}: {str(existing)!r} is not a folder; give a folder for "
                          "models.json / models.md")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {str(args.out)!r}: {str(existing)!r} is not writable")
    sets = [("--overrides", args.overrides, overrides)]
    if long_overrides:  # the long rows' models: both sets together, as cases() gives them
        sets.append(("--overrides/--long-overrides", [*args.overrides, *args.long_overrides],
                     {**overrides, **long_overrides}))
    used = set()
    for option, items, values in sets:
        given = f"{option} {' '.join(items)}: " if items else ""
        for family in args.families:  # every case's model, as run_case will build it (on no memory)
            try:
                family_overrides = used_overrides(f"{family}-{args.size}", values)
                used |= set(family_overrides)
                config = preset_config(f"{family}-{args.size}", **family_overrides)
                check_buildable(config)  # the layers' own checks too (e.g. impl against the memory rule)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{given}{family}-{args.size}: {error}") from None
            if config.vocab_size < 256:
                raise ConfigError(f"{given}vocab_size={config.vocab_size}, but the "
                                  "bench feeds random byte ids (0-255): vocab_size must be >= 256")
    for option, items, values in (("--overrides", args.overrides, overrides),
                                  ("--long-overrides", args.long_overrides, long_overrides)):
        unused = sorted(set(values) - used)
        if unused:
            raise ConfigError(f"{option} {' '.join(items)}: no family here uses {', '.join(unused)} "
                              f"({', '.join(args.families)}): leave it out")
    return overrides, long_overrides, str(device)


def run_bench(args: argparse.Namespace) -> int:
    """Measure every case in its own process; write models.json and models.md into ``args.out``."""
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    from .files import atomic_write_bytes
    from .train_config import ConfigError

    try:
        overrides, long_overrides, device_name = check_bench_args(args)
    except ConfigError as error:
        print(f"miras bench: error: {error}", file=sys.stderr)
        return 2
    rate = matmul_rate(torch.device(device_name), args.threads)
    print(f"float32 matmul (2048^3, {args.threads} threads): {rate:.0f} GFLOP/s", flush=True)
    results, headed = [], set()
    settings = bool(long_overrides)
    for case in cases(args.families, args.size, args.lengths, args.contexts, overrides, device_name, args.threads,
                      long_overrides, args.long_from):
        results.append(spawn(case))
        kind = results[-1]["kind"]
        if kind not in headed:  # each table's header before its first row, then the rows as they are measured
            print("\n".join((SETTINGS_HEADER if settings else TRAIN_HEADER) if kind == "train" else DECODE_HEADER))
            headed.add(kind)
        print(table_row(results[-1], rate, settings), flush=True)
    on_gpu = device_name.startswith("cuda")
    device = torch.cuda.get_device_name(device_name) if on_gpu else f"cpu, {args.threads} threads"
    meta = {"torch": torch.__version__, "device": device, "preset": args.size, "dtype": "float32",
            "lengths": args.lengths, "contexts": args.contexts, "overrides": overrides,
            "long_overrides": long_overrides, "long_from": args.long_from, "matmul_gflops": rate}
    report = json.dumps({"meta": meta, "results": results}, indent=1)
    extra = f", overrides {overrides} (each family takes those it uses)" if overrides else ""
    if long_overrides:
        extra += (f"; from T = {args.long_from} training also takes {long_overrides} (each row's own overrides in "
                  "its last column)")
    memory = "CUDA allocator peak" if on_gpu else "peak RSS"
    table = (f"torch {torch.__version__}, {device}, float32, `<family>-{args.size}`{extra}; "
             f"peak memory = {memory}; float32 matmul (2048³) {rate:.0f} GFLOP/s.\n\n"
             + tables(results, rate, settings))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out / "models.json", report.encode())
        atomic_write_bytes(args.out / "models.md", table.encode())
    except OSError as error:  # (checked before the run, but the folder or the disk may have changed since)
        print(report)  # the measurements, not lost
        print(f"miras bench: error: cannot write into --out {str(args.out)!r} ({error.strerror or error}); the "
              "results are printed above as JSON", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'models.md'}")
    failed = [r for r in results if "error" in r]
    if failed:  # recorded in the tables (a row per case), and the exit code says that some are not numbers
        print(f"miras bench: {len(failed)} of {len(results)} case(s) failed (their rows say why)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
