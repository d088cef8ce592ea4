"""The model benchmark (``miras bench``), with results written to benchmarks/results/models.{json,md}.

    .venv/bin/python benchmarks/models.py           # the committed run: every family, about an hour on 2 cores
    .venv/bin/python benchmarks/models.py --families transformer titans-mac   # any miras bench option

One run measures training at T = 1K, 4K and 16K and decoding after 1K, 16K and 64K context tokens. The
16K training rows take ``recompute=64`` (``--long-overrides``): every memory layer runs in checkpointed
groups of 64 chunks and every block's MLP in groups of 1024 tokens, so that each model's 16K step fits in
this machine's 24 GiB (without it the Titans models need 12-20 GiB at 16K); the 1K and 4K rows run the
presets as they are. Options given here replace these defaults (``--lengths`` both of them).
"""

import sys
from pathlib import Path

from miras.bench import main

DEFAULTS = ["--lengths", "1024", "4096", "16384", "--long-overrides", "recompute=64"]

if __name__ == "__main__":
    given = sys.argv[1:]
    defaults = [] if {"--lengths", "--long-overrides"} & set(given) else DEFAULTS
    sys.exit(main(["--out", str(Path(__file__).resolve().parent / "results"), *defaults, *given]))
