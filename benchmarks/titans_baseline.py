"""Times titans-pytorch 0.5.5's NeuralMemory at the memory_layer.py config, in its own venv.

Not a dependency: run by memory_layer.py with the python of `.bench/titans-venv` (made by
`make bench-baseline-venv`), one case per process, printing one JSON line.

Config matched to MemoryLayer(256, heads=4, rule=TITANS, chunk_size=C): 4 heads of 64, a per-head
2-layer MLP memory 64 -> 256 -> 64 with GELU, momentum and weight decay on, per-token lr. With
``batch_size=chunk`` the weights are updated after every chunk and the next chunk's gradients are
taken at them (the Titans mini-batch recurrence, as ours); without it the library takes every
gradient of the call at the initial weights. max_lr is 0.1 (its default 1.0 gives NaN within 1K tokens
at this config; speed does not depend on it). Differences it keeps: momentum and decay gates are
per chunk (pooled), not per token; no q/k L2 norm (its qk_rmsnorm is off to match ours closer).
"""

import json
import sys

import torch
from memory_layer import make_step, time_case  # this folder is on sys.path when run as a script
from titans_pytorch import MemoryMLP, NeuralMemory


def build(chunk: int) -> NeuralMemory:
    torch.manual_seed(0)
    return NeuralMemory(
        dim=256, chunk_size=chunk, batch_size=chunk, dim_head=64, heads=4,
        model=MemoryMLP(dim=64, depth=2, expansion_factor=4.0), momentum=True, momentum_order=1,
        attn_pool_chunks=False, qk_rmsnorm=False, per_parameter_lr_modulation=False,
        use_accelerated_scan=False, default_step_transform_max_lr=0.1)


def main():
    case = json.loads(sys.argv[1])
    torch.set_num_threads(case["threads"])
    x = torch.randn(case["batch"], case["T"], 256, generator=torch.Generator().manual_seed(1))
    print(json.dumps(time_case(case, make_step(build(case["chunk"]), x, case))))


if __name__ == "__main__":
    main()
