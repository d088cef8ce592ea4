"""Does miras compute the same on a GPU? Checks, on one device, what the CPU test suite checks on the CPU.

    python benchmarks/cuda_check.py                 # on cuda; writes benchmarks/results/cuda_check.json
    python benchmarks/cuda_check.py --device cpu    # the same checks on the CPU (a dry run: writes nothing
                                                    # unless --out is given)

- the engine: chunked == recurrent (float64, values and final state) for Titans, Moneta, Yaad,
  channel-wise gates; the exact delta path == the online reference (Gated DeltaNet);
- every model family at ``tiny``: float64 logits on the device == on the CPU; a full pass == segments
  with carried state == token by token (float64, on the device); bf16 autocast forward + backward
  is finite; ``generate`` with a seed is reproducible;
- the trainer: 60 steps of ``titans-lmm-tiny`` on MQAR on the device lower the loss, and the run
  reloads there.

Each check prints one line; the script exits 1 if any failed. No test here is skipped on a machine
without CUDA: this script is a separate command, not part of the CPU test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent


def engine_checks(device: torch.device) -> list[tuple[str, float, float]]:
    """(name, max abs error, tolerance) per engine check, float64 on ``device``."""
    from miras.memory import PRESETS, Gates, chunked, initial_state, recurrent
    from miras.memory.delta import delta
    from miras.memory.state import channel_widths

    out = []
    for name, channelwise in [("titans", False), ("moneta", False), ("yaad", False), ("titans", True),
                              ("gated-deltanet", False)]:
        rule = PRESETS[name]
        gen = torch.Generator().manual_seed(0)
        B, T, H, D = 2, 37, 3, 8
        q, k = (F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
        v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
        shape = (B, T, H, sum(channel_widths(rule, D, D))) if channelwise else (B, T, H)
        scale = 0.1 if name == "moneta" else 1.0
        gates = {"lr": scale * (0.05 + 0.4 * torch.rand(*shape, generator=gen, dtype=torch.float64))}
        if "momentum" in rule.needed_gates():
            gates["momentum"] = 0.05 + 0.9 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        if "decay" in rule.needed_gates():
            gates["decay"] = 0.3 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        if "threshold" in rule.needed_gates():
            gates["threshold"] = 0.2 + 1.5 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
        q, k, v = (x.to(device) for x in (q, k, v))
        gates = Gates(**{n: g.to(device) for n, g in gates.items()})
        state = initial_state(rule, B, H, D, D, dtype=torch.float64, device=device)
        if name == "gated-deltanet":
            fast, final = delta(rule, q, k, v, gates, state, 16)
            ref, ref_final = recurrent(rule, q, k, v, gates, state, 1)
            label = "delta == recurrent (gated-deltanet, block 16)"
        else:
            fast, final = chunked(rule, q, k, v, gates, state, 8)
            ref, ref_final = recurrent(rule, q, k, v, gates, state, 8)
            label = f"chunked == recurrent ({name}{', channel-wise gates' if channelwise else ''}, chunk 8)"
        error = max((a - b).abs().max().item() for a, b in zip((fast, *final.tensors()), (ref, *ref_final.tensors())))
        out.append((label, error, 1e-9))
    return out


def model_checks(device: torch.device) -> list[tuple[str, float, float]]:
    from miras.models import FAMILIES, create

    out = []
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    for family in FAMILIES:
        torch.manual_seed(0)
        model = create(f"{family}-tiny").double()  # float64: Moneta's map amplifies float32 rounding
        cpu_logits, _ = model(ids)
        model = model.to(device)
        dev_logits, _ = model(ids.to(device))
        out.append((f"{family}: float64 logits on the device == on the CPU",
                    (dev_logits.cpu() - cpu_logits).abs().max().item(), 1e-9))
        full, _ = model(ids.to(device))
        worst = 0.0
        for cuts in ([7, 23], list(range(1, 40))):
            pieces, state = [], None
            for a, b in zip([0, *cuts], [*cuts, 40]):
                y, state = model(ids[:, a:b].to(device), state)
                pieces.append(y)
            worst = max(worst, (torch.cat(pieces, 1) - full).abs().max().item())
        out.append((f"{family}: full == segments == token by token (float64)", worst, 1e-9))
        model = model.float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, _ = model(ids.to(device))
            loss = F.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.to(device).flatten()[1:])
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        out.append((f"{family}: bf16 autocast forward + backward finite", 0.0 if finite else float("inf"), 0.0))
        prompt = ids[:1, :12].to(device)
        a, _ = model.generate(prompt, 8, temperature=1.0, top_k=20, seed=3)
        b, _ = model.generate(prompt, 8, temperature=1.0, top_k=20, seed=3)
        out.append((f"{family}: generate with a seed is reproducible", float((a != b).sum().item()), 0.0))
    return out


def training_check(device: torch.device) -> list[tuple[str, float, float]]:
    from miras.evaluate import read_metrics
    from miras.train import TrainConfig, load_run, train

    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(model="titans-lmm-tiny", data="task:mqar", data_params={"pairs": 1, "queries": 1},
                             seq_len=32, batch_size=16, max_steps=60, lr=1e-2, warmup_steps=5, seed=0,
                             out_dir=folder, log_every=1, eval_every=0, save_every=60, progress=False,
                             device=str(device))
        train(config)
        losses = [r["loss"] for r in read_metrics(Path(folder) / "metrics.jsonl") if "loss" in r]
        model, _, _ = load_run(folder, device=str(device))
        on_device = next(model.parameters()).device.type == device.type
    drop = losses[0] - sum(losses[-5:]) / 5
    return [(f"trainer on the device: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} (must drop)",
             0.0 if drop > 0.5 else float("inf"), 0.0),
            ("trainer run reloads on the device", 0.0 if on_device else float("inf"), 0.0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON record (default: benchmarks/results/cuda_check.json on a GPU; nowhere for "
                             "a CPU dry run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_check: CUDA is not available here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"cuda_check on {name}, torch {torch.__version__}", flush=True)
    results, failed, started = [], 0, time.perf_counter()
    for group in (engine_checks, model_checks, training_check):
        try:
            rows = group(device)
        except Exception:  # a crash is a failed check, reported with its traceback
            rows = [(f"{group.__name__} crashed: {traceback.format_exc(limit=3)}", float("inf"), 0.0)]
        for label, error, tolerance in rows:
            ok = error <= tolerance
            failed += not ok
            results.append({"check": label, "error": error, "tolerance": tolerance, "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} {label}: {error:.2e} (<= {tolerance:.0e})", flush=True)
    summary = {"device": name, "torch": torch.__version__, "checks": len(results), "failed": failed,
               "seconds": round(time.perf_counter() - started, 1), "results": results}
    out = args.out or (ROOT / "results" / "cuda_check.json" if device.type == "cuda" else None)
    where = "nothing written (a dry run; give --out to keep it)"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        from miras.files import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(summary, indent=1).encode())
        where = f"wrote {out}"
    print(f"cuda_check: {len(results) - failed}/{len(results)} passed in {summary['seconds']} s; {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
