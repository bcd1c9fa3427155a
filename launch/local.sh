#!/usr/bin/env bash
# N training processes on this machine (gloo on CPU, NCCL on GPUs).
#   launch/local.sh [NPROC] --config configs/digit_chain.yaml [--set train.steps=200 ...]
# NPROC defaults to 2. Extra arguments go to `mythos train`.
set -euo pipefail
NPROC=2
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}  # cache DeepSpeed's JIT ops
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m mythos_dist.cli train "$@"
