"""What a trained model's memory gates do over long contexts: per memory layer, the forgetting accumulated over
an MQAR example (Σ_t −log(1 − α_t), averaged over examples and heads: a write is scaled by e^-x by the end), the
mean inner learning rate θ, θ at each role's tokens (the pair's key and value, the noise between, the query's key),
and the norm of the gate projection's weights. A memory that writes the fact and little else has θ at the value far
above θ at the noise.

    .venv/bin/python benchmarks/memory_gates.py runs/demo/titans-lmm/seed-0 runs/demo/titans-lmm/seed-2
    .venv/bin/python benchmarks/memory_gates.py RUN [RUN ...] --length 8192 --examples 8 --seed 12345

The examples are those of ``miras eval --tasks mqar --seed S`` at that length (pairs=1, queries=1, as the demo).
"""

from __future__ import annotations

import argparse

import torch

from miras.data.tasks import generate, make_task
from miras.evaluate import example_generator
from miras.layers import MemoryLayer
from miras.runs import load_run


def gate_statistics(run: str, length: int, examples: int, seed: int) -> dict:
    model, _, _ = load_run(run)
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    forgetting, rates = [[] for _ in layers], [[] for _ in layers]
    # token positions of each role in an MQAR example with one pair: key, value, noise..., query key, value
    roles = {"key": slice(0, 1), "value": slice(1, 2), "noise": slice(2, length - 2),
             "query": slice(length - 2, length - 1)}
    by_role = [{role: [] for role in roles} for _ in layers]
    captured: list[list] = [[] for _ in layers]
    for layer, found in zip(layers, captured):
        compute = layer._gates
        layer._gates = lambda x, dtype, compute=compute, found=found: found.append(compute(x, dtype)) or found[-1]
    task = make_task("mqar", context_length=length, pairs=1, queries=1)
    with torch.no_grad():
        for index in range(examples):
            for found in captured:
                found.clear()
            model(generate(task, example_generator(seed, length, index)).tokens[None])
            for n, found in enumerate(captured):
                decay = torch.cat([g.decay for g in found], dim=1)
                forgetting[n].append((-torch.log1p(-decay)).sum(1).mean().item())
                lr = torch.cat([g.lr for g in found], dim=1)
                rates[n].append(lr.mean().item())
                for role, where in roles.items():
                    by_role[n][role].append(lr[:, where].mean().item())
    return {"forgetting": [sum(f) / len(f) for f in forgetting], "mean_lr": [sum(r) / len(r) for r in rates],
            "lr_by_role": [{role: sum(r) / len(r) for role, r in layer.items()} for layer in by_role],
            "gate_proj_norm": [layer.gate_proj.weight.norm().item() for layer in layers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (miras train / miras demo)")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=12345, help="the evaluation seed (the demo's: 12345)")
    args = parser.parse_args()
    for run in args.runs:
        stats = gate_statistics(run, args.length, args.examples, args.seed)
        print(f"{run}: forgetting over {args.length} tokens (e^-x) {[round(x, 3) for x in stats['forgetting']]}; "
              f"mean θ {[round(x, 4) for x in stats['mean_lr']]}; "
              "θ at key / value / noise / query key " + ", ".join(
                  " / ".join(f"{x:.4f}" for x in layer.values()) for layer in stats["lr_by_role"]) + "; "
              f"|gate_proj.weight| {[round(x, 2) for x in stats['gate_proj_norm']]}")


if __name__ == "__main__":
    main()
