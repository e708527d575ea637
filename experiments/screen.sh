#!/usr/bin/env bash
# One factor at a time on the validation split around experiments/configs/study.py (issue #29): one resumable
# `sparsemem run` per point into runs/NAME/STEPS/POINT, then one `sparsemem compare` table (runs/NAME/STEPS/NAME.md)
# whose paired columns are each setting's loss minus the first point's, by seed and validation page.
# Usage: experiments/screen.sh NAME STEPS SEEDS VARIANTS SETTINGS POINT ...
#   VARIANTS / SETTINGS: Python tuples for train.variants / eval.settings, e.g. "('koff',)"
#   POINT: a name, optionally "=" and space-separated --set assignments ("gate_lr_0.1=koff.gate_lr=0.1");
#   the first point is the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
if (( $# < 6 )); then
  sed -n '5,8p' "$0" >&2
  exit 2
fi
name="$1" steps="$2" seeds="$3" variants="$4" settings="$5"
shift 5
base=(--set eval.split=validation --set "train.variants=$variants" --set "train.steps=$steps"
      --set "train.seeds=$seeds" --set "study.budgets=()" --set "eval.settings=$settings")
dirs=()
for point in "$@"; do
  label="${point%%=*}"
  extra=()
  if [[ "$point" == *=* ]]; then
    for assignment in ${point#*=}; do extra+=(--set "$assignment"); done
  fi
  sparsemem run --config experiments/configs/study.py "${base[@]}" "${extra[@]}" \
    --set "name=${name}_${label}" --workdir "runs/${name}/${steps}/${label}"
  dirs+=("runs/${name}/${steps}/${label}")
done
paired=()
for setting in $(python -c 'import ast, sys; print(*ast.literal_eval(sys.argv[1]))' "$settings"); do
  paired+=(--paired "$setting")
done
sparsemem compare "${dirs[@]}" "${paired[@]}" --out "runs/${name}/${steps}/${name}.md"
