#!/usr/bin/env bash
# Create the TPU slice: launch/create.sh [--spot]   (ACCELERATOR, ZONE, RUNTIME from launch/env.sh)
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
  --version "$RUNTIME" "$@"
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --format 'value(state,acceleratorType)'
