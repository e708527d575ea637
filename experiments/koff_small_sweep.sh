#!/usr/bin/env bash
# Sparsity sweep (6/12/25% of prunable parameters) of one config, default koff_small.py; each run
# resumes if interrupted. Usage: experiments/koff_small_sweep.sh [CONFIG [SPARSITIES [--set ...]]]
#   experiments/koff_small_sweep.sh experiments/configs/demo.py "06 25"   # runs/demo_06, runs/demo_25
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-experiments/configs/koff_small.py}"
sparsities="${2:-06 12 25}"
shift $(( $# > 2 ? 2 : $# ))
name="$(basename "$config" .py)"
for s in $sparsities; do
  sparsemem run --config "$config" --set "koff.target_sparsity=0.$s" \
    --set "name=${name}_$s" --workdir "runs/${name}_$s" "$@"
done
