#!/usr/bin/env bash
# Delete the TPU slice (checkpoints and results stay in $BUCKET).
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
