"""How far a trained model's float32 (and bf16-autocast) logits drift from its float64 logits along a
sequence, and how far a 1e-12 nudge of its embeddings moves its float64 logits: the numbers behind
``docs/demo/README.md``'s note on the trained MAC.

    .venv/bin/python benchmarks/precision_drift.py runs/demo/titans-mac/seed-0 runs/demo/titans-lmm/seed-0
    .venv/bin/python benchmarks/precision_drift.py --presets titans-mac-tiny titans-lmm-tiny   # untrained

Each run: 4 rows of 512 random byte tokens (seed 0), one pass; per block of 64 tokens the largest
absolute logit difference over rows and vocabulary.
"""

from __future__ import annotations

import argparse
import copy

import torch

from miras.models import create
from miras.train import load_run


def per_block(a: torch.Tensor, b: torch.Tensor, block: int) -> list[float]:
    diff = (a.double() - b.double()).abs().amax(-1).amax(0)  # [T]
    return [diff[i:i + block].max().item() for i in range(0, diff.shape[0], block)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders written by `miras train` / `miras demo`")
    parser.add_argument("--presets", nargs="*", default=[],
                        help="untrained models (torch.manual_seed(0), the demo's decay_init=1e-5) to measure too")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    if not args.runs and not args.presets:
        parser.error("give run folders, --presets, or both")
    for run in [*args.runs, *(f"preset:{name}" for name in args.presets)]:
        torch.manual_seed(0)
        if run.startswith("preset:"):
            model = create(run.removeprefix("preset:"), decay_init=1e-5).eval()
        else:
            model, _, _ = load_run(run)
        exact = copy.deepcopy(model).double()
        nudged = copy.deepcopy(exact)
        ids = torch.randint(0, model.config.vocab_size, (4, args.tokens))
        with torch.no_grad():
            nudged.embed.weight.add_(1e-12 * torch.randn_like(nudged.embed.weight))
            reference, _ = exact(ids)
            single, _ = model(ids)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half, _ = model(ids)
            moved, _ = nudged(ids)
        size = reference.abs().max().item()
        print(f"{run} ({model.config.family}), logits up to {size:.1f}; largest difference per {args.block} tokens:")
        for label, other in (("float32 vs float64", single), ("bf16 autocast vs float64", half),
                             ("float64, embeddings nudged by 1e-12", moved)):
            print(f"  {label:36s}" + " ".join(f"{x:.1e}" for x in per_block(other, reference, args.block)))


if __name__ == "__main__":
    main()
