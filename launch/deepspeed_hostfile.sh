#!/usr/bin/env bash
# Multi-node launch with the DeepSpeed launcher (passwordless ssh from this node to all hosts,
# same path and venv on each). HOSTFILE lines look like `node0 slots=8`.
#   HOSTFILE=launch/hostfile launch/deepspeed_hostfile.sh --config configs/digit_chain_cluster.yaml
# The launcher exports LOCAL_SIZE (not LOCAL_WORLD_SIZE); mythos_dist.parallel maps it for streaming.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE (lines: 'host slots=N')}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
exec .venv/bin/deepspeed --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" --no_local_rank \
  --module mythos_dist.cli train "$@"
