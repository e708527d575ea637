#!/usr/bin/env bash
# Start `sparsemem run` on every worker, in the background, logging to ~/sparsemem-run.log; its exit
# status lands in ~/sparsemem-run.status (launch/worker_run.sh; 75 = preempted, rerun to resume).
#   launch/run.sh CONFIG [--set KEY=VALUE ...]
# The run directory is $WORKDIR (default $BUCKET/runs/<config name>): checkpoints go there, and the same command
# resumes from them (after a preemption too). Paper configs set mesh.distributed=True, so every
# process calls jax.distributed.initialize() and the mesh spans all hosts.
set -euo pipefail
source "$(dirname "$0")/env.sh"
config=${1:?usage: launch/run.sh experiments/configs/<name>.py [--set KEY=VALUE ...]}
shift
workdir=${WORKDIR:-$BUCKET/runs/$(basename "$config" .py)}
args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")
on_workers "cd ~/$REMOTE_DIR && nohup bash launch/worker_run.sh$args > ~/sparsemem-run.log 2>&1 < /dev/null &"
echo "started on $ACCELERATOR ($TPU_NAME); run directory $workdir; follow with launch/logs.sh"
