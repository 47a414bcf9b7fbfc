# One-command entry points. Every target installs what it needs first.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install test lint demo bench

install: $(STAMP)

# torch first: on a CPU-only machine `torch==2.13.0` is the local CPU wheel; a plain `torch`
# requirement would pull a multi-GB CUDA build. A machine that already has torch keeps it.
$(STAMP): setup.cfg pyproject.toml
	@mkdir -p .make
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $@

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check moaplan kernels tests benchmarks

# The headline command on the shipped reference model: profile, optimize, validate, write plan.yaml.
demo: install
	moaplan search --budget 0.5

# The benchmark suite (benchmarks/run.py): what this machine can run, then plots, SUMMARY.md and
# the README's results section.  Options: make bench BENCH="--quick" or BENCH="--section quality".
bench: install
	$(PYTHON) benchmarks/run.py $(BENCH)
