#!/usr/bin/env bash
# Accelerator throughput suite in one command: forward, KOFF train step (bfloat16 compute;
# remat none, dots (the default) and full) and serving for Gemma-3-270M and Llama-3.2-1B
# (random init), tokens/s, MFU and peak device memory; a workload that fails is a row saying so.
#   bash benchmarks/accelerator.sh [OUT_DIR] [extra benchmarks/accelerator.py flags]
#   bash benchmarks/accelerator.sh /tmp/smoke --tiny --dtype float32 --seq 32 --prompt 16   # CPU smoke test
# docs/benchmarks.md ("Accelerator") gives the command a GPU session runs.
# Writes OUT_DIR/accelerator.json and OUT_DIR/accelerator.md (default OUT_DIR: results/accelerator).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/accelerator}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/accelerator.py --out "$out" "$@"
