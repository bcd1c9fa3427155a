#!/usr/bin/env bash
# Plain torchrun across nodes with c10d rendezvous. Run the SAME command on every node:
#   NNODES=2 NPROC_PER_NODE=8 MASTER=node0.cluster:29500 launch/torchrun_multinode.sh \
#       --config configs/digit_chain_cluster.yaml [--set ...]
# MASTER is host:port of any one node (the rendezvous store runs there). Node ranks are assigned
# by the rendezvous; set NODE_RANK to pin them. RDZV_ID must be unique per job.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER:?set MASTER=host:port}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" ${NODE_RANK:+--node_rank="$NODE_RANK"} --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER" --rdzv_id="${RDZV_ID:-mythos-$USER}" \
  -m mythos_dist.cli train "$@"
