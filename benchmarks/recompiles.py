"""How many graphs ``impl="compiled"`` compiles for one training step and then generation after prompts
of many lengths (``memory/README.md``, performance notes).

    .venv/bin/python benchmarks/recompiles.py      # about a minute on 2 cores (titans-lmm-tiny)

The compiled chunk step is specialised on what dynamo guards (the row a chunk's state is taken at, the
chunk length, the weights' strides, grad mode, ...), and every model in a process shares dynamo's limit
on recompiles of that one function; past it, new shapes run eagerly without an error. This prints the
number of graphs torch compiled and whether the limit was hit. Nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from miras.models import create


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="titans-lmm-tiny")
    parser.add_argument("--prompts", type=int, nargs="+", default=[3, 4, 5, 6, 9, 10, 11, 12, 13, 20],
                        help="prompt lengths to generate after (default: 3-20 tokens)")
    args = parser.parse_args()
    from torch._dynamo.utils import counters

    limits = []  # dynamo logs "torch._dynamo hit config.recompile_limit ..." once per function that hits it

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "hit config." in record.getMessage():
                limits.append(record.getMessage().splitlines()[0])

    logging.getLogger("torch._dynamo.convert_frame").addHandler(Catch(logging.WARNING))
    torch.manual_seed(0)
    model = create(args.preset, impl="compiled")
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    start = time.perf_counter()
    logits, _ = model(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    print(f"training step [4, 32]: {time.perf_counter() - start:.1f} s", flush=True)
    model.eval()
    for length in args.prompts:
        start = time.perf_counter()
        model.generate(torch.randint(0, model.config.vocab_size, (1, length)), 3, temperature=0)
        print(f"prompt of {length} tokens: {time.perf_counter() - start:.2f} s", flush=True)
    graphs = counters["stats"]["unique_graphs"]
    print(f"{args.preset}: {graphs} graphs compiled; recompile limit hit: {'; '.join(limits) or 'no'}")


if __name__ == "__main__":
    main()
