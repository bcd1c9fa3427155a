# The two commands a newcomer needs:  `make experiment`  and  `make test`.
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PY      := .venv/bin/python
# pip on this machine warns about every package its extra local index lacks; keep the log readable
QUIET   := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP   := .venv/.setup-stamp
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: setup test lint experiment bench bench-deepspeed bench-torchtitan

# pip's byte-compilation of every file it installs (torch, deepspeed, mlflow, ...) took 69 of the
# setup's 118 s here; with --no-compile Python compiles only what is imported, once, on first use
# (11 s more for the first run's imports). That needs bytecode writing on, which some environments
# turn off (PYTHONDONTWRITEBYTECODE=1 here: every import would compile again, every run).
unexport PYTHONDONTWRITEBYTECODE

# One pip command with the constraints file, so torch is never swapped for a CUDA build.
# mosaicml-streaming pulls PyPI's torchvision, which cannot import beside the CPU torch; we never
# use it (data_pipeline/streaming_compat.py skips streaming.vision), so it is removed.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q --no-compile -c constraints.txt -e ".[dev]" $(QUIET)
	$(PY) -m pip uninstall -q -y torchvision || true
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

experiment: setup
	.venv/bin/mythos experiment --config configs/digit_chain.yaml --config configs/digit_chain_recipe12.yaml

# The peer implementation is only a benchmark contender: installed without its dependencies.
bench: setup
	$(PY) -m pip install -q --no-deps open-mythos==0.5.0 $(QUIET)
	$(PY) benchmarks/bench_moe.py

# Our MoE layer vs DeepSpeed-MoE's own (deepspeed is already a dependency): 1 rank, then EP=2 on 2 ranks.
bench-deepspeed: setup
	$(PY) benchmarks/bench_deepspeed_moe.py

# torchtitan in a directory of its own beside the venv (--no-deps: our CPU torch stays the only
# torch); triton only because torchtitan's token dispatcher imports it even on CPU.
TITAN := .venv/bench-torchtitan
$(TITAN)/.stamp: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(TITAN) torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 \
		docstring_parser==0.18.0 typeguard==4.6.1 torchdata==0.11.0 torch_checkpointing==0.1.1 triton==3.9.0 $(QUIET)
	touch $@

bench-torchtitan: $(TITAN)/.stamp
	$(PY) benchmarks/bench_torchtitan_moe.py
