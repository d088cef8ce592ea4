"""The model benchmark (``miras bench``), with results written to benchmarks/results/models.{json,md}.

    .venv/bin/python benchmarks/models.py                       # T in {1K, 4K}; contexts {1K, 16K, 64K}
    .venv/bin/python benchmarks/models.py --lengths 1024 4096 16384   # add 16K training (needs ~20 GB)
"""

import sys
from pathlib import Path

from miras.bench import main

if __name__ == "__main__":
    sys.exit(main(["--out", str(Path(__file__).resolve().parent / "results"), *sys.argv[1:]]))
