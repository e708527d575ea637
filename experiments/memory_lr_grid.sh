#!/usr/bin/env bash
# The memory learning rate of every method with memories (issue #29 item 3), on the validation split at
# the study's setup: KOFF, the Taylor-score mask + memories and prune-then-memory at the rate they all use
# (1e-4) and the two above it of KOFF's grid (docs/experiments.md "Learning rates"; below 1e-4 the memories
# hardly move from their prefill start in 20 steps), compared with 1e-4 by seed and validation
# page (experiments/screen.sh; runs/memory_lr/STEPS/memory_lr.md).
# Usage: experiments/memory_lr_grid.sh [STEPS [SEEDS]]  (default 20 steps, 2 seeds)
set -euo pipefail
exec "$(dirname "$0")/screen.sh" memory_lr "${1:-20}" "${2:-2}" \
  "('koff','score_mask_memory','prune_then_memory')" "('koff','score_mask_memory','prune_then_memory')" \
  m1e-4 m3e-4=koff.memory_lr=3e-4 m1e-3=koff.memory_lr=1e-3
