#!/usr/bin/env bash
# Plain torchrun across nodes with c10d rendezvous. Run the SAME command on every node:
#   NNODES=2 NPROC_PER_NODE=8 MASTER=10.0.1.1:29500 launch/torchrun_multinode.sh \
#       --config configs/digit_chain_cluster.yaml [--set ...]
# MASTER is host:port of any one node, by hostname or by the address of ANY of its interfaces (e.g.
# the fast network's); the rendezvous store runs there. Node ranks are assigned by the rendezvous.
# RDZV_ID must be unique per job. IPv4 only.
#
# Network: this node's address and interface are the ones its route to MASTER uses (on the MASTER
# node: the interface holding that address). They become torchrun's --local-addr (how the other nodes
# reach this one) and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (the interface the collectives use),
# unless you set those yourself, e.g. NCCL_SOCKET_IFNAME=ib0 LOCAL_ADDR=10.0.1.7.
# MAX_RESTARTS=N: torchrun's elastic agent restarts all ranks up to N times after a rank fails; each
# restart resumes from checkpoint.dir/latest. PROGRAM replaces `-m mythos_dist.cli train` (e.g. a
# script of your own; the arguments follow it).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER:?set MASTER=host:port}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
PY=${PYTHON:-.venv/bin/python}

master_host=${MASTER%:*}
master_ip=$(getent ahostsv4 "$master_host" | awk 'NR == 1 {print $1}') || true
[[ -n "$master_ip" ]] || { echo "$0: MASTER host '$master_host' does not resolve to an IPv4 address" >&2; exit 2; }
rdzv_conf=()
if local_dev=$(ip -o -4 addr show to "$master_ip/32" | awk 'NR == 1 {print $2}') && [[ -n "$local_dev" ]]; then
  # This node holds MASTER's address. torch hosts the store only when MASTER matches the hostname or
  # the address it resolves to, so an address of a second interface needs is_host said explicitly.
  dev=$local_dev addr=$master_ip
  [[ "$master_ip" == 127.* ]] || rdzv_conf=(--rdzv_conf=is_host=1)
else
  route=$(ip -o -4 route get "$master_ip") || { echo "$0: no route to MASTER $master_ip" >&2; exit 2; }
  dev=$(awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' <<<"$route")
  addr=$(awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1)}' <<<"$route")
fi
# Workers get a store of their own per attempt: with the agent's shared store, ranks restarted by
# --max-restarts read the previous attempt's gloo addresses and fail to connect (seen with torch 2.13).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$dev} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$dev}
echo "torchrun_multinode: $(hostname): rendezvous $MASTER (${rdzv_conf[*]:-is_host by torch}), local address ${LOCAL_ADDR:-$addr}, collectives on $GLOO_SOCKET_IFNAME" >&2
# shellcheck disable=SC2086  # PROGRAM is a command line
exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" ${NODE_RANK:+--node_rank="$NODE_RANK"} --nproc_per_node="${NPROC_PER_NODE:-1}" --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER" --rdzv_id="${RDZV_ID:-mythos-${USER:-job}}" "${rdzv_conf[@]}" \
  --local-addr="${LOCAL_ADDR:-$addr}" ${PROGRAM:--m mythos_dist.cli train} "$@"
