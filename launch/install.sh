#!/usr/bin/env bash
# Install this checkout (its committed HEAD) on every worker, with jax[tpu] of the local jax version.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":sparsemem.tar.gz --zone "$ZONE" --worker=all
on_workers "set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/sparsemem.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR \
  && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[gcs]' 'jax[tpu]==$JAX_VERSION' \
  && python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
