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
import resource
import statistics
import sys
import time

import torch
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
    layer = build(case["chunk"])
    x = torch.randn(case["batch"], case["T"], 256, generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["dtype"] == "bfloat16")

    def step():
        if case["mode"] == "fwd":
            with torch.no_grad(), autocast:
                return layer(x)[0]
        layer.zero_grad(set_to_none=True)
        with autocast:
            y = layer(x)[0]
        y.float().square().mean().backward()
        return y

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    y = step()
    times = []
    while len(times) < case["repeats"] and sum(times) < case["budget_s"]:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({**case, "seconds": seconds, "tokens_per_s": case["batch"] * case["T"] / seconds,
                      "gflops": None, "runs": len(times), "finite": bool(torch.isfinite(y.float()).all()),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mb": rss_before}))


if __name__ == "__main__":
    main()
