#!/usr/bin/env bash
# The gate regime's levers on the validation split (issue #29, docs/experiments.md "Gate levers"): KOFF alone
# at the study's setup and one budget, one factor at a time around the study's recipe (gate_fraction 0.5:
# the mask freezes after half the steps and the memories train on under it), each run resumable,
# then one `sparsemem compare` table whose last column is each point's loss minus the base point's, paired
# by seed and validation page. A point's value is one or more space-separated `--set` assignments.
# `sharp_start` spreads the importance start over 24 instead of 4 in log_alpha (the clamp widened to hold
# it): the hard-concrete noise is ~7.6 wide in log_alpha, so at a spread of 4 every gate samples
# stochastically (none decided at the 12% target), at 24 two thirds of the units start decided.
# Usage: experiments/gate_levers.sh [STEPS [SEEDS]]  (default 20 steps, 2 seeds)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-20}"
seeds="${2:-2}"
base=(--set eval.split=validation --set "train.variants=('koff',)" --set "train.steps=$steps"
      --set "train.seeds=$seeds" --set "study.budgets=()" --set "eval.settings=('pruned','koff')")
declare -A points=(
  [base]=""
  [uniform_start]="koff.gate_init=uniform"
  [short_ramp]="koff.warmup_fraction=0.2"
  [one_sample]="koff.gate_samples=1"
  [distill]="koff.kl_weight=1.0"
  [gate_lr_0.1]="koff.gate_lr=0.1"
  [gate_lr_1]="koff.gate_lr=1.0"
  [gate_frac_1]="koff.gate_fraction=1.0"
  [gate_frac_0.25]="koff.gate_fraction=0.25"
  [sharp_start]="koff.importance_spread=24 koff.log_alpha_clamp=14 koff.init_keep_prob=0.97"
)
order=(base gate_lr_0.1 sharp_start one_sample short_ramp distill gate_lr_1 gate_frac_1 gate_frac_0.25 uniform_start)
for point in "${order[@]}"; do
  extra=()
  for assignment in ${points[$point]}; do extra+=(--set "$assignment"); done
  sparsemem run --config experiments/configs/study.py "${base[@]}" "${extra[@]}" \
    --set "name=levers_${point}" --workdir "runs/levers/${steps}/${point}"
done
sparsemem compare $(for point in "${order[@]}"; do echo "runs/levers/${steps}/${point}"; done) \
  --out "runs/levers/${steps}/levers.md"
