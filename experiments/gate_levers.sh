#!/usr/bin/env bash
# The gate regime's levers on the validation split (issue #29, docs/experiments.md "Gate levers"): KOFF alone
# at the study's setup and one budget, one factor at a time around the study's recipe (gate_fraction 0.5:
# the mask freezes after half the steps and the memories train on under it), compared with the base point
# by seed and validation page (experiments/screen.sh; runs/levers/STEPS/levers.md).
# `sharp_start` spreads the importance start over 24 instead of 4 in log_alpha (the clamp widened to hold
# it): the hard-concrete noise is ~7.6 wide in log_alpha, so at a spread of 4 every gate samples
# stochastically (none decided at the 12% target), at 24 two thirds of the units start decided.
# Usage: experiments/gate_levers.sh [STEPS [SEEDS]]  (default 20 steps, 2 seeds)
set -euo pipefail
exec "$(dirname "$0")/screen.sh" levers "${1:-20}" "${2:-2}" "('koff',)" "('pruned','koff')" \
  base \
  gate_lr_0.1=koff.gate_lr=0.1 \
  "sharp_start=koff.importance_spread=24 koff.log_alpha_clamp=14 koff.init_keep_prob=0.97" \
  one_sample=koff.gate_samples=1 \
  short_ramp=koff.warmup_fraction=0.2 \
  distill=koff.kl_weight=1.0 \
  gate_lr_1=koff.gate_lr=1.0 \
  gate_frac_1=koff.gate_fraction=1.0 \
  gate_frac_0.25=koff.gate_fraction=0.25 \
  uniform_start=koff.gate_init=uniform
