#!/usr/bin/env bash
# The koff_small sparsity sweep (6/12/25% of prunable parameters); each run resumes if interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
for s in 06 12 25; do
  sparsemem run --config experiments/configs/koff_small.py --set "koff.target_sparsity=0.$s" \
    --set "name=koff_small_$s" --workdir "runs/koff_small_$s" "$@"
done
