#!/usr/bin/env bash
# One machine with several NVIDIA GPUs: one process sees every GPU, so no jax.distributed is needed.
#   launch/gpu_single_node.sh CONFIG [--set KEY=VALUE ...]
# Run it from the repository root on the GPU machine. The mesh uses every GPU along `data`
# unless the config or --set says otherwise; checkpoints go to WORKDIR (a local path or gs://).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/gpu_single_node.sh experiments/configs/<name>.py [--set KEY=VALUE ...]}
shift
jax_version=$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")
python3 -m pip install -q -e . "jax[cuda12]${jax_version:+==$jax_version}"
gpus=$(python3 -c 'import jax; print(jax.device_count("gpu"))')
echo "$gpus GPUs"
status=0
python3 -m sparsemem.cli run --config "$config" --workdir "${WORKDIR:-runs/$(basename "$config" .py)}" \
  --set mesh.data="$gpus" --set mesh.fsdp=1 --set mesh.model=1 --set mesh.distributed=False "$@" || status=$?
if [[ $status == 75 ]]; then
  echo "preempted (SIGTERM) after saving a checkpoint: rerun this same command to resume"
fi
exit "$status"
