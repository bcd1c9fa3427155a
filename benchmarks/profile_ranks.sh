#!/bin/bash
# Where a training step's wall time goes on each rank: samples both ranks of a real 2-process
# training run (mythos experiment) with py-spy for 40 s once it reaches step AT, stops the run, and
# prints the share of the main thread's samples per line of Trainer.step and, inside the forward and
# the backward, per innermost frame (the collectives' waits included: --idle).
#
#   benchmarks/profile_ranks.sh [CONFIG] [AT]     (default configs/digit_chain_recipe14.yaml, 1000)
#
# py-spy is installed into .venv/bench-pyspy on first use (its own environment, not the project's).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/digit_chain_recipe14.yaml}; AT=${2:-1000}
SPY=.venv/bench-pyspy/bin/py-spy
[[ -x $SPY ]] || { python3 -m venv .venv/bench-pyspy && .venv/bench-pyspy/bin/pip install -q py-spy==0.4.3; }
D=runs/profile_ranks; rm -rf $D; mkdir -p $D
setsid .venv/bin/mythos experiment --config "$CONFIG" --set checkpoint.dir=$D/ck --set eval.out_dir=$D/eval \
  --set tracking.enabled=false > $D/train.log 2>&1 &
JOB=$!
trap 'kill -- -$JOB 2>/dev/null || true' EXIT
until grep -q "^step $AT/" $D/train.log 2>/dev/null; do
  kill -0 $JOB 2>/dev/null || { echo "training ended before step $AT: $D/train.log" >&2; exit 1; }
  sleep 2
done
# This job's ranks: the children of its torchrun (which starts them in sessions of their own), not
# another job's trainers.
LAUNCHER=$(pgrep -P $JOB -f torch.distributed.run || true)
RANKS=$([[ -n $LAUNCHER ]] && pgrep -P "$LAUNCHER" -f 'mythos_dist.cli train' || true)
[[ -n $RANKS ]] || { echo "no training ranks found under the job's process $JOB" >&2; exit 1; }
SPIES=(); i=0
for P in $RANKS; do
  $SPY record -p "$P" -d 40 -r 50 --idle --threads --nonblocking -f raw -o $D/rank$i.txt > $D/spy$i.log 2>&1 &
  SPIES+=($!); i=$((i+1))
done
for S in "${SPIES[@]}"; do wait "$S"; done
.venv/bin/python benchmarks/py_spy_breakdown.py $D/rank*.txt
