# `make demo`: set up .venv (the package and its runtime dependencies) and run `miras demo`.
# `make test`: set up .venv with the dev extras and run the CPU test suite. `make bench`: the memory-layer benchmark.
# TORCH_SPEC picks the torch that is installed when the venv has none (a venv that has torch keeps it).
# The default, torch==2.13.0, is the CPU build only where pip finds a local CPU wheel (this project's
# machines); elsewhere PyPI's is the CUDA build: pass the CPU index, as the README says
# (`make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo demo-long test test-slow bench bench-long bench-baseline-venv lint clean

# The runtime alone (no dev extras): what `make demo` needs on a fresh machine.
$(VENV)/.installed-runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

demo: $(VENV)/.installed-runtime
	$(VENV)/bin/miras demo

# After the demo: its seed-0 Titans LMM asked for the value 256K and 1M tokens back (13 min on 2 CPU cores;
# runs the demo first if runs/demo has no such model). Results in runs/demo-long.
demo-long: $(VENV)/.installed-runtime
	test -d runs/demo/titans-lmm/seed-0 || $(VENV)/bin/miras demo
	$(VENV)/bin/miras eval runs/demo/titans-lmm/seed-0 --tasks mqar --lengths 262144,1048576 --examples 16 \
		--seed 123 --segment 4096 --out runs/demo-long

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

# The tests kept out of the default run for time (each preset at 16K tokens, fp32 and bf16).
test-slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) benchmarks/memory_layer.py

# Training at 4K and 16K tokens (~8 min): the Transformer as is, then the Transformer, MAC and LMM
# with recompute=64; results in benchmarks/results/models_recompute/.
LONG := benchmarks/results/models_recompute
bench-long: install
	$(PY) -m miras.bench --families transformer --lengths 4096 16384 --contexts --out $(LONG)/default
	$(PY) -m miras.bench --families transformer titans-mac titans-lmm --lengths 4096 16384 --contexts \
		--overrides impl=compiled recompute=64 --out $(LONG)/recompute64

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# A throwaway venv with titans-pytorch 0.5.5 for the benchmark comparison (never a dependency).
bench-baseline-venv:
	test -x .bench/titans-venv/bin/python || $(PYTHON) -m venv .bench/titans-venv
	.bench/titans-venv/bin/python -m pip install -q $(TORCH_SPEC)
	.bench/titans-venv/bin/python -m pip install -q titans-pytorch==0.5.5  # apart: TORCH_SPEC may set --index-url
