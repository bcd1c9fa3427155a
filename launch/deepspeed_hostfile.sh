#!/usr/bin/env bash
# Multi-node launch with the DeepSpeed launcher (passwordless ssh from this node to all hosts,
# same path and venv on each). HOSTFILE lines look like `node0 slots=8`.
#   HOSTFILE=launch/hostfile launch/deepspeed_hostfile.sh --config configs/digit_chain_cluster.yaml
# The launcher exports LOCAL_SIZE (not LOCAL_WORLD_SIZE); mythos_dist.parallel maps it for streaming.
# The other nodes get only NCCL_*, PYTHON*, UCX*, MV2* from this environment, plus the KEY=VALUE lines
# of .deepspeed_env (in ~ or the repo root; DS_ENV_FILE names another): put OMP_NUM_THREADS,
# TORCH_EXTENSIONS_DIR, GLOO_SOCKET_IFNAME and the like there. The master address is the first
# host's first `hostname -I` address unless you pass --master_addr via DS_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE (lines: 'host slots=N')}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
# shellcheck disable=SC2086  # DS_ARGS: more launcher flags
exec .venv/bin/deepspeed --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" --no_local_rank ${DS_ARGS:-} \
  --module mythos_dist.cli train "$@"
