"""The model benchmark (``miras bench``), with results written to benchmarks/results/models.{json,md}.

    .venv/bin/python benchmarks/models.py           # the committed run: every family, about 45 min on 2 cores
    .venv/bin/python benchmarks/models.py --families transformer titans-mac   # any miras bench option

One run measures training at T = 1K, 4K and 16K and decoding after 1K, 16K and 64K context tokens. The
16K training rows take ``recompute=64`` (``--long-overrides``): every memory layer runs in checkpointed
groups of 64 chunks (64 blocks on the delta path) and every block's MLP in groups of as many tokens. The
Titans models' 4K rows without it peak at 5.0-5.4 GiB here, and a 16K row of titans-mac or titans-lmm
(``impl=compiled``) peaked at 10.5-12.1 GiB (``benchmarks/results/models_allocator/``). The 1K and 4K rows
run the presets as they are. ``--lengths`` replaces the lengths, ``--long-overrides`` the 16K rows'
overrides; the latter are left out when no length reaches 16K and ``--long-from`` is not given.
"""

import argparse
import sys
from pathlib import Path

from miras.bench import LONG_FROM, main

LENGTHS = ["1024", "4096", "16384"]
LONG_OVERRIDES = ["recompute=64"]


def defaults(given: list[str]) -> list[str]:
    """The committed run's options that ``given`` (this script's arguments) does not set itself."""
    probe = argparse.ArgumentParser(add_help=False)  # reads only these three; miras bench checks everything
    for option in ("--lengths", "--long-overrides"):
        probe.add_argument(option, nargs="*")
    probe.add_argument("--long-from")
    known, _ = probe.parse_known_args(given)
    added = [] if known.lengths is not None else ["--lengths", *LENGTHS]
    try:
        reaches = any(int(length) >= int(known.long_from or LONG_FROM) for length in known.lengths or LENGTHS)
    except ValueError:  # not numbers: miras bench says what is wrong with them
        reaches = False
    # a --long-from that no length reaches keeps them too: miras bench then says that they apply to nothing
    if known.long_overrides is None and (reaches or known.long_from is not None):
        added += ["--long-overrides", *LONG_OVERRIDES]
    return added


if __name__ == "__main__":
    given = sys.argv[1:]
    sys.exit(main(["--out", str(Path(__file__).resolve().parent / "results"), *defaults(given), *given]))
