# The two commands a newcomer needs:  `make experiment`  and  `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.setup-stamp
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: setup test lint experiment bench

# One pip command with the constraints file, so torch is never swapped for a CUDA build.
# mosaicml-streaming pulls PyPI's torchvision, which cannot import beside the CPU torch; we never
# use it (data_pipeline/streaming_compat.py skips streaming.vision), so it is removed.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip uninstall -q -y torchvision || true
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

experiment: setup
	.venv/bin/mythos experiment --config configs/digit_chain.yaml

bench: setup
	$(PY) benchmarks/bench_moe.py
